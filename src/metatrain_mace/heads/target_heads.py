"""The heads of the targets of :class:`~metatrain_mace.model.MetaMACE`.

:class:`TargetHeads` holds one head per target (by target name, so that the
parameters are ``heads.<target>.*``), except for the targets of MACE's own readouts
(``mace_head_target``, and the dipole and polarizability of the dipole classes),
whose predictions come from the trunk. It adds targets from their
:class:`~metatrain.utils.data.TargetInfo` and the
:class:`~metatrain_mace.trunk.mace_trunk.FeatureLayout` of the trunk, and describes
each added target by a :class:`TargetSpec`: what the model needs to build its
outputs. Targets whose head is a copy of MACE's readouts (multi-head fine-tuning,
:meth:`TargetHeads.add_readout_head`) are listed in ``readout_heads``.
"""

import copy
import dataclasses
from typing import Dict, List, Optional

import torch
from metatensor.torch import TensorMap
from metatomic.torch import ModelOutput
from metatrain.utils.data import DatasetInfo, TargetInfo
from metatrain.utils.data.atomic_basis_helpers import densify_atomic_basis_dataset_info

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
from metatrain_mace.heads.targets import (
    check_readout_target,
    check_target,
    last_layer_features_name,
)
from metatrain_mace.mace_import import o3
from metatrain_mace.trunk import cueq
from metatrain_mace.trunk.backend import float64_default
from metatrain_mace.trunk.mace_trunk import FeatureLayout


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """An added target, as the model's outputs need it.

    :param name: name of the target.
    :param info: the target as the heads predict it (metatrain's dense form for an
        atomic-basis target).
    :param atomic_basis_layout: the layout of an atomic-basis target (one block per
        atomic type), to turn the dense prediction back into it; ``None`` otherwise.
    :param last_layer_size: size of the target's last-layer features.
    :param outputs: the model outputs of the target (the target and its
        last-layer features).
    """

    name: str
    info: TargetInfo
    atomic_basis_layout: Optional[TensorMap]
    last_layer_size: int
    outputs: Dict[str, ModelOutput]


class TargetHeads(torch.nn.ModuleDict):
    """The heads of the targets, by target name.

    :param layout: the node features the heads read.
    :param head_hidden_sizes: hidden layers of the MLP heads of scalar targets.
    :param readout_targets: the targets predicted by MACE's own readouts (no
        head), each with the readouts' output (``energy``, ``dipole``,
        ``polarizability``).
    :param response: whether MACE's readouts are those of a dipole class (see
        :mod:`metatrain_mace.trunk.response`), whose targets' last-layer features
        are the scalar node features.
    :param atomic_types: atomic types of the model.
    :param length_unit: length unit of the dataset.
    """

    # TorchScript cannot infer the type of a (possibly empty) list
    readout_heads: List[str]

    def __init__(
        self,
        layout: FeatureLayout,
        head_hidden_sizes: List[int],
        readout_targets: Dict[str, str],
        response: bool,
        atomic_types: List[int],
        length_unit: str,
    ) -> None:
        super().__init__()
        self.layout = layout
        self.head_hidden_sizes = list(head_hidden_sizes)
        self.readout_targets = dict(readout_targets)
        self.response = response
        self.atomic_types = atomic_types
        self.length_unit = length_unit
        # targets whose head is a copy of MACE's readouts (see add_readout_head)
        self.readout_heads = []

    def add(
        self, name: str, info: TargetInfo, readouts: torch.nn.ModuleList
    ) -> TargetSpec:
        """Add the head of one target (none for the ``readout_targets``, whose
        prediction is ``readouts``, MACE's own)."""
        layout = self.layout
        check_target(
            name,
            info,
            layout.produced_irreps,
            layout.feature_irreps,
            layout.num_interactions,
        )
        atomic_basis_layout: Optional[TensorMap] = None
        if info.is_atomic_basis:
            # the heads predict metatrain's dense form (one block per irrep, every
            # atom, the union of the per-type properties); evaluation turns it back
            # into one block per atomic type (assembly.OutputAssembly.sparsify)
            atomic_basis_layout = info.layout
            info = densify_atomic_basis_dataset_info(
                DatasetInfo(
                    length_unit=self.length_unit,
                    atomic_types=self.atomic_types,
                    targets={name: info},
                )
            ).targets[name]
        output = self.readout_targets.get(name)
        if output is not None:
            check_readout_target(name, info, output)
            if self.response:
                last_layer_size = layout.num_scalar_features
            else:
                last_layer_size = readout_last_layer_size(
                    readouts, list(layout.layer_scalars)
                )
        elif info.is_scalar:
            self[name] = MLPHead(
                layout.num_scalar_features,
                self.head_hidden_sizes,
                len(info.layout.block().properties),
            )
            last_layer_size = self[name].last_layer_size
        else:
            # e3nn's tensor products compute their coupling coefficients in the
            # default dtype: float64 keeps them exact (see
            # trunk.backend.float64_default)
            with float64_default():
                self[name] = self._equivariant_head(info)
            last_layer_size = self[name].last_layer_size
        outputs = {
            name: ModelOutput(
                unit=info.unit,
                sample_kind="atom",
                description=info.description,
            ),
            last_layer_features_name(name): ModelOutput(
                sample_kind="atom",
                description=f"invariant last layer features for {name}",
            ),
        }
        return TargetSpec(name, info, atomic_basis_layout, last_layer_size, outputs)

    def _equivariant_head(self, info: TargetInfo) -> EquivariantLinearHead:
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
            IrrepGather(
                list(self.layout.layer_irreps),
                list(self.layout.produced_layer_irreps),
                irrep,
            )
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
        layout = self.layout
        order = product_order(layout.produced_irreps, irrep)
        if order == 1:
            if irrep not in linear_irreps:
                linear_irreps.append(irrep)
            return EquivariantLinearBlock(
                layout.feature_irreps, irrep, num_properties, cartesian=cartesian
            )
        if order is None:
            raise ValueError(f"no product of the node features reaches {irrep}")
        return ProductBlock(
            layout.feature_irreps,
            layout.produced_irreps,
            irrep,
            num_properties,
            order,
        )

    def add_readout_head(
        self, name: str, readouts: torch.nn.ModuleList, head_index: int
    ) -> int:
        """Make the head of ``name`` a copy of ``readouts`` (MACE's, weights
        included, for MACE head ``head_index``).

        :return: the size of its last-layer features.
        """
        self[name] = ReadoutHead(
            readouts,
            [irreps.dim for irreps in self.layout.layer_irreps],
            list(self.layout.layer_scalars),
            head_index,
        )
        if name not in self.readout_heads:
            self.readout_heads.append(name)
        return self[name].last_layer_size

    def follow_backend(self, readouts: torch.nn.ModuleList) -> None:
        """Move the readout heads to the backend of ``readouts`` (MACE's, after the
        trunk changed backend), keeping their own weights."""
        for name in self.readout_heads:
            head = self[name]
            moved = copy.deepcopy(readouts)
            cueq.copy_weights(head.readouts, moved)
            head.readouts = moved
