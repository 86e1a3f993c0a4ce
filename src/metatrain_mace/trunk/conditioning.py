"""Total charge and spin of each structure as MACE inputs (MACE-OMOL-style models).

mace-torch conditions a model on per-structure quantities with ``embedding_specs``
(``model.joint_embedding``): each quantity is embedded (a lookup table for
categorical ones, a small MLP for continuous ones), the embeddings are concatenated
and projected, and the result is added to the node features before the first
interaction. MACE reads them from ``data["total_charge"]`` and
``data["total_spin"]`` (the spin multiplicity 2S+1); its ASE calculator fills them
from ``atoms.info["charge"]`` and ``atoms.info["spin"]``, with 0 and 1 when absent.

Here the same quantities come from metatomic's per-system inputs ``charge`` and
``spin_multiplicity`` (which metatomic's ASE calculator reads from
``atoms.info["charge"]`` and ``atoms.info["spin_multiplicity"]`` or ``["spin"]``,
and metatrain from ``extra_data``). :class:`SystemConditioning` computes MACE's
joint embedding from them with TorchScript-compatible code (mace-torch's own
module keeps its specification in a dict that TorchScript cannot type), sharing
the weights of the MACE module.
"""

import logging
from typing import Any, Dict, List

import torch
from metatomic.torch import System


# MACE's name of each quantity -> metatomic's per-system input
INPUTS = {"total_charge": "charge", "total_spin": "spin_multiplicity"}
# the values MACE uses when a structure does not give one (mace.data.AtomicData)
DEFAULTS = {"total_charge": 0.0, "total_spin": 1.0}
# where metatomic's ASE calculator reads each input in ``atoms.info``, in order
ASE_INFO_KEYS = {
    "charge": ("charge",),
    "spin_multiplicity": ("spin_multiplicity", "spin"),
}


def check_specs(specs: Dict[str, Any], source: str) -> None:
    """Refuse embedding specifications that metatomic inputs cannot feed."""
    for name, spec in specs.items():
        if name not in INPUTS:
            raise ValueError(
                f"{source} conditions MACE on {name!r}; metatrain-mace can feed "
                f"{sorted(INPUTS)} (from metatomic's per-system inputs "
                f"{sorted(INPUTS.values())})"
            )
        if spec.get("per", "graph") != "graph":
            raise ValueError(
                f"{source}: the {name!r} embedding is per {spec['per']!r}; only "
                "per-structure ('graph') quantities are supported"
            )
        kind = spec.get("type")
        if kind == "continuous" and int(spec.get("in_dim", 1)) != 1:
            raise ValueError(
                f"{source}: the continuous {name!r} embedding takes "
                f"{spec['in_dim']} numbers per structure; only 1 is supported"
            )
        if kind not in ("categorical", "continuous"):
            raise ValueError(
                f"{source}: the {name!r} embedding has type {kind!r}; MACE knows "
                "'categorical' and 'continuous'"
            )


def system_input(systems: List[System], key: str, default: float) -> torch.Tensor:
    """The per-system input ``key`` of every system in float64, ``default`` where
    the system does not have it (TorchScript)."""
    device = systems[0].positions.device
    values = torch.full((len(systems),), default, dtype=torch.float64, device=device)
    for i, system in enumerate(systems):
        if key in system.known_data():
            data = system.get_data(key).block().values.reshape(-1)
            values[i] = data[0].to(torch.float64)
    return values


