"""The per-block precision report (``metatrain-mace precision``).

References: the report of float64 against itself is exactly zero; float32 sits
between 1e-9 and 1e-3 relative in every row; a block that secretly computes in
bfloat16 stands out in its own row; the end-to-end numbers equal the differences
of two separately built models.
"""

import csv

import ase.io
import pytest
import torch
from metatomic_ase import MetatomicCalculator
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_energy_target_info

from helpers.datasets import mixed_structures
from helpers.mace_files import CHARGE_SPIN_SPECS, save_mace_model
from helpers.symmetry import structures
from metatrain_mace import MetaMACE
from metatrain_mace.tools.cli import main
from metatrain_mace.tools.export import mace_file_to_model
from metatrain_mace.tools.precision import (
    _end_to_end,
    _graph,
    _reference_inputs,
    _stages,
    load_for_report,
    precision_report,
)
from metatrain_mace.trunk.graph import systems_for_model


SMALL = {
    "r_max": 4.0,
    "num_radial_basis": 6,
    "max_ell": 2,
    "num_interactions": 2,
    "hidden_irreps": "8x0e + 8x1o",
    "correlation": 3,
    "MLP_irreps": "8x0e",
    "radial_MLP": [16],
}


def build_small_model(**overrides) -> MetaMACE:
    torch.manual_seed(0)
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6, 8],
        targets={
            "energy": get_energy_target_info(
                "energy",
                {"unit": "eV"},
                add_position_gradients=True,
                add_strain_gradients=True,
            )
        },
    )
    hypers = {**get_default_hypers("experimental.mace")["model"], **SMALL, **overrides}
    model = MetaMACE(hypers, info).eval()
    # a realistic non-zero readout
    with torch.no_grad():
        for parameter in model.trunk.mace.readouts.parameters():
            parameter.normal_()
    return model


@pytest.fixture(scope="module")
def small_model() -> MetaMACE:
    return build_small_model()


BLOCKS = [
    "embedding",
    "interaction.0",
    "product.0",
    "interaction.1",
    "product.1",
    "readout.0",
    "readout.1",
]


def _by_block(rows):
    return {(r.block, r.quantity): r for r in rows}


def test_float64_against_float64_is_exactly_zero(small_model) -> None:
    rows = precision_report(small_model, structures(), ["float64"])
    table = _by_block(rows)
    for block in BLOCKS:
        for quantity in ("forward", "backward"):
            assert (block, quantity) in table
    for quantity in ("energy_per_atom", "forces", "stress"):
        assert ("model", quantity) in table
    assert all(r.status == "ok" for r in rows)
    assert all(r.max_abs_error == 0.0 and r.max_rel_error == 0.0 for r in rows)


def test_float32_errors_are_float32_sized(small_model) -> None:
    rows = precision_report(small_model, structures(), ["float32"])
    for row in rows:
        print(f"{row.block:15s} {row.quantity:16s} {row.max_rel_error:.1e}")
        assert 1e-9 < row.max_rel_error < 1e-3, row


