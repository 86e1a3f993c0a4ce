"""The long-range energy of models built with ``long_range: {enable: true}``.

MACE sees neighbours within ``r_max`` only. The long-range part reads latent
charges from the scalar node features of all layers, lets them interact through a
Coulomb potential at every distance (metatrain's ``LongRangeFeaturizer``, the one
``pet`` uses: Ewald summation in training and P3M at evaluation for periodic
structures, a direct sum otherwise, with torch-pme). The per-atom energy that adds
to MACE's readout has the form of an electrostatic energy, a charge times a
potential: ``E_i = sum_k a_k(h_i) f_k(V_i)``, with ``a`` linear in the atom's scalar
features ``h_i`` and ``f`` the featurizer's features of the potentials ``V_i``
(without the atom's own charge the potential alone could not tell a cation from an
anion).
"""

from typing import Any, Dict, List

import torch
from metatomic.torch import NeighborListOptions, System


def require_torch_pme() -> None:
    """Refuse ``long_range`` clearly when torch-pme is not installed."""
    try:
        import torchpme  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "'long_range: {enable: true}' needs torch-pme, which is not installed: "
            "pip install 'metatrain-mace[long-range]' (or pip install torch-pme)"
        ) from err


class LongRangeEnergy(torch.nn.Module):
    """Per-atom long-range energy from the scalar node features.

    :param hypers: the ``long_range`` model hypers (metatrain's keys).
    :param num_features: number of scalar node features (all layers).
    :param options: the model's neighbour list (its cutoff is ``r_max``: the
        Coulomb interaction is excluded, smoothly, inside it).
    """

    def __init__(
        self,
        hypers: Dict[str, Any],
        num_features: int,
        options: NeighborListOptions,
    ) -> None:
        super().__init__()
        require_torch_pme()
        from metatrain.utils.long_range import LongRangeFeaturizer

        self.featurizer = LongRangeFeaturizer(dict(hypers), num_features, options)
        # Ewald in training, P3M at evaluation, as pet does: P3M is unstable in
        # training (the featurizer uses Ewald only while training)
        self.featurizer.use_ewald = True
        self.charges = torch.nn.Linear(num_features, num_features)

    def forward(
        self,
        systems: List[System],
        scalar_features: torch.Tensor,
        edge_lengths: torch.Tensor,
    ) -> torch.Tensor:
        """Per-atom energy ``[n_atoms, 1]``; ``edge_lengths`` are the lengths of
        the edges of the neighbour lists of ``systems``, in their order."""
        potentials = self.featurizer(systems, scalar_features, edge_lengths)
        charges = self.charges(scalar_features)
        return (charges * potentials).sum(dim=-1, keepdim=True)
