"""The ``experimental.mace`` model: MACE node features, MACE energy readout, heads.

:class:`MetaMACE` composes three parts and converts between metatomic's Systems and
TensorMaps and their plain tensors:

- the trunk (:class:`~metatrain_mace.trunk.mace_trunk.MaceTrunk`, ``self.trunk``):
  MACE's node features of every layer and MACE's own energy readout;
- the heads (:class:`~metatrain_mace.heads.target_heads.TargetHeads`,
  ``self.heads``): one head per target other than ``mace_head_target``;
- the assembly (:class:`~metatrain_mace.heads.assembly.OutputAssembly`,
  ``self.assembly``): the labels of the targets and the TensorMaps built with them;

and metatrain's scaler and composition baseline (``self.scaler``,
``self.additive_models``). It also saves, loads and exports itself.
"""

import logging
import types
from typing import Any, Dict, List, Literal, Optional

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

from metatrain_mace import checkpoints, records
from metatrain_mace._version import __version__
from metatrain_mace.checkpoints import ARCHITECTURE_NAME  # noqa: F401 (re-exported)
from metatrain_mace.documentation import ModelHypers
from metatrain_mace.finetune import lora
from metatrain_mace.finetune.strategies import restore_readout_heads
from metatrain_mace.heads.assembly import OutputAssembly
from metatrain_mace.heads.features import SphericalFeatures
from metatrain_mace.heads.long_range import LongRangeEnergy
from metatrain_mace.heads.target_heads import TargetHeads
from metatrain_mace.heads.targets import (  # noqa: F401 (re-exported)
    MACE_FEATURES,
    check_finite,
    check_head_target,
    last_layer_features_name,
)
from metatrain_mace.trunk import backend, cueq, foundation
from metatrain_mace.trunk.build import build_mace
from metatrain_mace.trunk.graph import systems_to_graph
from metatrain_mace.trunk.mace_trunk import MaceTrunk
from metatrain_mace.trunk.response import OUTPUTS, READOUT_HYPERS, readout_kind
from metatrain_mace.trunk.scripting import (
    compiled_copy,
    save_model_atomically,
    tree_copy,
)