class SystemConditioning(torch.nn.Module):
    """MACE's joint embedding of total charge and spin, per atom.

    :param joint_embedding: the ``joint_embedding`` of a MACE model (its embedders
        and projection are used as they are, weights shared).
    :param specs: the model's ``embedding_specs``, already checked with
        :func:`check_specs` (when the file was loaded or the hypers validated).
    """

    def __init__(self, joint_embedding: torch.nn.Module, specs: Dict[str, Any]):
        super().__init__()
        self.embedders = joint_embedding.embedders
        self.project = joint_embedding.project
        self.inputs: Dict[str, str] = {name: INPUTS[name] for name in specs}
        self.defaults: Dict[str, float] = {name: DEFAULTS[name] for name in specs}
        self.categorical: Dict[str, bool] = {
            name: spec["type"] == "categorical" for name, spec in specs.items()
        }
        self.offsets: Dict[str, int] = {
            name: int(spec.get("offset", 0)) for name, spec in specs.items()
        }
        self.num_classes: Dict[str, int] = {
            name: int(spec.get("num_classes", 0)) for name, spec in specs.items()
        }

    def values(self, systems: List[System], name: str) -> torch.Tensor:
        """The quantity ``name`` of every system (MACE's default where absent)."""
        return system_input(systems, self.inputs[name], self.defaults[name])

    def _refuse(self, values: torch.Tensor, bad: torch.Tensor, name: str, why: str):
        """Raise for the first system whose value of ``name`` is ``bad``:
        ``system I: NAME = VALUE`` and ``why``."""
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            value = float(values[i])
            text = str(int(value)) if value == float(int(value)) else str(value)
            raise ValueError(
                "system " + str(i) + ": " + self.inputs[name] + " = " + text + why
            )

    def check_spin(self, values: torch.Tensor, name: str) -> None:
        """Refuse spin multiplicities below 1 (2S+1 is 1 for a singlet, 2 for a
        doublet, ...), naming the system: a lookup table may have a row for 0."""
        if name == "total_spin":
            self._refuse(
                values,
                values < 1,
                name,
                " is not a spin multiplicity, which is 2S+1 >= 1 (1 for a singlet, "
                + "2 for a doublet, 3 for a triplet)",
            )

    def classes(self, values: torch.Tensor, name: str) -> torch.Tensor:
        """Lookup-table rows of categorical ``values``; refuses values the table
        does not have, naming the system."""
        offset = self.offsets[name]
        rows = values + offset
        bad = (
            (rows != torch.round(rows)) | (rows < 0) | (rows >= self.num_classes[name])
        )
        self._refuse(
            values,
            bad,
            name,
            " cannot be embedded by this MACE model, which knows the integer values "
            + "from "
            + str(-offset)
            + " to "
            + str(self.num_classes[name] - 1 - offset),
        )
        return rows.to(torch.int64)

    def forward(
        self, systems: List[System], system_index: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        """Per-atom embedding, ``[n_atoms, n_features]``, to add to the node
        features of the first layer."""
        embeddings: List[torch.Tensor] = []
        for name, embedder in self.embedders.items():
            values = self.values(systems, name)
            self.check_spin(values, name)
            if self.categorical[name]:
                embedded = embedder(self.classes(values, name))
            else:
                embedded = embedder(values.to(dtype).unsqueeze(-1))
            embeddings.append(embedded.index_select(0, system_index))
        return self.project(torch.cat(embeddings, dim=-1))


def ase_inputs(atoms: Any, names: List[str], dtype: torch.dtype) -> Dict[str, Any]:
    """The per-system inputs ``names`` of an ASE structure as metatomic's ASE
    calculator gives them to a model: from ``atoms.info``, with MACE's defaults."""
    from metatensor.torch import Labels, TensorBlock, TensorMap

    defaults = {INPUTS[k]: v for k, v in DEFAULTS.items()}
    inputs: Dict[str, Any] = {}
    for name in names:
        keys = [key for key in ASE_INFO_KEYS[name] if key in atoms.info]
        value = float(atoms.info[keys[0]]) if keys else defaults[name]
        block = TensorBlock(
            values=torch.tensor([[value]], dtype=dtype),
            samples=Labels(["system"], torch.zeros((1, 1), dtype=torch.int32)),
            components=[],
            properties=Labels([name], torch.tensor([[0]])),
        )
        inputs[name] = TensorMap(Labels(["_"], torch.tensor([[0]])), [block])
    return inputs


# ``extra_data`` names that mean one of the inputs under another name (MACE's own
# ``total_charge`` and ``total_spin`` first): refused, naming the expected one
LOOKALIKES = {
    "charge": ("total_charge", "system_charge", "molecular_charge"),
    "spin_multiplicity": (
        "total_spin",
        "spin",
        "multiplicity",
        "spin_mult",
        "spinmultiplicity",
    ),
}


def report_missing_inputs(
    conditioning: SystemConditioning, datasets: List[Any]
) -> None:
    """One log line per input that some datasets do not give: their structures
    get MACE's default (charge 0, spin multiplicity 1). An ``extra_data`` entry
    that looks like a missing input under another name (MACE's ``total_charge``)
    is refused, naming the name to use."""
    for name, key in conditioning.inputs.items():
        for dataset in datasets:
            fields = dataset[0]._asdict() if len(dataset) > 0 else {}
            wrong = [f for f in fields if f.lower() in LOOKALIKES[key]]
            if key not in fields and wrong:
                what = "total charge" if key == "charge" else "spin multiplicity"
                raise ValueError(
                    f"'extra_data' has {wrong[0]!r}, which this model does not "
                    f"read: it takes the {what} of each structure from '{key}' "
                    f"(metatomic's name for MACE's "
                    f"{name}). Rename '{wrong[0]}:' to '{key}:' in the 'extra_data' "
                    "section of the options file."
                )
        missing = [d for d in datasets if len(d) > 0 and key not in d[0]._asdict()]
        if missing:
            logging.info(
                f"'{key}' is not in the 'extra_data' of {len(missing)} of the "
                f"{len(datasets)} training and validation sets: their structures "
                f"get MACE's default {key} {conditioning.defaults[name]:g}"
            )


def check_dataset_values(
    conditioning: SystemConditioning, datasets: List[Any], split: str
) -> None:
    """Refuse, before training, charges and spins that the model cannot embed,
    naming the dataset and the structure (the forward pass would only name the
    position in a batch)."""
    for d, dataset in enumerate(datasets):
        if len(dataset) == 0:
            continue
        fields = dataset[0]._asdict()
        for name, key in conditioning.inputs.items():
            if key not in fields:
                continue
            values = torch.tensor(
                [
                    float(dataset[i][key].block().values.reshape(-1)[0])
                    for i in range(len(dataset))
                ],
                dtype=torch.float64,
            )
            values = torch.where(
                torch.isnan(values), torch.full_like(values, DEFAULTS[name]), values
            )
            try:
                conditioning.check_spin(values, name)
                if conditioning.categorical[name]:
                    conditioning.classes(values, name)
            except ValueError as error:
                raise ValueError(
                    f"{split} set {d}, structure {str(error)[len('system ') :]}"
                ) from None
