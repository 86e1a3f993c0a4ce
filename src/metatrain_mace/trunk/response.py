"""Dipoles, polarizabilities and energies of mace-torch's dipole model classes.

mace-torch ships three model classes whose readouts predict more than an energy:

- ``AtomicDipolesMACE``: a dipole (MACECalculator's ``DipoleMACE``);
- ``AtomicDielectricMACE``: atomic charges, a dipole and a polarizability
  (``DipolePolarizabilityMACE``);
- ``EnergyDipolesMACE``: an energy and a dipole (``EnergyDipoleMACE``).

Their readouts give, per atom and summed over layers, one vector of irreps. This
module says which outputs each class has (:data:`OUTPUTS`) and turns that vector into
per-atom contributions to the Cartesian dipole and polarizability of each structure,
as the class's own ``forward`` does (:class:`ResponseReadout`).

The trunk feeds MACE edge vectors in the order (y, z, x) (see
:meth:`metatrain_mace.model.MetaMACE.forward`); a cyclic permutation of the axes is a
rotation, so the readouts' vectors and rank-2 tensors come out rotated by it, and
are rotated back here, exactly.
"""

from typing import Dict, List

import torch


#: the readout kind of each MACE model class: what its readouts predict
READOUT_KINDS = {
    "MACE": "energy",
    "ScaleShiftMACE": "energy",
    "AtomicDipolesMACE": "dipole",
    "AtomicDielectricMACE": "dielectric",
    "EnergyDipolesMACE": "energy_dipole",
}

#: the outputs of the readouts of each kind
OUTPUTS: Dict[str, List[str]] = {
    "energy": ["energy"],
    "dipole": ["dipole"],
    "dielectric": ["dipole", "polarizability"],
    "energy_dipole": ["energy", "dipole"],
}

#: the hyperparameter naming the target of each output of the readouts
READOUT_HYPERS = {
    "energy": "mace_head_target",
    "dipole": "mace_dipole_target",
    "polarizability": "mace_polarizability_target",
}

#: MACECalculator's ``model_type`` for each kind (what its users know them as)
CALCULATOR_TYPES = {
    "energy": "MACE",
    "dipole": "DipoleMACE",
    "dielectric": "DipolePolarizabilityMACE",
    "energy_dipole": "EnergyDipoleMACE",
}


def readout_kind(mace: torch.nn.Module) -> str:
    """What the readouts of a MACE module predict (a key of :data:`OUTPUTS`)."""
    for cls in type(mace).__mro__:
        if cls.__name__ in READOUT_KINDS and cls.__module__.startswith("mace."):
            return READOUT_KINDS[cls.__name__]
    return "energy"


class ResponseReadout(torch.nn.Module):
    """Per-atom energy, dipole and polarizability from the summed readouts of a
    dipole-kind MACE module, each atom's share of MACE's per-structure values.

    - dipole: the atom's readout dipole, plus (``dielectric``) its charge times its
      position; the charges are shifted per structure so that they add up to the
      structure's total charge, as in MACE.
    - polarizability: the atom's readout polarizability (0e and 2e parts) as a
      symmetric 3x3 matrix (MACE's change of basis).
    - energy: the readouts' scalar (``energy_dipole``); the file's isolated-atom
      energies are the composition baseline.

    ``AtomicDipolesMACE`` adds the dipole of fixed per-atom charges read from the
    data (``Qs`` in MACECalculator); they are taken as zero here, which is what
    MACECalculator and mace-torch's training use when the data have none.

    :param kind: ``"dipole"``, ``"dielectric"`` or ``"energy_dipole"``.
    :param change_of_basis: MACE's change of basis from (0e, 2e) to symmetric 3x3
        matrices (``dielectric`` only; an empty tensor otherwise).
    """

    def __init__(self, kind: str, change_of_basis: torch.Tensor) -> None:
        super().__init__()
        if kind not in ("dipole", "dielectric", "energy_dipole"):
            raise ValueError(f"no response readout for MACE readouts of kind {kind!r}")
        self.kind = kind
        self.register_buffer(
            "change_of_basis", change_of_basis.detach().clone(), persistent=False
        )
        # the readouts' axes are (y, z, x): index of x, y and z among them
        self.register_buffer("to_xyz", torch.tensor([2, 0, 1]), persistent=False)

    def forward(
        self,
        readout: torch.Tensor,
        positions: torch.Tensor,
        system_index: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """Per-atom contributions, Cartesian (x, y, z) components.

        :param readout: ``[n_atoms, dim]``, the readouts summed over layers.
        :param positions: ``[n_atoms, 3]``, positions of the atoms.
        :param system_index: ``[n_atoms]``, the structure of each atom.
        :param total_charge: ``[n_systems]``, total charge of each structure.
        :return: ``energy`` ``[n_atoms, 1]``, ``dipole`` ``[n_atoms, 3]`` and
            ``polarizability`` ``[n_atoms, 3, 3]``, as the kind has them.
        """
        result: Dict[str, torch.Tensor] = {}
        if self.kind == "dipole":
            result["dipole"] = readout[:, 0:3].index_select(1, self.to_xyz)
        elif self.kind == "energy_dipole":
            result["energy"] = readout[:, 0:1]
            result["dipole"] = readout[:, 1:4].index_select(1, self.to_xyz)
        else:
            charges = self._normalised_charges(
                readout[:, 0], system_index, total_charge
            )
            dipole = readout[:, 2:5].index_select(1, self.to_xyz)
            result["dipole"] = dipole + charges.unsqueeze(-1) * positions
            spherical = torch.cat([readout[:, 1:2], readout[:, 5:10]], dim=1)
            matrix = torch.einsum("ijk,ni->njk", self.change_of_basis, spherical)
            result["polarizability"] = matrix.index_select(1, self.to_xyz).index_select(
                2, self.to_xyz
            )
        return result

    def _normalised_charges(
        self,
        charges: torch.Tensor,
        system_index: torch.Tensor,
        total_charge: torch.Tensor,
    ) -> torch.Tensor:
        """Charges shifted per structure to add up to its total charge."""
        n_systems = total_charge.shape[0]
        counts = torch.zeros(n_systems, dtype=charges.dtype, device=charges.device)
        counts = counts.index_add(0, system_index, torch.ones_like(charges))
        sums = torch.zeros(n_systems, dtype=charges.dtype, device=charges.device)
        sums = sums.index_add(0, system_index, charges)
        excess = (sums - total_charge.to(charges.dtype)) / counts
        return charges - excess.index_select(0, system_index)