class MetaMACE(ModelInterface[ModelHypers]):
    """MACE wrapped for metatrain (package ``metatrain-mace``).

    The MACE trunk (``self.trunk``, holding a ``mace.modules.MACE`` as
    ``self.trunk.mace``) computes node features; the target named by
    ``mace_head_target`` is MACE's own per-atom energy readout (for mace-torch's
    dipole classes, ``mace_dipole_target`` and ``mace_polarizability_target`` are
    their readouts' dipoles and polarizabilities, see
    :mod:`metatrain_mace.trunk.response`), and every other target has a head in
    ``self.heads``. metatrain's composition baseline and scaler are applied on top
    at evaluation.

    :param hypers: model hyperparameters (see :mod:`metatrain_mace.documentation`).
    :param dataset_info: targets, atomic types and length unit of the dataset.
    """

    __checkpoint_version__ = 7
    # TorchScript cannot infer the type of a (possibly empty) list
    spherical_dipoles: List[str]
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float64, torch.float32]
    __default_metadata__ = ModelMetadata(
        references={
            "architecture": ["https://arxiv.org/abs/2206.07697"],
            "implementation": ["https://github.com/ACEsuit/mace"],
        }
    )

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
        self.from_file = hypers["mace_model"] is not None
        embedding_energy_factor = 1.0
        if self.from_file:
            if mace is None:
                mace = foundation.load_mace_file(hypers["mace_model"])
                foundation.report_ignored_hypers(
                    dict(hypers),
                    get_default_hypers(ARCHITECTURE_NAME)["model"],
                    mace,
                )
            kind = readout_kind(mace)
            if hypers["enable_cueq"]:
                if kind != "energy":
                    raise ValueError(
                        f"'enable_cueq: true', but {hypers['mace_model']!r} holds a "
                        f"{type(mace).__name__}, which mace-torch builds with e3nn "
                        "only: set 'enable_cueq: false'"
                    )
                mace = cueq.convert(mace, True)
            head_index = foundation.select_head(
                mace,
                hypers["mace_head_name"],
                foundation.default_head(hypers["mace_model"]),
            )
            self.readout_targets = self._readout_targets(kind)
            foundation.check_dataset(
                mace, dataset_info, hypers["mace_model"], self.readout_targets
            )
            # the model keeps every element of the file, not only the dataset's
            self.atomic_types: List[int] = sorted(foundation.atomic_numbers(mace))
            avg_num_neighbors = float(mace.interactions[0].avg_num_neighbors)
            if hasattr(mace, "joint_embedding"):
                # MACE adds the energy of its embedding readout unscaled, while
                # metatrain's scaler multiplies the readouts by the file's scale
                _, scale = foundation.energy_baseline(mace, head_index)
                embedding_energy_factor = 1.0 / scale
        else:
            self.readout_targets = self._readout_targets("energy")
            check_head_target(hypers["mace_head_target"], dataset_info)
            self.atomic_types = sorted(int(t) for t in dataset_info.atomic_types)
            mace = build_mace(dict(hypers), self.atomic_types)
            head_index = 0
            avg = self.hypers["avg_num_neighbors"]
            avg_num_neighbors = 0.0 if avg is None else float(avg)

        self.trunk = MaceTrunk(
            mace,
            self.atomic_types,
            head_index,
            avg_num_neighbors,
            embedding_energy_factor,
        )
        self.r_max = self.trunk.r_max
        self.num_interactions = self.trunk.num_interactions
        self.nl_options = NeighborListOptions(
            cutoff=self.r_max, full_list=True, strict=True
        )
        layout = self.trunk.layout
        self.spherical_features = SphericalFeatures(
            list(layout.layer_irreps), list(layout.produced_layer_irreps)
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
        self.heads = TargetHeads(
            layout,
            list(self.hypers["head_hidden_sizes"]),
            self.readout_targets,
            hasattr(self.trunk, "response"),
            self.atomic_types,
            dataset_info.length_unit,
        )
        long_range = self.hypers["long_range"]
        if long_range["enable"]:
            if self.from_file:
                raise ValueError(
                    "'long_range: {enable: true}' is for models built from "
                    "hyperparameters; a model from 'mace_model' keeps the file's "
                    "architecture. Remove 'long_range' or 'mace_model'"
                )
            # a per-atom energy from all-distance Coulomb interactions of latent
            # charges, added to MACE's readout (see heads.long_range)
            self.long_range = LongRangeEnergy(
                long_range, layout.num_scalar_features, self.nl_options
            )
        self.assembly = OutputAssembly()
        self.target_names: List[str] = []
        # dipole targets of a dipole class given as spherical blocks (m = -1, 0, 1
        # are y, z, x), and where their components are among (x, y, z)
        self.spherical_dipoles: List[str] = []
        self.register_buffer(
            "xyz_to_spherical", torch.tensor([1, 2, 0]), persistent=False
        )
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
        self.finetune_config: Dict[str, Any] = {}
        # built and kept in float64 whatever the default dtype (a float32 MACE file
        # is cast up losslessly): MACE's coupling coefficients cast to float32 and
        # back would keep float32 accuracy and break float64 equivariance (1e-9
        # instead of 1e-14); training casts the model down when asked
        self.to(torch.float64)

    def _readout_targets(self, kind: str) -> Dict[str, str]:
        """The targets of the outputs of MACE's readouts of ``kind`` (see
        :mod:`metatrain_mace.trunk.response`), from the ``mace_*_target`` hypers;
        sets ``mace_head_target``, the target of MACE's energy readout (``""``
        when the readouts predict no energy)."""
        names = {output: self.hypers[hyper] for output, hyper in READOUT_HYPERS.items()}
        targets = {names[output]: output for output in OUTPUTS[kind]}
        if len(targets) != len(OUTPUTS[kind]):
            raise ValueError(
                f"the readouts of this MACE model predict {OUTPUTS[kind]}, but "
                f"'mace_head_target', 'mace_dipole_target' and "
                f"'mace_polarizability_target' give some of them the same target "
                f"name ({names}): give each its own name"
            )
        self.mace_head_target: str = (
            names["energy"] if "energy" in OUTPUTS[kind] else ""
        )
        return targets

    def supported_outputs(self) -> Dict[str, ModelOutput]:
        return self.outputs

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.nl_options]

    def requested_inputs(self) -> Dict[str, ModelOutput]:
        """Per-system inputs: ``charge`` and ``spin_multiplicity`` for a MACE
        conditioned on them (see :mod:`metatrain_mace.trunk.conditioning`)."""
        return {
            name: ModelOutput(unit="", sample_kind="system")
            for name in self.trunk.conditioning_inputs()
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
        assembly = self.assembly
        assembly.to_device(systems[0].positions.device)
        outputs, summed = assembly.per_atom_requests(outputs)

        types, system_index, atom_index, edge_index, vectors = systems_to_graph(
            systems, self.nl_options
        )
        node_attrs = self.trunk.node_attrs(types, vectors.dtype)
        # e3nn puts the polar axis along y; feeding (y, z, x) makes every l-block of
        # the node features follow the real spherical harmonics convention of
        # metatensor (m = -l..l with z as polar axis)
        vectors = vectors[:, [1, 2, 0]]
        conditioning = self.trunk.condition(systems, system_index, vectors.dtype)
        features = self.trunk(node_attrs, edge_index, vectors, conditioning)
        samples = Labels(
            ["system", "atom"],
            torch.stack([system_index, atom_index], dim=1).to(torch.int32),
            assume_unique=True,
        )
        # the concatenated features feed the heads, the "feature" output and the
        # long-range energy only
        all_features = features[-1]
        scalar_features = features[-1]
        wants_long_range = self._wants_long_range(outputs)
        if (
            "feature" in outputs
            or "mtt::aux::mace_features" in outputs
            or self._needs_heads(outputs)
            or wants_long_range
        ):
            all_features, scalar_features = self.trunk.concatenated(features)

        if "feature" in outputs:
            result["feature"] = assembly.features_map(
                scalar_features, samples, outputs["feature"], selected_atoms
            )

        if "mtt::aux::mace_features" in outputs:
            result["mtt::aux::mace_features"] = assembly.finish(
                self.spherical_features(all_features, samples),
                outputs["mtt::aux::mace_features"],
                selected_atoms,
            )

        head_target = self.mace_head_target
        head_llf = last_layer_features_name(head_target)
        long_range_energy: Optional[torch.Tensor] = None
        if hasattr(self, "long_range"):
            if wants_long_range:
                lengths = torch.linalg.norm(vectors, dim=-1)
                long_range_energy = self.long_range(systems, scalar_features, lengths)
        response: Dict[str, torch.Tensor] = {}
        if hasattr(self.trunk, "response"):
            # the readouts of mace-torch's dipole classes (see trunk.response)
            response = self._response(systems, outputs, features, system_index)
            for name, output in self.readout_targets.items():
                if output == "energy":
                    # below, with MACE's energy readout
                    continue
                if name in outputs:
                    result[name] = assembly.tensor_map(
                        name, [response[name]], samples, outputs[name], selected_atoms
                    )
                llf_name = last_layer_features_name(name)
                if llf_name in outputs:
                    result[llf_name] = assembly.features_map(
                        self._pad(scalar_features),
                        samples,
                        outputs[llf_name],
                        selected_atoms,
                    )
        if head_target in self.target_names and (
            head_target in outputs or head_llf in outputs
        ):
            if hasattr(self.trunk, "response"):
                energy, llf = response[head_target], scalar_features
            else:
                energy, llf = self.trunk.readout_energy(
                    features,
                    node_attrs,
                    edge_index,
                    vectors,
                    head_llf in outputs,
                    conditioning,
                )
            if long_range_energy is not None:
                energy = energy + long_range_energy
            if head_target in outputs:
                result[head_target] = assembly.tensor_map(
                    head_target, [energy], samples, outputs[head_target], selected_atoms
                )
            if head_llf in outputs:
                result[head_llf] = assembly.features_map(
                    self._pad(llf), samples, outputs[head_llf], selected_atoms
                )

        for name, head in self.heads.items():
            llf_name = last_layer_features_name(name)
            if name in outputs or llf_name in outputs:
                blocks, llf = head(all_features, scalar_features)
                if name in self.heads.readout_heads:
                    # MACE adds ZBL and the embedding readout to every head
                    blocks[0] = blocks[0] + self.trunk.extra_energy(
                        node_attrs, edge_index, vectors, conditioning
                    ).unsqueeze(-1)
                    if long_range_energy is not None:
                        blocks[0] = blocks[0] + long_range_energy
                if name in outputs:
                    result[name] = assembly.tensor_map(
                        name, blocks, samples, outputs[name], selected_atoms
                    )
                if llf_name in outputs:
                    result[llf_name] = assembly.features_map(
                        self._pad(llf), samples, outputs[llf_name], selected_atoms
                    )

        if not self.training:
            result = self._add_baselines(systems, outputs, result, selected_atoms)
        for name in summed:
            result[name] = sum_over_atoms(result[name])
        if not self.training and head_target in result:
            check_finite(head_target, result[head_target])
        return result

    def _response(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        features: List[torch.Tensor],
        system_index: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Per-atom values of the requested targets of the readouts of a dipole
        class, by target name, in the layout of the target's block (Cartesian
        x, y, z; spherical (y, z, x), m = -1, 0, 1)."""
        wanted = False
        for name in self.readout_targets.keys():
            if name in outputs or last_layer_features_name(name) in outputs:
                wanted = True
        values: Dict[str, torch.Tensor] = {}
        if not wanted:
            return values
        positions = torch.cat([system.positions for system in systems])
        per_atom = self.trunk.response_outputs(
            features, positions, system_index, self.trunk.total_charge(systems)
        )
        for name, output in self.readout_targets.items():
            value = per_atom[output]
            if output != "energy":
                if name in self.spherical_dipoles:
                    value = value.index_select(1, self.xyz_to_spherical)
                # one property
                value = value.unsqueeze(-1)
            values[name] = value
        return values

    def _wants_long_range(self, outputs: Dict[str, ModelOutput]) -> bool:
        """Whether the model has a long-range energy and an energy (MACE's readout
        or a copy of it) is requested."""
        if not hasattr(self, "long_range"):
            return False
        energies = [self.mace_head_target] + self.heads.readout_heads
        return any(name in outputs for name in energies)

    def _needs_heads(self, outputs: Dict[str, ModelOutput]) -> bool:
        """Whether the concatenated features are needed: by a head, or as the
        last-layer features of a target of a dipole class's readouts."""
        for name in self.heads.keys():
            if name in outputs or last_layer_features_name(name) in outputs:
                return True
        if hasattr(self.trunk, "response"):
            for name in self.readout_targets.keys():
                if last_layer_features_name(name) in outputs:
                    return True
        return False

    def _pad(self, last_layer_features: torch.Tensor) -> torch.Tensor:
        """Zero-pad last-layer features to the common ``last_layer_feature_size``."""
        missing = self.last_layer_feature_size - last_layer_features.shape[-1]
        return torch.nn.functional.pad(last_layer_features, (0, missing))

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
        for name in self.assembly.atomic_basis_layouts.keys():
            if name in result:
                result[name] = self.assembly.sparsify(systems, name, result[name])
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

    # ------------------------------------------------------------------ targets
    def _add_output(self, name: str, info: TargetInfo) -> None:
        """Add the head (or MACE readout) and the outputs of one target."""
        spec = self.heads.add(name, info, self.trunk.mace.readouts)
        if self.readout_targets.get(name) == "dipole" and info.is_spherical:
            self.spherical_dipoles.append(name)
        self.last_layer_feature_sizes[name] = spec.last_layer_size
        self.target_names.append(name)
        self.outputs.update(spec.outputs)
        self.assembly.add(spec)

    def add_readout_head(self, name: str) -> None:
        """Give the energy-like target ``name`` a copy of MACE's readouts (weights
        included) as its head, in place of its MLP head: the new target starts
        from the predictions of the file's head (MACE's multi-head fine-tuning)."""
        info = self.dataset_info.targets.get(name)
        if hasattr(self.trunk, "response"):
            raise ValueError(
                f"cannot give {name!r} a copy of MACE's readout: the readouts of a "
                f"{type(self.trunk.mace).__name__} predict "
                f"{OUTPUTS[self.trunk.readout_kind]} together, not an energy alone; "
                f"{name!r} keeps a head of its own"
            )
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
        self.last_layer_feature_sizes[name] = self.heads.add_readout_head(
            name, self.trunk.mace.readouts, self.trunk.head_index
        )
        self.last_layer_feature_size = max(self.last_layer_feature_sizes.values())

    def restart(
        self, dataset_info: DatasetInfo, model_hypers: Optional[Dict[str, Any]] = None
    ) -> "MetaMACE":
        if self.from_file:
            foundation.check_dataset(
                self.trunk.mace, dataset_info, self.hypers["mace_model"], None
            )
        if model_hypers is not None:
            # the backend may change between runs: the weights are the same
            model_hypers = dict(model_hypers)
            enable_cueq = bool(
                model_hypers.pop("enable_cueq", self.hypers["enable_cueq"])
            )
            raise_if_hypers_mismatch(
                {k: v for k, v in self.hypers.items() if k != "enable_cueq"},
                model_hypers,
                default_hypers=get_default_hypers(ARCHITECTURE_NAME)["model"],
            )
            if enable_cueq != self.trunk.uses_cueq:
                self.set_backend(enable_cueq)
        merged = self.dataset_info.union(dataset_info)
        new_types = sorted(set(merged.atomic_types) - set(self.atomic_types))
        if new_types:
            raise ValueError(
                f"the new dataset contains atomic types {new_types} that this model "
                f"was not built for (it knows {self.atomic_types}); MACE cannot add "
                "element embeddings after training started"
            )
        for name, info in merged.targets.items():
            if name not in self.dataset_info.targets:
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

    # ------------------------------------------------------------------ trunk
    def set_avg_num_neighbors(self, value: float) -> None:
        """Store the neighbour-sum normalisation and push it into MACE."""
        self.trunk.set_avg_num_neighbors(value)

    def _convert_trunk(self, enable_cueq: bool) -> None:
        """Move the trunk and the copies of MACE's readouts (readout heads) to the
        other backend, weights included."""
        self.trunk.convert(enable_cueq)
        self.heads.follow_backend(self.trunk.mace.readouts)

    def set_backend(self, enable_cueq: bool) -> None:
        """Run the trunk on cuEquivariance (``True``) or e3nn, with the same
        weights; ``hypers["enable_cueq"]`` follows."""
        if enable_cueq != self.trunk.uses_cueq:
            if enable_cueq and lora.adapters(self):
                raise ValueError(
                    "LoRA adapters run on e3nn only: set 'enable_cueq: false' to "
                    "train or fine-tune a model with LoRA adapters"
                )
            self._convert_trunk(enable_cueq)
        self.hypers = {**self.hypers, "enable_cueq": enable_cueq}

    def e3nn_copy(self) -> "MetaMACE":
        """This model with an e3nn trunk, sharing every other weight (the model
        itself when it already runs e3nn): what checkpoints and export hold."""
        if not self.trunk.uses_cueq:
            return self
        twin = tree_copy(self)
        twin._convert_trunk(False)
        return twin

    # ------------------------------------------------------ checkpoints, export
    def get_checkpoint(self) -> Dict[str, Any]:
        # checkpoints hold e3nn weights whatever the backend (readable without
        # cuEquivariance); 'enable_cueq' in the hypers records the backend
        source = self.e3nn_copy()
        state_dict = source.state_dict()
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
                "mace_trunk": source.trunk.mace if self.from_file else None,
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
        hypers = model_data["model_hypers"]
        model = cls.with_architecture(model_data, checkpoint.get("finetune_config"))
        model.set_weights(state_dict)
        if hypers.get("enable_cueq") and context != "export":
            if context == "finetune" and not backend.cueq_available():
                logging.info(
                    "The checkpoint was trained with cuEquivariance, which is not "
                    "installed: fine-tuning on e3nn (same weights)"
                )
            else:
                model.set_backend(True)
        model.finetune_config = checkpoint.get("finetune_config", {})
        model.metadata = merge_metadata(model.metadata, checkpoint.get("metadata"))
        return model

    @classmethod
    def with_architecture(
        cls, model_data: Dict[str, Any], finetune_config: Optional[Dict[str, Any]]
    ) -> "MetaMACE":
        """An e3nn model of the architecture recorded in a checkpoint's
        ``model_data`` and ``finetune_config``, with fresh weights."""
        hypers = model_data["model_hypers"]
        model = cls(
            {**hypers, "enable_cueq": False},
            model_data["dataset_info"],
            mace=model_data.get("mace_trunk"),
        )
        # readout heads and LoRA adapters are modules of their own: insert them
        # before the weights (in the order fine-tuning added them)
        restore_readout_heads(model, finetune_config)
        lora.restore_adapters(model, finetune_config or {})
        return model

    def set_weights(self, state_dict: Dict[str, torch.Tensor]) -> None:
        """Load e3nn weights (of a checkpoint or an exported model), in their dtype."""
        dtype = state_dict["trunk.avg_num_neighbors"].dtype
        self.to(dtype).load_state_dict(state_dict)
        if float(self.trunk.avg_num_neighbors) > 0:
            self.trunk.set_avg_num_neighbors(float(self.trunk.avg_num_neighbors))
        self.additive_models[0].sync_tensor_maps()
        self.scaler.sync_tensor_maps()

    @classmethod
    def upgrade_checkpoint(cls, checkpoint: Dict[str, Any]) -> Dict[str, Any]:
        return checkpoints.upgrade(
            checkpoint, "model", cls.__checkpoint_version__, checkpoints.MODEL_UPDATES
        )

    def __prepare_scriptable__(self) -> "MetaMACE":
        """A shallow copy whose e3nn/MACE submodules are compiled as e3nn requires.

        ``torch.jit.script`` (used by metatomic to save the exported model) calls this
        first; e3nn modules cannot be scripted directly. The copy shares the
        parameters and leaves this model usable in eager mode.
        """
        return compiled_copy(
            self,
            drop=[("trunk.mace", "joint_embedding")],
            unused_forward=["trunk.mace"],
        )

    def export(self, metadata: Optional[ModelMetadata] = None) -> AtomisticModel:
        if self.trunk.uses_cueq:
            # TorchScript cannot compile cuEquivariance's modules in reasonable
            # time (and metatomic's engines load TorchScript): export on e3nn
            logging.info(
                "Exporting with the e3nn backend (same weights): the exported "
                "model is TorchScript, which cuEquivariance's modules are not"
            )
            e3nn = self.e3nn_copy()
            dtype = next(self.parameters()).dtype
            e3nn.trunk.check_parity(
                self.trunk, 1e-10 if dtype == torch.float64 else 1e-4
            )
            return e3nn.export(metadata)
        dtype = next(self.parameters()).dtype
        if dtype not in self.__supported_dtypes__:
            raise ValueError(f"unsupported dtype {dtype} for metatrain-mace")
        self.to(dtype)
        # the composition weights are TensorMaps that torch cannot move by itself
        self.additive_models[0].weights_to(torch.device("cpu"), torch.float64)
        interaction_range = self.num_interactions * self.r_max
        if hasattr(self, "long_range"):
            # every atom interacts with every other: engines must not split the
            # system into domains
            interaction_range = float("inf")
        capabilities = ModelCapabilities(
            outputs=self.outputs,
            atomic_types=self.atomic_types,
            interaction_range=interaction_range,
            length_unit=self.dataset_info.length_unit,
            supported_devices=self.__supported_devices__,
            dtype=dtype_to_str(dtype),
        )
        # metatomic freezes the parameters of what it wraps: give it a copy sharing
        # the weights, so that this model can still be trained afterwards
        module = tree_copy(self).eval()
        # what tools that look inside the model need to rebuild it in Python
        record = records.record(
            self.hypers,
            self.dataset_info,
            self.trunk.mace if self.from_file else None,
            self.finetune_config,
        )
        setattr(module, records.ATTRIBUTE, record)
        exported = AtomisticModel(
            module,
            merge_metadata(self.metadata, metadata),
            capabilities,
        )
        # whoever saves it (metatrain's mtt train and mtt export, this package)
        # writes a temporary file and renames it: a crash leaves no half model
        exported.save = types.MethodType(save_model_atomically, exported)
        return exported
