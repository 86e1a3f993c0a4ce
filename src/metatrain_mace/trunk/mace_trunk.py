"""The MACE trunk of :class:`~metatrain_mace.model.MetaMACE`, on plain tensors.

:class:`MaceTrunk` owns the MACE module (``mace``), the charge/spin conditioning of
MACE-OMOL-style models, the element table and the layout of the node features. It
computes the node features of every layer, MACE's own readout energy and the energy
MACE adds outside its readouts (ZBL, embedding readout), and switches the backend
between e3nn and cuEquivariance. The layout of its node features is described once,
at construction, by a :class:`FeatureLayout` that the heads are built from.
"""

import dataclasses
import logging
from typing import Dict, List, Optional, Tuple

import torch
from metatomic.torch import System

from metatrain_mace.mace_import import o3
from metatrain_mace.trunk import backend, cueq, foundation
from metatrain_mace.trunk.build import node_feature_irreps, set_avg_num_neighbors
from metatrain_mace.trunk.conditioning import SystemConditioning, system_input
from metatrain_mace.trunk.irreps import probe_cluster, produced_irreps
from metatrain_mace.trunk.response import ResponseReadout, readout_kind
from metatrain_mace.trunk.slicing import split_tensor_product_inputs


@dataclasses.dataclass(frozen=True)
class FeatureLayout:
    """The node features of a trunk, as the heads read them (e3nn layout: the
    features of all layers concatenated, each layer multiplicity-major).

    :param feature_irreps: declared irreps of the concatenated features.
    :param layer_irreps: declared irreps of each layer.
    :param produced_layer_irreps: irreps of each layer that the features actually
        carry (see :mod:`metatrain_mace.trunk.irreps`).
    :param produced_irreps: the concatenation of ``produced_layer_irreps``.
    :param layer_scalars: number of ``0e`` channels of each layer.
    :param num_scalar_features: number of ``0e`` channels of all layers.
    :param num_interactions: number of MACE layers.
    """

    feature_irreps: o3.Irreps
    layer_irreps: Tuple[o3.Irreps, ...]
    produced_layer_irreps: Tuple[o3.Irreps, ...]
    produced_irreps: o3.Irreps
    layer_scalars: Tuple[int, ...]
    num_scalar_features: int
    num_interactions: int


