"""The ``experimental.mace`` model: MACE node features, MACE energy readout, heads."""

import logging
import types
from typing import Any, Dict, List, Literal, Optional, Tuple

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelCapabilities,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)
from metatrain.composition import CompositionModel
from metatrain.scaler import Scaler
from metatrain.utils.abc import ModelInterface
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, TargetInfo
from metatrain.utils.dtype import dtype_to_str
from metatrain.utils.hypers import raise_if_hypers_mismatch
from metatrain.utils.metadata import merge_metadata
from metatrain.utils.sum_over_atoms import sum_over_atoms

from metatrain_mace import checkpoints, finetuning, foundation, lora
from metatrain_mace._version import __version__
from metatrain_mace.batching import systems_to_graph
from metatrain_mace.builder import (
    build_mace,
    node_feature_irreps,
    set_avg_num_neighbors,
)
from metatrain_mace.checkpoint_files import save_model_atomically
from metatrain_mace.conditioning import SystemConditioning
from metatrain_mace.documentation import ModelHypers
from metatrain_mace.features import IrrepGather, SphericalFeatures
from metatrain_mace.heads import (
    EquivariantLinearBlock,
    EquivariantLinearHead,
    MLPHead,
    ReadoutHead,
    irrep_of_block,
    readout_last_layer_size,
)
from metatrain_mace.irreps_probe import produced_irreps
from metatrain_mace.mace_import import o3
from metatrain_mace.scripting import compiled_copy, tree_copy
from metatrain_mace.slicing import split_tensor_product_inputs
from metatrain_mace.targets import check_finite, check_head_target, check_target


ARCHITECTURE_NAME = "experimental.mace"
MACE_FEATURES = "mtt::aux::mace_features"


def last_layer_features_name(target_name: str) -> str:
    """Name of the auxiliary output holding the last-layer features of a target."""
    return "mtt::aux::" + target_name.replace("mtt::", "") + "_last_layer_features"


