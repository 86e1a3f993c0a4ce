"""Small MACE model files with random weights, built the way mace-torch saves them.

Nothing can be downloaded in the tests, so these stand in for foundation models:
several elements, ``ScaleShiftMACE`` or plain ``MACE``, one or several heads, with
or without ZBL pair repulsion, written with ``torch.save(model)``.
"""

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch
from e3nn import o3
from mace import modules


ELEMENTS = [1, 6, 8, 13, 29, 79]

# MACE-OMOL-style conditioning: charges -10..10 and multiplicities 1..11 as lookups
CHARGE_SPIN_SPECS = {
    "total_charge": {
        "type": "categorical",
        "per": "graph",
        "emb_dim": 8,
        "num_classes": 21,
        "offset": 10,
    },
    "total_spin": {
        "type": "categorical",
        "per": "graph",
        "emb_dim": 8,
        "num_classes": 11,
        "offset": 0,
    },
}
# the charge as a continuous quantity (a small MLP of the value)
CONTINUOUS_CHARGE_SPECS = {
    "total_charge": {"type": "continuous", "per": "graph", "emb_dim": 4, "in_dim": 1}
}


def build_mace_model(
    scale_shift: bool = True,
    heads: Optional[List[str]] = None,
    pair_repulsion: bool = False,
    atomic_numbers: Sequence[int] = ELEMENTS,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    r_max: float = 4.5,
    embedding_specs: Optional[dict] = None,
    use_embedding_readout: bool = False,
    use_reduced_cg: bool = False,
    max_ell: int = 2,
    correlation: int = 2,
) -> torch.nn.Module:
    """A small MACE model with random weights and non-trivial E0s, scale and shift
    (and, with ``embedding_specs``, conditioned on total charge and spin as
    MACE-OMOL is; with ``use_reduced_cg``, in mace-torch's reduced coupling basis,
    as files written where cuEquivariance is installed)."""
    n_heads = 1 if heads is None else len(heads)
    generator = np.random.default_rng(seed)
    energies = generator.uniform(-5.0, -0.5, size=(n_heads, len(atomic_numbers)))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    try:
        kwargs = dict(
            r_max=r_max,
            num_bessel=6,
            num_polynomial_cutoff=5,
            max_ell=max_ell,
            interaction_cls=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            interaction_cls_first=modules.interaction_classes[
                "RealAgnosticResidualInteractionBlock"
            ],
            num_interactions=2,
            num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps("8x0e + 8x1o"),
            MLP_irreps=o3.Irreps("8x0e"),
            atomic_energies=energies if heads is not None else energies[0],
            avg_num_neighbors=6.5,
            atomic_numbers=list(atomic_numbers),
            correlation=correlation,
            gate=torch.nn.functional.silu,
            pair_repulsion=pair_repulsion,
            radial_MLP=[16, 16],
            heads=heads,
            # mace-torch's reduced coupling basis exists only with cuEquivariance
            # installed; the full basis is that of every older MACE file
            use_reduced_cg=use_reduced_cg,
        )
        if embedding_specs is not None:
            kwargs["embedding_specs"] = embedding_specs
            kwargs["use_embedding_readout"] = use_embedding_readout
        if scale_shift:
            scale = [0.8 + 0.3 * i for i in range(n_heads)]
            shift = [0.1 - 0.2 * i for i in range(n_heads)]
            model = modules.ScaleShiftMACE(
                atomic_inter_scale=scale if heads is not None else scale[0],
                atomic_inter_shift=shift if heads is not None else shift[0],
                **kwargs,
            )
        else:
            model = modules.MACE(**kwargs)
    finally:
        torch.set_default_dtype(previous)
    # MACE's own random initialisation: weights of a realistic size
    return model.to(dtype).eval()


def save_mace_model(path: Path, **kwargs) -> Path:
    """Build a model with :func:`build_mace_model` and ``torch.save`` it whole."""
    torch.save(build_mace_model(**kwargs), path)
    return path


#: mace-torch's dipole classes, by the readout kind of metatrain_mace.trunk.response
DIPOLE_CLASSES = {
    "dipole": "AtomicDipolesMACE",
    "dielectric": "AtomicDielectricMACE",
    "energy_dipole": "EnergyDipolesMACE",
}
#: MLP irreps that each class's non-linear readout can take (its gate keeps only
#: the irreps of the readout's output)
_DIPOLE_MLP_IRREPS = {
    "dipole": "8x1o",
    "dielectric": "8x0e + 8x1o + 8x2e",
    "energy_dipole": "8x0e + 8x1o",
}


def build_dipole_model(
    kind: str,
    seed: int = 0,
    atomic_numbers: Sequence[int] = ELEMENTS,
    r_max: float = 4.5,
) -> torch.nn.Module:
    """A small model of one of mace-torch's dipole classes (``kind`` a key of
    :data:`DIPOLE_CLASSES`), float64, random weights (and E0s for the energy)."""
    generator = np.random.default_rng(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(seed)
    interaction = modules.interaction_classes["RealAgnosticResidualInteractionBlock"]
    try:
        energies = None
        if kind == "energy_dipole":
            energies = generator.uniform(-5.0, -0.5, size=len(atomic_numbers))
        model = getattr(modules, DIPOLE_CLASSES[kind])(
            r_max=r_max,
            num_bessel=6,
            num_polynomial_cutoff=5,
            max_ell=2,
            interaction_cls=interaction,
            interaction_cls_first=interaction,
            num_interactions=2,
            num_elements=len(atomic_numbers),
            hidden_irreps=o3.Irreps("8x0e + 8x1o + 8x2e"),
            MLP_irreps=o3.Irreps(_DIPOLE_MLP_IRREPS[kind]),
            atomic_energies=energies,
            avg_num_neighbors=6.5,
            atomic_numbers=list(atomic_numbers),
            correlation=2,
            gate=torch.nn.functional.silu,
            radial_MLP=[16, 16],
        )
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
