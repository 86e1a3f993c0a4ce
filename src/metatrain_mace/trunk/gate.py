"""A TorchScript twin of mace-torch's ``GatedEquivariantBlock``.

mace-torch 0.3.16 gates the non-linear readouts of its dipole classes with
``mace.modules.gate.GatedEquivariantBlock``, which TorchScript cannot compile (its
properties are typed ``o3.Irreps``, its activations are Python callables held as
attributes, and its forward unpacks shapes). :class:`ScriptableGate` computes the
same numbers from the same slices and constants; the exported model's compiled copy
uses it in place of the original (:func:`metatrain_mace.trunk.scripting.compiled_copy`).
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch


#: the activations the twin knows, by name
ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "abs": torch.abs,
    "relu": torch.nn.functional.relu,
    "softplus": torch.nn.functional.softplus,
}


def _activation_name(function: Optional[Callable]) -> str:
    """The name of ``function`` in :data:`ACTIVATIONS` (``""`` for none)."""
    if function is None:
        return ""
    for name, known in ACTIVATIONS.items():
        if function is known or getattr(function, "__name__", None) == name:
            return name
    raise ValueError(
        f"the gate of this MACE model uses the activation {function!r}, which the "
        f"exported model does not know (it knows {sorted(ACTIVATIONS)})"
    )


class ScriptableGate(torch.nn.Module):
    """The gated non-linearity of ``gate`` (a ``GatedEquivariantBlock``): scalars
    through their activation, each gated irrep times the activation of its gate.

    :param gate: the mace-torch module to copy (its slices, layout, activations and
        normalisation constants; it has no weights).
    """

    gated_info: List[Tuple[int, int, int, int, int]]

    def __init__(self, gate: Any) -> None:
        super().__init__()
        self.s_start = int(gate._s_start)
        self.s_len = int(gate._s_len)
        self.g_start = int(gate._g_start)
        self.g_len = int(gate._g_len)
        self.gated_info = [tuple(int(v) for v in info) for info in gate._gated_info]
        self.ir_mul = bool(gate._layout_is_ir_mul)
        self.scalar_activation = _activation_name(gate._act_scalar)
        self.scalar_constant = float(gate._scalar_cst)
        self.gate_activation = _activation_name(gate._act_gate)
        self.gate_constant = float(gate._gate_cst)

    def _activate(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name == "silu":
            return torch.nn.functional.silu(x)
        if name == "sigmoid":
            return torch.sigmoid(x)
        if name == "tanh":
            return torch.tanh(x)
        if name == "abs":
            return torch.abs(x)
        if name == "relu":
            return torch.nn.functional.relu(x)
        if name == "softplus":
            return torch.nn.functional.softplus(x)
        return x

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scalars = features.narrow(-1, self.s_start, self.s_len)
        if self.scalar_activation != "":
            scalars = (
                self._activate(self.scalar_activation, scalars) * self.scalar_constant
            )
        if len(self.gated_info) == 0:
            return scalars
        gates = features.narrow(-1, self.g_start, self.g_len)
        if self.gate_activation != "":
            gates = self._activate(self.gate_activation, gates) * self.gate_constant
        n = features.shape[0]
        parts: List[torch.Tensor] = [scalars]
        for start, length, ir_dim, mul, gate_offset in self.gated_info:
            gated = features.narrow(-1, start, length)
            gate = gates.narrow(-1, gate_offset, mul)
            if self.ir_mul:
                product = gated.reshape(n, ir_dim, mul) * gate.unsqueeze(-2)
            else:
                product = gated.reshape(n, mul, ir_dim) * gate.unsqueeze(-1)
            parts.append(product.reshape(n, length))
        return torch.cat(parts, dim=-1)
