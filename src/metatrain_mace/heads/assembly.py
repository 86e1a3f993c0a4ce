"""TensorMap assembly of the model's outputs, and metatrain's scaler and composition
baseline applied at evaluation (a mixin of :class:`~metatrain_mace.model.MetaMACE`,
compiled with it by TorchScript)."""

from typing import Dict, List, Optional, Tuple

import metatensor.torch as mts
import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import ModelOutput, System
from metatrain.utils.data.atomic_basis_helpers import sparsify_atomic_basis_target
from metatrain.utils.sum_over_atoms import sum_over_atoms

from metatrain_mace.heads.targets import last_layer_features_name


class OutputAssembly:
    """Methods of :class:`MetaMACE` that turn tensors into metatomic outputs."""

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

    def _sparsify(
        self, systems: List[System], tensor: TensorMap, layout: TensorMap
    ) -> TensorMap:
        """metatrain's dense form of an atomic-basis target (what the heads predict
        and training compares) as one block per atomic type, each with its own
        properties."""
        types = torch.cat([system.types for system in systems])
        lengths = torch.tensor([len(system) for system in systems], device=types.device)
        offsets = torch.cumsum(lengths, dim=0) - lengths
        samples = tensor.block(0).samples.values.to(torch.int64)
        row_types = types[offsets[samples[:, 0]] + samples[:, 1]]
        return sparsify_atomic_basis_target(systems, tensor, layout, row_types)

    def _move_labels_to_device(self, device: torch.device) -> None:
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
        for name, layout in self.atomic_basis_layouts.items():
            if name in result:
                result[name] = self._sparsify(systems, result[name], layout)
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
