"""The ``experimental.mace`` model: MACE node features, MACE energy readout, heads.

The class is assembled from mixins, one idea each:
:mod:`metatrain_mace.trunk.evaluation`
(running MACE), :mod:`metatrain_mace.heads.registration` (targets and their heads),
:mod:`metatrain_mace.heads.assembly` (TensorMaps, scaler and baseline) and
:mod:`metatrain_mace.model_io` (checkpoints and export). This module holds the
construction and the forward pass.
"""

from typing import Any, Dict, List, Optional

import torch
from metatensor.torch import Labels, TensorMap
from metatomic.torch import ModelMetadata, ModelOutput, NeighborListOptions, System
from metatrain.composition import CompositionModel
from metatrain.scaler import Scaler
from metatrain.utils.abc import ModelInterface
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.sum_over_atoms import sum_over_atoms

from metatrain_mace.checkpoints import ARCHITECTURE_NAME  # noqa: F401 (re-exported)
from metatrain_mace.documentation import ModelHypers
from metatrain_mace.heads.assembly import OutputAssembly
from metatrain_mace.heads.features import SphericalFeatures
from metatrain_mace.heads.registration import TargetRegistration
from metatrain_mace.heads.targets import (  # noqa: F401 (re-exported)
    MACE_FEATURES,
    check_finite,
    check_head_target,
    last_layer_features_name,
)
from metatrain_mace.mace_import import o3
from metatrain_mace.model_io import CheckpointsAndExport
from metatrain_mace.trunk import cueq, foundation
from metatrain_mace.trunk.build import build_mace, node_feature_irreps
from metatrain_mace.trunk.conditioning import SystemConditioning
from metatrain_mace.trunk.evaluation import TrunkPass
from metatrain_mace.trunk.graph import systems_to_graph
from metatrain_mace.trunk.irreps import produced_irreps
from metatrain_mace.trunk.slicing import split_tensor_product_inputs


class MetaMACE(
    TrunkPass,
    TargetRegistration,
    OutputAssembly,
    CheckpointsAndExport,
    ModelInterface[ModelHypers],
):
    """MACE wrapped for metatrain (package ``metatrain-mace``).

    The MACE trunk (``self.mace``, a ``mace.modules.MACE``) computes node features;
    the target named by ``mace_head_target`` is MACE's own per-atom energy readout,
    and every other target has a head in ``self.heads``. metatrain's composition
    baseline and scaler are applied on top at evaluation.

    :param hypers: model hyperparameters (see :mod:`metatrain_mace.documentation`).
    :param dataset_info: targets, atomic types and length unit of the dataset.
    """

    __checkpoint_version__ = 4
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
    atomic_basis_layouts: Dict[str, TensorMap]
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
            if hypers["enable_cueq"]:
                mace = cueq.convert(mace, True)
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
        self.num_scalar_features = len(scalar_index)
        # set on --restart (the optimizer state belongs to the current backend)
        self.loaded_for_restart = False
        self._set_layout()
        # irreps that the node features actually carry (see irreps_probe)
        self.layer_irreps = [
            o3.Irreps(str(p.linear.irreps_out)) for p in self.mace.products
        ]
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
                "block per irrep (see metatrain_mace.heads.features)",
            ),
        }
        self.heads = torch.nn.ModuleDict()
        # targets whose head is a copy of MACE's readouts (see add_readout_head)
        self.readout_heads = []
        self.target_names: List[str] = []
        self.per_atom_targets: List[str] = []
        self.key_labels: Dict[str, Labels] = {}
        # layouts of atomic-basis targets (one block per atomic type), see assembly
        self.atomic_basis_layouts: Dict[str, TensorMap] = {}
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

    def supported_outputs(self) -> Dict[str, ModelOutput]:
        return self.outputs

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.nl_options]

    def requested_inputs(self) -> Dict[str, ModelOutput]:
        """Per-system inputs: ``charge`` and ``spin_multiplicity`` for a MACE
        conditioned on them (see :mod:`metatrain_mace.trunk.conditioning`)."""
        if not hasattr(self, "conditioning"):
            return {}
        return {
            name: ModelOutput(unit="", sample_kind="system")
            for name in self.conditioning.inputs.values()
        }

    # ------------------------------------------------------------------ forward
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
            if self.uses_cueq:
                all_features = all_features.index_select(1, self.feature_order)
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
