"""Evaluation of the MACE trunk inside :class:`~metatrain_mace.model.MetaMACE`:
node features of every layer, MACE's readout energy, ZBL and the charge/spin
embedding energy, and the element check. A mixin: the methods use the model's
``mace`` module and buffers, and are compiled with the model by TorchScript."""

import copy
import logging
from typing import List, Optional, Tuple

import torch

from metatrain_mace.finetune import lora
from metatrain_mace.trunk import backend, cueq
from metatrain_mace.trunk.build import set_avg_num_neighbors
from metatrain_mace.trunk.irreps import probe_cluster
from metatrain_mace.trunk.scripting import tree_copy
from metatrain_mace.trunk.slicing import split_tensor_product_inputs


class TrunkPass:
    """Methods of :class:`MetaMACE` that run MACE's own modules."""

    def set_avg_num_neighbors(self, value: float) -> None:
        """Store the neighbour-sum normalisation and push it into MACE."""
        self.avg_num_neighbors.fill_(float(value))
        set_avg_num_neighbors(self.mace, float(value))

    def _set_layout(self) -> None:
        """Follow the layout of the trunk's node features: cuEquivariance keeps
        them as (irrep, multiplicity), the heads read e3nn's (multiplicity, irrep)."""
        self.uses_cueq = backend.is_cueq(self.mace)
        if self.uses_cueq:
            order = cueq.mul_ir_order(self.feature_irreps)
        else:
            order = torch.arange(self.feature_irreps.dim)
        self.register_buffer(
            "feature_order", order.to(self.scalar_index.device), persistent=False
        )

    def _convert_trunk(self, enable_cueq: bool) -> None:
        """Move the trunk and the copies of MACE's readouts (readout heads) to the
        other backend, weights included."""
        self.mace = cueq.convert(self.mace, enable_cueq)
        if not enable_cueq:
            split_tensor_product_inputs(self.mace)
        for name in self.readout_heads:
            head = self.heads[name]
            readouts = copy.deepcopy(self.mace.readouts)
            cueq.copy_weights(head.readouts, readouts)
            head.readouts = readouts
        self._set_layout()

    def set_backend(self, enable_cueq: bool) -> None:
        """Run the trunk on cuEquivariance (``True``) or e3nn, with the same
        weights; ``hypers["enable_cueq"]`` follows."""
        if enable_cueq != self.uses_cueq:
            if enable_cueq and lora.adapters(self):
                raise ValueError(
                    "LoRA adapters run on e3nn only: set 'enable_cueq: false' to "
                    "train or fine-tune a model with LoRA adapters"
                )
            self._convert_trunk(enable_cueq)
        self.hypers = {**self.hypers, "enable_cueq": enable_cueq}

    def e3nn_copy(self):
        """This model with an e3nn trunk, sharing every other weight (the model
        itself when it already runs e3nn): what checkpoints and export hold."""
        if not self.uses_cueq:
            return self
        twin = tree_copy(self)
        twin._convert_trunk(False)
        return twin

    def check_parity(self, other, tolerance: float) -> float:
        """Largest relative difference of the node features of this model's trunk
        and ``other``'s on a random cluster; raises above ``tolerance``."""
        parameter = next(self.mace.parameters())
        graph = probe_cluster(
            len(self.atomic_types), self.r_max, parameter.dtype, parameter.device
        )
        with torch.no_grad():
            mine = torch.cat(self._node_features(*graph), dim=-1)[:, self.feature_order]
            theirs = torch.cat(other._node_features(*graph), dim=-1)[
                :, other.feature_order
            ]
        error = float((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
        if error > tolerance:
            raise RuntimeError(
                f"the e3nn and cuEquivariance trunks disagree: relative error "
                f"{error:.2e} > {tolerance:.0e}; please report this with your model"
            )
        logging.info(f"e3nn and cuEquivariance trunks agree to {error:.1e} (relative)")
        return error

    def _node_features(
        self,
        node_attrs: torch.Tensor,
        edge_index: torch.Tensor,
        vectors: torch.Tensor,
        conditioning: Optional[torch.Tensor] = None,
    ) -> List[torch.Tensor]:
        """Node features of every layer; ``conditioning`` (per-atom embedding of
        charge and spin) is added to the embedding of the elements, as in MACE."""
        lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
        node_feats = self.mace.node_embedding(node_attrs)
        if conditioning is not None:
            node_feats = node_feats + conditioning
        edge_attrs = self.mace.spherical_harmonics(vectors)
        edge_feats, cutoff = self.mace.radial_embedding(
            lengths, node_attrs, edge_index, self.mace.atomic_numbers
        )
        features: List[torch.Tensor] = []
        for i, (interaction, product) in enumerate(
            zip(self.mace.interactions, self.mace.products)  # noqa: B905 (TorchScript)
        ):
            node_feats, sc = interaction(
                node_attrs=node_attrs,
                node_feats=node_feats,
                edge_attrs=edge_attrs,
                edge_feats=edge_feats,
                edge_index=edge_index,
                cutoff=cutoff,
                first_layer=(i == 0),
            )
            node_feats = product(node_feats=node_feats, sc=sc, node_attrs=node_attrs)
            features.append(node_feats)
        return features

    def _mace_energy(
        self,
        features: List[torch.Tensor],
        node_attrs: torch.Tensor,
        edge_index: torch.Tensor,
        vectors: torch.Tensor,
        with_features: bool,
        conditioning: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-atom energy of MACE's readouts, and the readouts' last-layer features
        (computed only ``with_features``, else an empty tensor)."""
        n_atoms = node_attrs.shape[0]
        node_heads = torch.full(
            (n_atoms,), self.head_index, dtype=torch.int64, device=node_attrs.device
        )
        energy = torch.zeros(n_atoms, dtype=node_attrs.dtype, device=node_attrs.device)
        last_layer: List[torch.Tensor] = []
        n_readouts = len(self.mace.readouts)
        for i, readout in enumerate(self.mace.readouts):
            layer = len(features) - 1 if n_readouts == 1 else i
            energy = energy + readout(features[layer], node_heads)[:, self.head_index]
            if with_features:
                if hasattr(readout, "linear_1"):
                    last_layer.append(
                        readout.non_linearity(readout.linear_1(features[layer]))
                    )
                else:
                    last_layer.append(features[layer][:, : self.layer_scalars[layer]])
        energy = energy + self._extra_energy(
            node_attrs, edge_index, vectors, conditioning
        )
        if len(last_layer) == 0:
            return energy.unsqueeze(-1), energy.new_zeros((n_atoms, 0))
        return energy.unsqueeze(-1), torch.cat(last_layer, dim=-1)

    def _extra_energy(
        self,
        node_attrs: torch.Tensor,
        edge_index: torch.Tensor,
        vectors: torch.Tensor,
        conditioning: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Per-atom energy of MACE outside its per-layer readouts: the readout of
        the charge/spin embedding and ZBL pair repulsion (zero without them)."""
        n_atoms = node_attrs.shape[0]
        energy = torch.zeros(n_atoms, dtype=node_attrs.dtype, device=node_attrs.device)
        if hasattr(self.mace, "embedding_readout") and conditioning is not None:
            node_heads = torch.full(
                (n_atoms,), self.head_index, dtype=torch.int64, device=energy.device
            )
            embedded = self.mace.node_embedding(node_attrs) + conditioning
            embedding_energy = self.mace.embedding_readout(embedded, node_heads)
            energy = energy + self.embedding_energy_factor * embedding_energy[
                :, self.head_index
            ].reshape(-1)
        if hasattr(self.mace, "pair_repulsion_fn"):
            lengths = torch.linalg.norm(vectors, dim=-1, keepdim=True)
            energy = energy + self.mace.pair_repulsion_fn(
                lengths, node_attrs, edge_index, self.mace.atomic_numbers
            )
        return energy

    def _check_types(self, types: torch.Tensor) -> torch.Tensor:
        in_range = types < self.type_to_index.shape[0]
        species = torch.where(
            in_range,
            self.type_to_index[torch.where(in_range, types, 0)],
            -1,
        )
        if bool((species < 0).any()):
            unknown: List[int] = (
                torch.unique(types[species < 0]).to(torch.int64).tolist()
            )
            raise ValueError(
                "this model was not trained on atomic types "
                + str(unknown)
                + "; it knows "
                + str(self.atomic_types)
            )
        return species