class MaceTrunk(torch.nn.Module):
    """MACE's node features and energy readout on a graph of plain tensors.

    :param mace: the MACE module (``mace.modules.MACE`` or a subclass, e3nn or
        cuEquivariance).
    :param atomic_types: atomic numbers the model knows (sorted).
    :param head_index: MACE head whose readouts give the energy.
    :param avg_num_neighbors: normalisation of the neighbour sums (0: not set yet).
    :param embedding_energy_factor: factor of the energy of MACE's charge/spin
        embedding readout (MACE adds it unscaled, metatrain's scaler multiplies the
        model's energy by the file's scale).
    """

    def __init__(
        self,
        mace: torch.nn.Module,
        atomic_types: List[int],
        head_index: int,
        avg_num_neighbors: float,
        embedding_energy_factor: float = 1.0,
    ) -> None:
        super().__init__()
        self.mace = mace
        self.atomic_types = atomic_types
        self.head_index = head_index
        self.embedding_energy_factor = embedding_energy_factor
        # total charge and spin of each structure (MACE-OMOL-style models)
        if hasattr(mace, "joint_embedding"):
            self.conditioning = SystemConditioning(
                mace.joint_embedding, dict(mace.embedding_specs)
            )

        # what MACE's readouts predict: an energy, or (mace-torch's dipole
        # classes) dipoles, polarizabilities and energies, turned into per-atom
        # Cartesian contributions by self.response
        self.readout_kind = readout_kind(mace)
        if self.readout_kind != "energy":
            change_of_basis = getattr(mace, "change_of_basis", torch.zeros(0))
            self.response = ResponseReadout(self.readout_kind, change_of_basis)

        # a faster backward pass for the e3nn tensor products (same values)
        split_tensor_product_inputs(self.mace)
        self.r_max = float(self.mace.r_max)
        self.num_interactions = int(self.mace.num_interactions)

        # one-hot positions follow the order of MACE's own element table
        type_to_index = torch.full((max(atomic_types) + 1,), -1)
        for index, atomic_type in enumerate(foundation.atomic_numbers(self.mace)):
            type_to_index[atomic_type] = index
        self.register_buffer("type_to_index", type_to_index, persistent=False)
        self.register_buffer(
            "avg_num_neighbors", torch.tensor(avg_num_neighbors, dtype=torch.float64)
        )

        feature_irreps = node_feature_irreps(self.mace)
        self.feature_irreps = feature_irreps
        scalar_index: List[int] = []
        layer_scalars: List[int] = []
        start = 0
        for product in self.mace.products:
            irreps = o3.Irreps(str(product.linear.irreps_out))
            layer_scalars.append(irreps.count(o3.Irrep("0e")))
            for mul, irrep in irreps:
                if irrep == o3.Irrep("0e"):
                    scalar_index.extend(range(start, start + mul))
                start += mul * irrep.dim
        self.register_buffer(
            "scalar_index", torch.tensor(scalar_index), persistent=False
        )
        self.layer_scalars = layer_scalars
        self._set_layout()
        # irreps that the node features actually carry (see irreps_probe)
        layer_irreps = [o3.Irreps(str(p.linear.irreps_out)) for p in self.mace.products]
        parameter = next(self.mace.parameters())
        produced = produced_irreps(
            self.forward,
            layer_irreps,
            len(atomic_types),
            self.r_max,
            parameter.dtype,
            parameter.device,
        )
        self.layout = FeatureLayout(
            feature_irreps=feature_irreps,
            layer_irreps=tuple(layer_irreps),
            produced_layer_irreps=tuple(produced),
            produced_irreps=sum(produced, o3.Irreps("")),
            layer_scalars=tuple(layer_scalars),
            num_scalar_features=len(scalar_index),
            num_interactions=self.num_interactions,
        )

    # ------------------------------------------------------- outside TorchScript
    def conditioning_inputs(self) -> List[str]:
        """Names of the per-system inputs the trunk reads: those of the
        conditioning, and the total charge that the charges of an
        ``AtomicDielectricMACE`` add up to."""
        names: List[str] = []
        if hasattr(self, "conditioning"):
            names.extend(self.conditioning.inputs.values())
        if self.readout_kind == "dielectric" and "charge" not in names:
            names.append("charge")
        return names

    def set_avg_num_neighbors(self, value: float) -> None:
        """Store the neighbour-sum normalisation and push it into MACE."""
        self.avg_num_neighbors.fill_(float(value))
        set_avg_num_neighbors(self.mace, float(value))

    def _set_layout(self) -> None:
        """Follow the layout of the node features: cuEquivariance keeps them as
        (irrep, multiplicity), the heads read e3nn's (multiplicity, irrep)."""
        self.uses_cueq = backend.is_cueq(self.mace)
        if self.uses_cueq:
            order = cueq.mul_ir_order(self.feature_irreps)
        else:
            order = torch.arange(self.feature_irreps.dim)
        self.register_buffer(
            "feature_order", order.to(self.scalar_index.device), persistent=False
        )

    def convert(self, enable_cueq: bool) -> None:
        """Move MACE to cuEquivariance (``True``) or e3nn, weights included."""
        self.mace = cueq.convert(self.mace, enable_cueq)
        if not enable_cueq:
            split_tensor_product_inputs(self.mace)
        self._set_layout()

    def check_parity(self, other: "MaceTrunk", tolerance: float) -> float:
        """Largest relative difference of the node features of this trunk and
        ``other`` on a random cluster; raises above ``tolerance``."""
        parameter = next(self.mace.parameters())
        graph = probe_cluster(
            len(self.atomic_types), self.r_max, parameter.dtype, parameter.device
        )
        with torch.no_grad():
            mine = torch.cat(self(*graph), dim=-1)[:, self.feature_order]
            theirs = torch.cat(other(*graph), dim=-1)[:, other.feature_order]
        error = float((mine - theirs).abs().max() / theirs.abs().max().clamp_min(1e-30))
        if error > tolerance:
            raise RuntimeError(
                f"the e3nn and cuEquivariance trunks disagree: relative error "
                f"{error:.2e} > {tolerance:.0e}; please report this with your model"
            )
        logging.info(f"e3nn and cuEquivariance trunks agree to {error:.1e} (relative)")
        return error

    # --------------------------------------------------------- compiled methods
    def node_attrs(self, types: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """One-hot element attributes of the atoms; refuses unknown elements."""
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
        return torch.nn.functional.one_hot(
            species, num_classes=len(self.atomic_types)
        ).to(dtype)

    def condition(
        self, systems: List[System], system_index: torch.Tensor, dtype: torch.dtype
    ) -> Optional[torch.Tensor]:
        """Per-atom embedding of the total charge and spin (``None`` without)."""
        if hasattr(self, "conditioning"):
            return self.conditioning(systems, system_index, dtype)
        return None

    def forward(
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

    def concatenated(
        self, features: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The features of all layers in e3nn layout, and their scalar channels."""
        all_features = torch.cat(features, dim=-1)
        if self.uses_cueq:
            all_features = all_features.index_select(1, self.feature_order)
        return all_features, all_features.index_select(1, self.scalar_index)

    def readout_energy(
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
        energy = energy + self.extra_energy(
            node_attrs, edge_index, vectors, conditioning
        )
        if len(last_layer) == 0:
            return energy.unsqueeze(-1), energy.new_zeros((n_atoms, 0))
        return energy.unsqueeze(-1), torch.cat(last_layer, dim=-1)

    def response_outputs(
        self,
        features: List[torch.Tensor],
        positions: torch.Tensor,
        system_index: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Per-atom energy, dipole and polarizability of the readouts of a
        dipole-kind MACE (see :class:`~metatrain_mace.trunk.response.ResponseReadout`;
        only compiled for those)."""
        summed = torch.zeros(0, dtype=positions.dtype, device=positions.device)
        n_readouts = len(self.mace.readouts)
        for i, readout in enumerate(self.mace.readouts):
            layer = len(features) - 1 if n_readouts == 1 else i
            value = readout(features[layer])
            summed = value if i == 0 else summed + value
        return self.response(summed, positions, system_index, total_charge)

    def total_charge(self, systems: List[System]) -> torch.Tensor:
        """Total charge of every system (metatomic's ``charge`` input, 0 where
        absent, as in MACE)."""
        return system_input(systems, "charge", 0.0)

    def extra_energy(
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