class MetaMACE(ModelInterface[ModelHypers]):
    """MACE wrapped for metatrain (package ``metatrain-mace``).

    The MACE trunk (``self.mace``, a ``mace.modules.MACE``) computes node features;
    the target named by ``mace_head_target`` is MACE's own per-atom energy readout,
    and every other target has a head in ``self.heads``. metatrain's composition
    baseline and scaler are applied on top at evaluation.

    :param hypers: model hyperparameters (see :mod:`metatrain_mace.documentation`).
    :param dataset_info: targets, atomic types and length unit of the dataset.
    """

    __checkpoint_version__ = 3
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float64, torch.float32]
    __default_metadata__ = ModelMetadata(
        references={
            "architecture": ["https://arxiv.org/abs/2206.07697"],
            "implementation": ["https://github.com/ACEsuit/mace"],
        }
    )

    # TorchScript cannot infer the types of these (possibly empty) containers
    key_labels: Dict[str, Labels]
    component_labels: Dict[str, List[List[Labels]]]
    property_labels: Dict[str, List[Labels]]
    per_atom_targets: List[str]
    readout_heads: List[str]

    def __init__(
        self,
        hypers: ModelHypers,
        dataset_info: DatasetInfo,
        mace: Optional[torch.nn.Module] = None,
    ) -> None:
        """
        :param mace: the MACE trunk of a model built from a MACE file, as stored in
            its checkpoints (the file itself is then not read again).
        """
        super().__init__(hypers, dataset_info, self.__default_metadata__)
        self.mace_head_target: str = self.hypers["mace_head_target"]
        self.from_file = hypers["mace_model"] is not None
        if self.from_file:
            if mace is None:
                mace = foundation.load_mace_file(hypers["mace_model"])
                foundation.report_ignored_hypers(
                    dict(hypers),
                    get_default_hypers(ARCHITECTURE_NAME)["model"],
                    mace,
                )
            self.mace = mace
            self.head_index: int = foundation.select_head(
                mace,
                hypers["mace_head_name"],
                foundation.default_head(hypers["mace_model"]),
            )
            foundation.check_dataset(
                mace, dataset_info, hypers["mace_model"], self.mace_head_target
            )
            # the model keeps every element of the file, not only the dataset's
            self.atomic_types: List[int] = sorted(foundation.atomic_numbers(mace))
            avg_num_neighbors = float(mace.interactions[0].avg_num_neighbors)
        else:
            check_head_target(self.mace_head_target, dataset_info)
            self.atomic_types = sorted(int(t) for t in dataset_info.atomic_types)
            self.mace = build_mace(dict(hypers), self.atomic_types)
            self.head_index = 0
            avg = self.hypers["avg_num_neighbors"]
            avg_num_neighbors = 0.0 if avg is None else float(avg)

        # total charge and spin of each structure (MACE-OMOL-style models)
        self.embedding_energy_factor = 1.0
        if hasattr(self.mace, "joint_embedding"):
            self.conditioning = SystemConditioning(
                self.mace.joint_embedding, dict(self.mace.embedding_specs)
            )
            if self.from_file:
                # MACE adds the energy of its embedding readout unscaled, while
                # metatrain's scaler multiplies the readouts by the file's scale
                _, scale = foundation.energy_baseline(self.mace, self.head_index)
                self.embedding_energy_factor = 1.0 / scale

        # a faster backward pass for the e3nn tensor products (same values)
        split_tensor_product_inputs(self.mace)
        self.r_max = float(self.mace.r_max)
        self.num_interactions = int(self.mace.num_interactions)
        self.nl_options = NeighborListOptions(
            cutoff=self.r_max, full_list=True, strict=True
        )

        # one-hot positions follow the order of MACE's own element table
        type_to_index = torch.full((max(self.atomic_types) + 1,), -1)
        for index, atomic_type in enumerate(foundation.atomic_numbers(self.mace)):
            type_to_index[atomic_type] = index
        self.register_buffer("type_to_index", type_to_index, persistent=False)
        self.register_buffer(
            "avg_num_neighbors", torch.tensor(avg_num_neighbors, dtype=torch.float64)
        )

        self.feature_irreps = node_feature_irreps(self.mace)
        scalar_index: List[int] = []
        layer_scalars: List[int] = []
        start = 0
        for product in self.mace.products:
            irreps = o3.Irreps(product.linear.irreps_out)
            layer_scalars.append(irreps.count(o3.Irrep("0e")))
            for mul, irrep in irreps:
                if irrep == o3.Irrep("0e"):
                    scalar_index.extend(range(start, start + mul))
                start += mul * irrep.dim
        self.register_buffer(
            "scalar_index", torch.tensor(scalar_index), persistent=False
        )
        self.layer_scalars = layer_scalars
        self.num_scalar_features = len(scalar_index)
        # irreps that the node features actually carry (see irreps_probe)
        self.layer_irreps = [o3.Irreps(p.linear.irreps_out) for p in self.mace.products]
        parameter = next(self.mace.parameters())
        self.produced_layer_irreps = produced_irreps(
            self._node_features,
            self.layer_irreps,
            len(self.atomic_types),
            self.r_max,
            parameter.dtype,
            parameter.device,
        )
        self.produced_irreps = sum(self.produced_layer_irreps, o3.Irreps(""))
        self.spherical_features = SphericalFeatures(
            self.layer_irreps, self.produced_layer_irreps
        )

        self.outputs: Dict[str, ModelOutput] = {
            "feature": ModelOutput(
                sample_kind="atom",
                description="invariant (0e) MACE node features of all layers",
            ),
            MACE_FEATURES: ModelOutput(
                sample_kind="atom",
                description="equivariant MACE node features of all layers, one "
                "block per irrep (see metatrain_mace.features)",
            ),
        }
        self.heads = torch.nn.ModuleDict()
        # targets whose head is a copy of MACE's readouts (see add_readout_head)
        self.readout_heads = []
        self.target_names: List[str] = []
        self.per_atom_targets: List[str] = []
        self.key_labels: Dict[str, Labels] = {}
        self.component_labels: Dict[str, List[List[Labels]]] = {}
        self.property_labels: Dict[str, List[Labels]] = {}
        # metatrain's LLPR reads one last-layer feature size for all targets: the
        # features of every target are zero-padded to the largest size, which leaves
        # LLPR uncertainties unchanged (zero features add nothing to f^T C^-1 f)
        self.last_layer_feature_sizes: Dict[str, int] = {}
        for name, info in dataset_info.targets.items():
            self._add_output(name, info)

        self.last_layer_feature_size = max(
            self.last_layer_feature_sizes.values(), default=0
        )
        self.additive_models = torch.nn.ModuleList(
            [CompositionModel.from_valid_targets(dataset_info, self.atomic_types)]
        )
        self.scaler = Scaler(
            hypers=get_default_hypers("scaler")["model"], dataset_info=dataset_info
        )
        self.single_label = Labels.single()
        self.finetune_config: Dict[str, Any] = {}
        self.has_new_targets = False
        # built and kept in float64 whatever the default dtype (a float32 MACE file
        # is cast up losslessly): MACE's coupling coefficients cast to float32 and
        # back would keep float32 accuracy and break float64 equivariance (1e-9
        # instead of 1e-14); training casts the model down when asked
        self.to(torch.float64)

    # ------------------------------------------------------------------ targets
    def _add_output(self, name: str, info: TargetInfo) -> None:
        """Add the head (or MACE readout) and the outputs of one target."""
        check_target(
            name,
            info,
            self.produced_irreps,
            self.feature_irreps,
            self.num_interactions,
        )
        if name == self.mace_head_target:
            block = info.layout.block()
            if not info.is_scalar or len(block.properties) != 1:
                raise ValueError(
                    f"'mace_head_target' is {name!r}, but MACE's readout predicts one "
                    "scalar per atom and this target has "
                    f"{len(block.properties)} properties of a non-scalar or "
                    "multi-property kind; choose an energy-like target"
                )
            self.last_layer_feature_sizes[name] = readout_last_layer_size(
                self.mace.readouts, self.layer_scalars
            )
        elif info.is_scalar:
            self.heads[name] = MLPHead(
                self.num_scalar_features,
                list(self.hypers["head_hidden_sizes"]),
                len(info.layout.block().properties),
            )
            self.last_layer_feature_sizes[name] = self.heads[name].last_layer_size
        else:
            blocks: List[EquivariantLinearBlock] = []
            irreps: List[o3.Irrep] = []
            for key, block in info.layout.items():
                if info.is_cartesian:
                    irrep = o3.Irrep("1o")
                else:
                    irrep = irrep_of_block(int(key["o3_lambda"]), int(key["o3_sigma"]))
                if irrep not in irreps:
                    irreps.append(irrep)
                blocks.append(
                    EquivariantLinearBlock(
                        self.feature_irreps,
                        irrep,
                        len(block.properties),
                        cartesian=info.is_cartesian,
                    )
                )
            gathers = [
                IrrepGather(self.layer_irreps, self.produced_layer_irreps, irrep)
                for irrep in irreps
            ]
            self.heads[name] = EquivariantLinearHead(blocks, gathers)
            self.last_layer_feature_sizes[name] = self.heads[name].last_layer_size

        self.target_names.append(name)
        if info.sample_kind == "atom":
            self.per_atom_targets.append(name)
        self.outputs[name] = ModelOutput(
            unit=info.unit,
            sample_kind="atom",
            description=info.description,
        )
        self.outputs[last_layer_features_name(name)] = ModelOutput(
            sample_kind="atom",
            description=f"invariant last layer features for {name}",
        )
        self.key_labels[name] = info.layout.keys
        self.component_labels[name] = [b.components for b in info.layout.blocks()]
        self.property_labels[name] = [b.properties for b in info.layout.blocks()]

    def add_readout_head(self, name: str) -> None:
        """Give the energy-like target ``name`` a copy of MACE's readouts (weights
        included) as its head, in place of its MLP head: the new target starts
        from the predictions of the file's head (MACE's multi-head fine-tuning)."""
        info = self.dataset_info.targets.get(name)
        if name not in self.heads or info is None:
            raise ValueError(
                f"cannot give {name!r} a copy of MACE's readout: it is not a target "
                f"with a head of this model (targets: {self.target_names})"
            )
        if not info.is_scalar or len(info.layout.block().properties) != 1:
            raise ValueError(
                f"cannot initialise the head of {name!r} from MACE's readout of "
                f"{self.mace_head_target!r}: the readout predicts one scalar per "
                "atom, and this target is not a single scalar (an energy)"
            )
        self.heads[name] = ReadoutHead(
            self.mace.readouts,
            [irreps.dim for irreps in self.layer_irreps],
            self.layer_scalars,
            self.head_index,
        )
        if name not in self.readout_heads:
            self.readout_heads.append(name)
        self.last_layer_feature_sizes[name] = self.heads[name].last_layer_size
        self.last_layer_feature_size = max(self.last_layer_feature_sizes.values())

    def supported_outputs(self) -> Dict[str, ModelOutput]:
        return self.outputs

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.nl_options]

    def requested_inputs(self) -> Dict[str, ModelOutput]:
        """Per-system inputs: ``charge`` and ``spin_multiplicity`` for a MACE
        conditioned on them (see :mod:`metatrain_mace.conditioning`)."""
        if not hasattr(self, "conditioning"):
            return {}
        return {
            name: ModelOutput(unit="", sample_kind="system")
            for name in self.conditioning.inputs.values()
        }

    def restart(
        self, dataset_info: DatasetInfo, model_hypers: Optional[Dict[str, Any]] = None
    ) -> "MetaMACE":
        if self.from_file:
            foundation.check_dataset(
                self.mace, dataset_info, self.hypers["mace_model"], None
            )
        if model_hypers is not None:
            raise_if_hypers_mismatch(
                self.hypers,
                model_hypers,
                default_hypers=get_default_hypers(ARCHITECTURE_NAME)["model"],
            )
        merged = self.dataset_info.union(dataset_info)
        new_types = sorted(set(merged.atomic_types) - set(self.atomic_types))
        if new_types:
            raise ValueError(
                f"the new dataset contains atomic types {new_types} that this model "
                f"was not built for (it knows {self.atomic_types}); MACE cannot add "
                "element embeddings after training started"
            )
        new_targets = {
            name: info
            for name, info in merged.targets.items()
            if name not in self.dataset_info.targets
        }
        self.has_new_targets = len(new_targets) > 0
        for name, info in new_targets.items():
            self._add_output(name, info)
        self.last_layer_feature_size = max(
            self.last_layer_feature_sizes.values(), default=0
        )
        self.dataset_info = merged
        self.additive_models[0] = self.additive_models[0].restart(
            dataset_info=DatasetInfo(
                length_unit=dataset_info.length_unit,
                atomic_types=self.atomic_types,
                targets={
                    name: info
                    for name, info in dataset_info.targets.items()
                    if CompositionModel.is_valid_target(name, info)
                },
            )
        )
        self.scaler = self.scaler.restart(dataset_info)
        return self

    # ------------------------------------------------------------------ forward
    def set_avg_num_neighbors(self, value: float) -> None:
        """Store the neighbour-sum normalisation and push it into MACE."""
        self.avg_num_neighbors.fill_(float(value))
        set_avg_num_neighbors(self.mace, float(value))

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

    def _as_tensor_map(
        self,
        name: str,
        blocks: List[torch.Tensor],
        samples: Labels,
        output: ModelOutput,
        selected_atoms: Optional[Labels],
    ) -> TensorMap:
        tensor_blocks: List[TensorBlock] = []
        for i, values in enumerate(blocks):
            tensor_blocks.append(
                TensorBlock(
                    values=values,
                    samples=samples,
                    components=self.component_labels[name][i],
                    properties=self.property_labels[name][i],
                )
            )
        return self._finish(
            TensorMap(self.key_labels[name], tensor_blocks), output, selected_atoms
        )

    def _pad(self, last_layer_features: torch.Tensor) -> torch.Tensor:
        """Zero-pad last-layer features to the common ``last_layer_feature_size``."""
        missing = self.last_layer_feature_size - last_layer_features.shape[-1]
        return torch.nn.functional.pad(last_layer_features, (0, missing))

    def _features_map(
        self,
        values: torch.Tensor,
        samples: Labels,
        output: ModelOutput,
        selected_atoms: Optional[Labels],
    ) -> TensorMap:
        properties = Labels(
            names=["feature"],
            values=torch.arange(values.shape[-1], device=values.device).reshape(-1, 1),
            assume_unique=True,
        )
        block = TensorBlock(
            values=values, samples=samples, components=[], properties=properties
        )
        return self._finish(
            TensorMap(self.single_label, [block]), output, selected_atoms
        )

    def _finish(
        self, tensor: TensorMap, output: ModelOutput, selected_atoms: Optional[Labels]
    ) -> TensorMap:
        if selected_atoms is not None:
            tensor = mts.slice(tensor, axis="samples", selection=selected_atoms)
        if output.sample_kind == "system":
            tensor = sum_over_atoms(tensor)
        return tensor

    def _move_labels_to_device(self, device: torch.device) -> None:
        self.single_label = self.single_label.to(device)
        self.key_labels = {k: v.to(device) for k, v in self.key_labels.items()}
        self.component_labels = {
            k: [[c.to(device) for c in block] for block in v]
            for k, v in self.component_labels.items()
        }
        self.property_labels = {
            k: [p.to(device) for p in v] for k, v in self.property_labels.items()
        }

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        result: Dict[str, TensorMap] = {}
        if len(outputs) == 0:
            return result
        device = systems[0].positions.device
        if self.single_label.values.device != device:
            self._move_labels_to_device(device)
        outputs, summed = self._per_atom_requests(outputs)

        types, system_index, atom_index, edge_index, vectors = systems_to_graph(
            systems, self.nl_options
        )
        species = self._check_types(types)
        node_attrs = torch.nn.functional.one_hot(
            species, num_classes=len(self.atomic_types)
        ).to(vectors.dtype)
        # e3nn puts the polar axis along y; feeding (y, z, x) makes every l-block of
        # the node features follow the real spherical harmonics convention of
        # metatensor (m = -l..l with z as polar axis)
        vectors = vectors[:, [1, 2, 0]]
        conditioning: Optional[torch.Tensor] = None
        if hasattr(self, "conditioning"):
            conditioning = self.conditioning(systems, system_index, vectors.dtype)
        features = self._node_features(node_attrs, edge_index, vectors, conditioning)
        samples = Labels(
            ["system", "atom"],
            torch.stack([system_index, atom_index], dim=1).to(torch.int32),
            assume_unique=True,
        )
        # the concatenated features feed the heads and the "feature" output only
        all_features = features[-1]
        scalar_features = features[-1]
        if (
            "feature" in outputs
            or "mtt::aux::mace_features" in outputs
            or self._needs_heads(outputs)
        ):
            all_features = torch.cat(features, dim=-1)
            scalar_features = all_features.index_select(1, self.scalar_index)

        if "feature" in outputs:
            result["feature"] = self._features_map(
                scalar_features, samples, outputs["feature"], selected_atoms
            )

        if "mtt::aux::mace_features" in outputs:
            result["mtt::aux::mace_features"] = self._finish(
                self.spherical_features(all_features, samples),
                outputs["mtt::aux::mace_features"],
                selected_atoms,
            )

        head_target = self.mace_head_target
        head_llf = last_layer_features_name(head_target)
        if head_target in self.target_names and (
            head_target in outputs or head_llf in outputs
        ):
            energy, llf = self._mace_energy(
                features,
                node_attrs,
                edge_index,
                vectors,
                head_llf in outputs,
                conditioning,
            )
            if head_target in outputs:
                result[head_target] = self._as_tensor_map(
                    head_target, [energy], samples, outputs[head_target], selected_atoms
                )
            if head_llf in outputs:
                result[head_llf] = self._features_map(
                    self._pad(llf), samples, outputs[head_llf], selected_atoms
                )

        for name, head in self.heads.items():
            llf_name = last_layer_features_name(name)
            if name in outputs or llf_name in outputs:
                blocks, llf = head(all_features, scalar_features)
                if name in self.readout_heads:
                    # MACE adds ZBL and the embedding readout to every head
                    blocks[0] = blocks[0] + self._extra_energy(
                        node_attrs, edge_index, vectors, conditioning
                    ).unsqueeze(-1)
                if name in outputs:
                    result[name] = self._as_tensor_map(
                        name, blocks, samples, outputs[name], selected_atoms
                    )
                if llf_name in outputs:
                    result[llf_name] = self._features_map(
                        self._pad(llf), samples, outputs[llf_name], selected_atoms
                    )

        if not self.training:
            result = self._add_baselines(systems, outputs, result, selected_atoms)
        for name in summed:
            result[name] = sum_over_atoms(result[name])
        if not self.training and head_target in result:
            check_finite(head_target, result[head_target])
        return result

    def _per_atom_requests(
        self, outputs: Dict[str, ModelOutput]
    ) -> Tuple[Dict[str, ModelOutput], List[str]]:
        """Per-atom targets asked per structure are computed per atom, and summed
        after metatrain's scaler and baseline (which work per atomic type)."""
        summed: List[str] = []
        requests: Dict[str, ModelOutput] = {}
        for name, output in outputs.items():
            if name in self.per_atom_targets and output.sample_kind == "system":
                summed.append(name)
                output = ModelOutput(
                    quantity=output.quantity,
                    unit=output.unit,
                    sample_kind="atom",
                    explicit_gradients=output.explicit_gradients,
                    description=output.description,
                )
            requests[name] = output
        return requests, summed

    def _needs_heads(self, outputs: Dict[str, ModelOutput]) -> bool:
        for name in self.heads.keys():
            if name in outputs or last_layer_features_name(name) in outputs:
                return True
        return False

    def _add_baselines(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        result: Dict[str, TensorMap],
        selected_atoms: Optional[Labels],
    ) -> Dict[str, TensorMap]:
        """Undo the target scaling and add the composition baseline (evaluation)."""
        result = self.scaler.apply_scales(
            systems,
            result,
            selected_atoms=selected_atoms,
            use_per_target_scales=True,
            use_per_property_scales=True,
        )
        for additive_model in self.additive_models:
            requested: Dict[str, ModelOutput] = {}
            for name, output in outputs.items():
                if name in additive_model.outputs:
                    requested[name] = output
            contributions = additive_model(systems, requested, selected_atoms)
            for name, contribution in contributions.items():
                blocks: List[TensorBlock] = []
                for key, block in result[name].items():
                    values = block.values
                    if key in contribution.keys:
                        values = values + contribution.block(key).values.to(
                            dtype=values.dtype, device=values.device
                        )
                    blocks.append(
                        TensorBlock(
                            values=values,
                            samples=block.samples,
                            components=block.components,
                            properties=block.properties,
                        )
                    )
                result[name] = TensorMap(result[name].keys, blocks)
        return result

    # ------------------------------------------------------------------ checkpoints
    def get_checkpoint(self) -> Dict[str, Any]:
        state_dict = self.state_dict()
        return {
            "architecture_name": ARCHITECTURE_NAME,
            "implementation": f"metatrain-mace {__version__}",
            "model_ckpt_version": self.__checkpoint_version__,
            "metadata": self.metadata,
            "model_data": {
                "model_hypers": self.hypers,
                "dataset_info": self.dataset_info,
                # a trunk loaded from a MACE file travels with the checkpoint, so
                # that the file is not needed any more
                "mace_trunk": self.mace if self.from_file else None,
            },
            "epoch": None,
            "best_epoch": None,
            "model_state_dict": state_dict,
            "best_model_state_dict": state_dict,
            "finetune_config": self.finetune_config,
        }

    @classmethod
    def load_checkpoint(
        cls,
        checkpoint: Dict[str, Any],
        context: Literal["restart", "finetune", "export"],
    ) -> "MetaMACE":
        if context == "restart":
            logging.info(f"Using latest model from epoch {checkpoint['epoch']}")
            state_dict = checkpoint["model_state_dict"]
        elif context in ("finetune", "export"):
            logging.info(f"Using best model from epoch {checkpoint['best_epoch']}")
            state_dict = checkpoint["best_model_state_dict"]
            if state_dict is None:
                state_dict = checkpoint["model_state_dict"]
        else:
            raise ValueError(f"unknown checkpoint loading context {context!r}")

        model_data = checkpoint["model_data"]
        model = cls(
            model_data["model_hypers"],
            model_data["dataset_info"],
            mace=model_data.get("mace_trunk"),
        )
        # readout heads and LoRA adapters are modules of their own: insert them
        # before the weights (in the order fine-tuning added them)
        finetuning.restore_readout_heads(model, checkpoint.get("finetune_config"))
        lora.restore_adapters(model, checkpoint.get("finetune_config") or {})
        dtype = state_dict["avg_num_neighbors"].dtype
        model.to(dtype).load_state_dict(state_dict)
        if float(model.avg_num_neighbors) > 0:
            model.set_avg_num_neighbors(float(model.avg_num_neighbors))
        model.additive_models[0].sync_tensor_maps()
        model.scaler.sync_tensor_maps()
        model.finetune_config = checkpoint.get("finetune_config", {})
        model.metadata = merge_metadata(model.metadata, checkpoint.get("metadata"))
        return model

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        return checkpoints.upgrade(
            checkpoint, "model", cls.__checkpoint_version__, checkpoints.MODEL_UPDATES
        )

    # ------------------------------------------------------------------ export
    def __prepare_scriptable__(self) -> "MetaMACE":
        """A shallow copy whose e3nn/MACE submodules are compiled as e3nn requires.

        ``torch.jit.script`` (used by metatomic to save the exported model) calls this
        first; e3nn modules cannot be scripted directly. The copy shares the
        parameters and leaves this model usable in eager mode.
        """
        return compiled_copy(self, drop=[("mace", "joint_embedding")])

    def export(self, metadata: Optional[ModelMetadata] = None) -> AtomisticModel:
        dtype = next(self.parameters()).dtype
        if dtype not in self.__supported_dtypes__:
            raise ValueError(f"unsupported dtype {dtype} for metatrain-mace")
        self.to(dtype)
        # the composition weights are TensorMaps that torch cannot move by itself
        self.additive_models[0].weights_to(torch.device("cpu"), torch.float64)
        capabilities = ModelCapabilities(
            outputs=self.outputs,
            atomic_types=self.atomic_types,
            interaction_range=self.num_interactions * self.r_max,
            length_unit=self.dataset_info.length_unit,
            supported_devices=self.__supported_devices__,
            dtype=dtype_to_str(dtype),
        )
        # metatomic freezes the parameters of what it wraps: give it a copy sharing
        # the weights, so that this model can still be trained afterwards
        exported = AtomisticModel(
            tree_copy(self).eval(),
            merge_metadata(self.metadata, metadata),
            capabilities,
        )
        # whoever saves it (metatrain's mtt train and mtt export, this package)
        # writes a temporary file and renames it: a crash leaves no half model
        exported.save = types.MethodType(save_model_atomically, exported)
        return exported
