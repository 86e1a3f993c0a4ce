"""TensorMaps of the model's outputs, from the tensors the trunk and heads compute.

:class:`OutputAssembly` holds the labels of every target (keys, components,
properties), the layouts of atomic-basis targets and the list of per-atom targets,
all filled from the :class:`~metatrain_mace.heads.target_heads.TargetSpec` of each
target, and builds the TensorMaps of :class:`~metatrain_mace.model.MetaMACE`
(compiled with it by TorchScript). It has no weights.
"""

from typing import Dict, List, Optional, Tuple

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System
from metatrain.utils.data.atomic_basis_helpers import sparsify_atomic_basis_target
from metatrain.utils.sum_over_atoms import sum_over_atoms

from metatrain_mace.heads.target_heads import TargetSpec


class OutputAssembly(torch.nn.Module):
    """Labels of the targets, and the TensorMaps built with them."""

    # TorchScript cannot infer the types of these (possibly empty) containers
    key_labels: Dict[str, Labels]
    atomic_basis_layouts: Dict[str, TensorMap]
    component_labels: Dict[str, List[List[Labels]]]
    property_labels: Dict[str, List[Labels]]
    per_atom_targets: List[str]

    def __init__(self) -> None:
        super().__init__()
        self.key_labels = {}
        # layouts of atomic-basis targets (one block per atomic type), see sparsify
        self.atomic_basis_layouts = {}
        self.component_labels = {}
        self.property_labels = {}
        self.per_atom_targets = []
        self.single_label = Labels.single()

    def add(self, spec: TargetSpec) -> None:
        """Record the labels of an added target."""
        name, info = spec.name, spec.info
        if spec.atomic_basis_layout is not None:
            self.atomic_basis_layouts[name] = spec.atomic_basis_layout
        if info.sample_kind == "atom":
            self.per_atom_targets.append(name)
        self.key_labels[name] = info.layout.keys
        self.component_labels[name] = [b.components for b in info.layout.blocks()]
        self.property_labels[name] = [b.properties for b in info.layout.blocks()]

    def tensor_map(
        self,
        name: str,
        blocks: List[torch.Tensor],
        samples: Labels,
        output: ModelOutput,
        selected_atoms: Optional[Labels],
    ) -> TensorMap:
        """The TensorMap of target ``name`` from the values of its blocks."""
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
        return self.finish(
            TensorMap(self.key_labels[name], tensor_blocks), output, selected_atoms
        )

    def features_map(
        self,
        values: torch.Tensor,
        samples: Labels,
        output: ModelOutput,
        selected_atoms: Optional[Labels],
    ) -> TensorMap:
        """A single-block TensorMap of per-atom features."""
        properties = Labels(
            names=["feature"],
            values=torch.arange(values.shape[-1], device=values.device).reshape(-1, 1),
            assume_unique=True,
        )
        block = TensorBlock(
            values=values, samples=samples, components=[], properties=properties
        )
        return self.finish(
            TensorMap(self.single_label, [block]), output, selected_atoms
        )

    def finish(
        self, tensor: TensorMap, output: ModelOutput, selected_atoms: Optional[Labels]
    ) -> TensorMap:
        """Select atoms, and sum per structure when asked."""
        if selected_atoms is not None:
            tensor = mts.slice(tensor, axis="samples", selection=selected_atoms)
        if output.sample_kind == "system":
            tensor = sum_over_atoms(tensor)
        return tensor

    def sparsify(
        self, systems: List[System], name: str, tensor: TensorMap
    ) -> TensorMap:
        """metatrain's dense form of the atomic-basis target ``name`` (what the
        heads predict and training compares) as one block per atomic type, each
        with its own properties."""
        types = torch.cat([system.types for system in systems])
        lengths = torch.tensor([len(system) for system in systems], device=types.device)
        offsets = torch.cumsum(lengths, dim=0) - lengths
        samples = tensor.block(0).samples.values.to(torch.int64)
        row_types = types[offsets[samples[:, 0]] + samples[:, 1]]
        return sparsify_atomic_basis_target(
            systems, tensor, self.atomic_basis_layouts[name], row_types
        )

    def to_device(self, device: torch.device) -> None:
        """Move the labels to ``device`` (torch does not move them)."""
        if self.single_label.values.device == device:
            return
        self.single_label = self.single_label.to(device)
        self.atomic_basis_layouts = {
            k: v.to(device) for k, v in self.atomic_basis_layouts.items()
        }
        self.key_labels = {k: v.to(device) for k, v in self.key_labels.items()}
        self.component_labels = {
            k: [[c.to(device) for c in block] for block in v]
            for k, v in self.component_labels.items()
        }
        self.property_labels = {
            k: [p.to(device) for p in v] for k, v in self.property_labels.items()
        }

    def per_atom_requests(
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
