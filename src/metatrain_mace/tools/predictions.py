"""Predictions on new structures with ``mtt eval`` (no references).

``mtt eval model.pt eval.yaml`` with only ``systems`` in ``eval.yaml`` asks the
model for every output it has, as plain outputs. metatrain then computes no
gradient (no forces, no stress), and its xyz writer takes TensorMaps of one block
only, which ``mtt::aux::mace_features`` (one block per irrep), spherical targets of
several irreps and atomic-basis targets (one block per atomic type) are not. The
import hook (:mod:`metatrain_mace_hook`) mends both with the two functions here:

- :func:`with_energy_gradients`: energies are asked with their position and strain
  gradients, so that the file holds forces, and virial and stress for periodic
  structures (NaN for the others);
- :func:`single_blocks`: each block of a TensorMap of several blocks is written as
  an output of its own, named after the output and the block's key
  (``mtt::aux::mace_features_o3_lambda_1_o3_sigma_1``). Per-atom blocks that hold
  only some atoms (one atomic type) get one row per atom, NaN for the others, as
  xyz arrays need. extxyz separates the columns of per-atom arrays with ``:``, so
  per-atom outputs are written with ``_`` for ``::`` in their names
  (``mtt_aux_mace_features_o3_lambda_1_o3_sigma_1``).
"""

from types import SimpleNamespace
from typing import Any, Dict, List

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import System
from metatrain.utils.data import TargetInfo
from metatrain.utils.data.target_info import get_energy_target_info


def is_energy(name: str) -> bool:
    """Whether ``name`` is one of metatomic's energy outputs (``energy``,
    ``energy/VARIANT``), whose gradients are forces and virial."""
    return name == "energy" or name.startswith("energy/")


class OutputQuantities:
    """What metatrain's xyz writer reads of a model's capabilities (the quantity of
    each output, to name gradients ``forces`` and ``virial``/``stress``), with
    energies marked as such: ``ModelOutput.quantity`` is deprecated and empty in the
    models of this package and of metatrain's own architectures."""

    def __init__(self, capabilities: Any) -> None:
        self.outputs = {
            name: SimpleNamespace(
                quantity="energy" if is_energy(name) else output.quantity
            )
            for name, output in capabilities.outputs.items()
        }


def with_energy_gradients(outputs: Dict[str, Any]) -> Dict[str, Any]:
    """The outputs ``mtt eval`` asks for, with energies (metatomic's ``energy`` and
    ``energy/VARIANT`` outputs, asked as plain ``ModelOutput`` when ``eval.yaml`` has
    no targets) replaced by energy targets with position and strain gradients."""
    result: Dict[str, Any] = {}
    for name, output in outputs.items():
        # ModelOutput is a TorchScript class: isinstance does not take it
        if is_energy(name) and not isinstance(output, TargetInfo):
            output = get_energy_target_info(
                name,
                {"unit": output.unit, "description": output.description},
                add_position_gradients=True,
                add_strain_gradients=True,
            )
        result[name] = output
    return result


def block_name(name: str, key_names: List[str], key_values: List[int]) -> str:
    """The name of one block of output ``name`` in the xyz file."""
    parts = [f"{n}_{v}" for n, v in zip(key_names, key_values, strict=True)]
    return "_".join([name, *parts])


def _all_atoms(systems: List[System], block: TensorBlock) -> TensorBlock:
    """``block`` with a row for every atom of ``systems`` (NaN where it had none)."""
    device = block.values.device
    counts = [len(system) for system in systems]
    rows = torch.cat(
        [
            torch.stack(
                [
                    torch.full((n,), i, dtype=torch.int32, device=device),
                    torch.arange(n, dtype=torch.int32, device=device),
                ],
                dim=1,
            )
            for i, n in enumerate(counts)
        ]
    )
    samples = Labels(["system", "atom"], rows)
    if len(block.samples) == len(samples):
        return block.copy()
    offsets = torch.tensor([0, *counts], device=device).cumsum(0)
    present = block.samples.values.to(torch.int64)
    position = offsets[present[:, 0]] + present[:, 1]
    values = torch.full(
        (len(samples), *block.values.shape[1:]),
        float("nan"),
        dtype=block.values.dtype,
        device=device,
    )
    values[position] = block.values
    return TensorBlock(values, samples, block.components, block.properties)


def single_blocks(
    systems: List[System], predictions: Dict[str, TensorMap]
) -> Dict[str, TensorMap]:
    """Every prediction of several blocks split into one TensorMap per block
    (see the module's description); single-block predictions unchanged."""
    result: Dict[str, TensorMap] = {}
    for name, tensor in predictions.items():
        if len(tensor.keys) == 1:
            result[name] = tensor
            continue
        for key, block in tensor.items():
            if "atom" in block.samples.names:
                block = _all_atoms(systems, block)
            else:
                block = block.copy()
            single = TensorMap(Labels.single().to(block.values.device), [block])
            result[block_name(name, key.names, key.values.tolist())] = single
    # extxyz separates the columns of per-atom arrays with ':' ("name:R:3")
    for name in list(result):
        if ":" in name and "atom" in result[name].block().samples.names:
            result[name.replace("::", "_").replace(":", "_")] = result.pop(name)
    return result