class _Bfloat16Inside(torch.nn.Module):
    """A block that rounds its output to bfloat16 when run in float32: the kind
    of silent cast the report exists to find."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, **kwargs) -> torch.Tensor:
        out = self.block(**kwargs)
        if out.dtype == torch.float32:
            out = out.to(torch.bfloat16).to(torch.float32)
        return out


def test_an_injected_cast_shows_up_in_its_block(small_model) -> None:
    import copy

    clean = _by_block(precision_report(small_model, structures(), ["float32"]))
    broken_model = copy.deepcopy(small_model)
    broken_model.trunk.mace.products[1] = _Bfloat16Inside(
        broken_model.trunk.mace.products[1]
    )
    broken = _by_block(precision_report(broken_model, structures(), ["float32"]))
    row = broken[("product.1", "forward")]
    assert row.max_rel_error > 1e-4
    assert row.max_rel_error > 100 * clean[("product.1", "forward")].max_rel_error
    # the other blocks are not blamed: the inputs of every block are float64's
    for key, other in broken.items():
        if key[0] not in ("product.1", "model"):
            assert other.max_rel_error == pytest.approx(
                clean[key].max_rel_error, rel=1e-6
            ), key
    # and the whole model pays for it
    assert broken[("model", "energy_per_atom")].max_rel_error > 10 * (
        clean[("model", "energy_per_atom")].max_rel_error
    )


def test_command_writes_csv_and_plot(small_model, tmp_path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    torch.save(small_model.get_checkpoint(), checkpoint)
    frames = tmp_path / "frames.xyz"
    ase.io.write(frames, structures())
    output, plot = tmp_path / "report.csv", tmp_path / "report.png"
    main(
        [
            "precision",
            str(checkpoint),
            str(frames),
            "-o",
            str(output),
            "--plot",
            str(plot),
            "--dtypes",
            "float32,bfloat16",
        ]
    )
    with output.open() as fd:
        rows = list(csv.DictReader(fd))
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    assert len(rows) == 2 * (2 * len(BLOCKS) + 3)
    bf16 = {
        (r["block"], r["quantity"]): float(r["max_rel_error"])
        for r in rows
        if r["dtype"] == "bfloat16" and r["status"] == "ok"
    }
    f32 = {
        (r["block"], r["quantity"]): float(r["max_rel_error"])
        for r in rows
        if r["dtype"] == "float32"
    }
    # bfloat16 keeps 8 bits of mantissa, float32 24
    for key, error in bf16.items():
        assert error > 10 * f32[key], key
    assert plot.stat().st_size > 10_000


def test_exported_models_give_the_report_of_their_source(small_model, tmp_path) -> None:
    """An exported model is rebuilt in Python from the record its export stores;
    its report is the report of the model it was exported from, number for
    number, and the same through the command line."""
    path = tmp_path / "model.pt"
    small_model.export().save(str(path))
    frames = tmp_path / "frames.xyz"
    ase.io.write(frames, structures())
    written = ase.io.read(frames, ":")  # positions as the command reads them
    expected = precision_report(small_model, written, ["float32"])
    rebuilt = precision_report(load_for_report(str(path)), written, ["float32"])
    assert [(r.block, r.quantity) for r in rebuilt] == [
        (r.block, r.quantity) for r in expected
    ]
    for mine, theirs in zip(rebuilt, expected, strict=True):
        assert mine.max_abs_error == theirs.max_abs_error, mine
    output = tmp_path / "report.csv"
    main(
        ["precision", str(path), str(frames), "-o", str(output), "--dtypes", "float32"]
    )
    with output.open() as fd:
        rows = list(csv.DictReader(fd))
    assert len(rows) == len(expected)
    for row, theirs in zip(rows, expected, strict=True):
        assert float(row["max_abs_error"]) == pytest.approx(
            theirs.max_abs_error, rel=1e-6
        )
    # a head is chosen when a MACE file is exported, not afterwards
    with pytest.raises(SystemExit):
        main(["precision", str(path), str(frames), "--head", "pbe"])


def test_report_on_the_cueq_backend() -> None:
    # correlation 2: cuEquivariance's CPU fallback compiles correlation 3 slowly
    model = build_small_model(correlation=2)
    rows = precision_report(model, structures(), ["float64", "float32"], "cueq")
    assert {r.backend for r in rows} == {"cueq"}
    for row in rows:
        assert row.status == "ok", row
        if row.dtype == "float64":
            assert row.max_rel_error == 0.0, row
        else:
            assert 1e-9 < row.max_rel_error < 1e-3, row


def test_charge_and_spin_reach_the_report(tmp_path) -> None:
    """For a MACE conditioned on total charge and spin, the report's float64
    reference chain is the model's own trunk with the charges of atoms.info, and
    its end-to-end energy is the exported model's through metatomic's ASE
    calculator."""
    file = save_mace_model(
        tmp_path / "charged.model",
        embedding_specs=CHARGE_SPIN_SPECS,
        use_embedding_readout=True,
    )
    model = mace_file_to_model(str(file))
    frames = mixed_structures()
    frames[0].info.update(charge=1, spin=2)
    layers = {}
    for charged in (True, False):
        atoms_list = frames if charged else mixed_structures()
        systems = systems_for_model(model, atoms_list, torch.float64)
        graph = _graph(model, systems)
        stages = _stages(model, graph)
        inputs = dict(
            zip(
                [name for name, _, _ in stages],
                _reference_inputs(model, stages, graph["vectors"]),
                strict=True,
            )
        )
        conditioning = model.trunk.conditioning(
            systems, graph["system_index"], torch.float64
        )
        features = model.trunk(
            graph["node_attrs"].to(torch.float64),
            graph["edge_index"],
            graph["vectors"],
            conditioning,
        )
        for layer, expected in enumerate(features):
            torch.testing.assert_close(
                inputs[f"readout.{layer}"]["node_feats"], expected, rtol=0, atol=0
            )
        layers[charged] = features[-1]
    # the charge and spin of the molecule changed its features
    assert (layers[True] - layers[False]).abs().max() > 1e-3

    path = tmp_path / "charged.pt"
    model.export().save(str(path))
    reference = _end_to_end(model, frames, torch.float64)["energy_per_atom"]
    for i, atoms in enumerate(frames):
        atoms = atoms.copy()
        atoms.calc = MetatomicCalculator(str(path))
        energy = atoms.get_potential_energy() / len(atoms)
        assert float(reference[i]) == pytest.approx(energy, abs=1e-10)


class _NoHalf(torch.nn.Module):
    """A block that cannot run in float16, as some CPU kernels cannot."""

    def __init__(self, block: torch.nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, **kwargs) -> torch.Tensor:
        if kwargs["node_feats"].dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return self.block(**kwargs)


def test_a_dtype_that_cannot_run_is_reported_as_skipped(small_model, tmp_path) -> None:
    import copy

    model = copy.deepcopy(small_model)
    model.trunk.mace.products[0] = _NoHalf(model.trunk.mace.products[0])
    rows = precision_report(model, structures(), ["float32", "float16"])
    skipped = [r for r in rows if r.dtype == "float16"]
    assert [(r.block, r.quantity) for r in skipped] == [
        ("blocks", "all"),
        ("model", "all"),
    ]
    for row in skipped:
        assert row.status.startswith("skipped: RuntimeError: ") and "Half" in row.status
        assert row.max_rel_error != row.max_rel_error  # NaN
    assert all(r.status == "ok" for r in rows if r.dtype == "float32")
    assert len([r for r in rows if r.dtype == "float32"]) == 2 * len(BLOCKS) + 3
    # the CSV keeps the reason, the plot leaves the dtype out
    from metatrain_mace.tools.precision import plot_report, write_csv

    with write_csv(rows, tmp_path / "report.csv").open() as fd:
        written = [r for r in csv.DictReader(fd) if r["dtype"] == "float16"]
    assert [r["status"] for r in written] == [r.status for r in skipped]
    assert plot_report(rows, tmp_path / "report.png").stat().st_size > 10_000
