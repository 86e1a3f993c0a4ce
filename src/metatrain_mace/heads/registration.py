"""Targets of :class:`~metatrain_mace.model.MetaMACE`: one head (or MACE's own
readout) and two outputs per target, added at construction, by fine-tuning on new
targets (``restart``) and by multi-head replay (``add_readout_head``)."""

from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from metatomic.torch import ModelOutput
from metatrain.composition import CompositionModel
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo, TargetInfo
from metatrain.utils.data.atomic_basis_helpers import densify_atomic_basis_dataset_info
from metatrain.utils.hypers import raise_if_hypers_mismatch

from metatrain_mace.checkpoints import ARCHITECTURE_NAME
from metatrain_mace.heads.blocks import (
    EquivariantLinearBlock,
    EquivariantLinearHead,
    MLPHead,
    ReadoutHead,
    irrep_of_block,
    readout_last_layer_size,
)
from metatrain_mace.heads.coupling import CoupledBlock, coupled_parts
from metatrain_mace.heads.features import IrrepGather
from metatrain_mace.heads.products import ProductBlock, product_order
from metatrain_mace.heads.targets import check_target, last_layer_features_name
from metatrain_mace.mace_import import o3
from metatrain_mace.trunk import foundation
from metatrain_mace.trunk.backend import float64_default


if TYPE_CHECKING:
    from metatrain_mace.model import MetaMACE


class TargetRegistration:
    """Methods of :class:`MetaMACE` that add targets (never compiled)."""

    def _add_output(self, name: str, info: TargetInfo) -> None:
        """Add the head (or MACE readout) and the outputs of one target."""
        check_target(
            name,
            info,
            self.produced_irreps,
            self.feature_irreps,
            self.num_interactions,
        )
        if info.is_atomic_basis:
            # the heads predict metatrain's dense form (one block per irrep, every
            # atom, the union of the per-type properties); evaluation turns it back
            # into one block per atomic type (assembly._sparsify)
            self.atomic_basis_layouts[name] = info.layout
            info = densify_atomic_basis_dataset_info(
                DatasetInfo(
                    length_unit=self.dataset_info.length_unit,
                    atomic_types=self.atomic_types,
                    targets={name: info},
                )
            ).targets[name]
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
            # e3nn's tensor products compute their coupling coefficients in the
            # default dtype: float64 keeps them exact (see
            # trunk.backend.float64_default)
            with float64_default():
                self.heads[name] = self._equivariant_head(name, info)
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

    def _equivariant_head(self, name: str, info: TargetInfo) -> EquivariantLinearHead:
        """One block module per block of a spherical or Cartesian target."""
        linear_irreps: List[o3.Irrep] = []
        blocks: List[torch.nn.Module] = []
        for key, block in info.layout.items():
            num_properties = len(block.properties)
            if len(block.components) == 1:
                if info.is_cartesian:
                    irrep = o3.Irrep("1o")
                else:
                    irrep = irrep_of_block(int(key["o3_lambda"]), int(key["o3_sigma"]))
                blocks.append(
                    self._irrep_block(
                        irrep, num_properties, info.is_cartesian, linear_irreps
                    )
                )
                continue
            if info.is_cartesian:
                first = second = o3.Irrep("1o")
            else:
                first = irrep_of_block(int(key["o3_lambda_1"]), int(key["o3_sigma_1"]))
                second = irrep_of_block(int(key["o3_lambda_2"]), int(key["o3_sigma_2"]))
            parts = [
                self._irrep_block(part, num_properties, False, linear_irreps)
                for part in coupled_parts(first, second)
            ]
            blocks.append(
                CoupledBlock(parts, first, second, num_properties, info.is_cartesian)
            )
        gathers = [
            IrrepGather(self.layer_irreps, self.produced_layer_irreps, irrep)
            for irrep in linear_irreps
        ]
        return EquivariantLinearHead(blocks, gathers)

    def _irrep_block(
        self,
        irrep: o3.Irrep,
        num_properties: int,
        cartesian: bool,
        linear_irreps: List[o3.Irrep],
    ) -> torch.nn.Module:
        """A linear map of the node features when they carry ``irrep`` (recorded in
        ``linear_irreps``), else a tensor product of them."""
        order = product_order(self.produced_irreps, irrep)
        if order == 1:
            if irrep not in linear_irreps:
                linear_irreps.append(irrep)
            return EquivariantLinearBlock(
                self.feature_irreps, irrep, num_properties, cartesian=cartesian
            )
        if order is None:
            raise ValueError(f"no product of the node features reaches {irrep}")
        return ProductBlock(
            self.feature_irreps, self.produced_irreps, irrep, num_properties, order
        )

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

    def restart(
        self, dataset_info: DatasetInfo, model_hypers: Optional[Dict[str, Any]] = None
    ) -> "MetaMACE":
        if self.from_file:
            foundation.check_dataset(
                self.mace, dataset_info, self.hypers["mace_model"], None
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
            if enable_cueq != self.uses_cueq:
                if self.loaded_for_restart:
                    raise ValueError(
                        "'enable_cueq' changed on --restart: the optimizer state "
                        "belongs to the other backend. Continue with 'enable_cueq: "
                        f"{str(self.uses_cueq).lower()}', or start a fine-tuning "
                        "('finetune: read_from') to switch backends."
                    )
                self.set_backend(enable_cueq)
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
