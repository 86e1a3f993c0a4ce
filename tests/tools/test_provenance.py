"""Exported models rebuilt in Python from the record their export stores.

References: the model that was exported (its weights and its predictions for every
target, value and gradient), and MACE model files loaded directly. The rebuilt
model must match them exactly: same state, same numbers.
"""

import copy
import json
import zipfile

import ase.build
import pytest
import torch
from metatrain.utils.architectures import get_default_hypers
from metatrain.utils.data import DatasetInfo
from metatrain.utils.data.target_info import get_energy_target_info

from helpers.datasets import mixed_structures
from helpers.mace_files import CHARGE_SPIN_SPECS, ELEMENTS, save_mace_model
from helpers.options import LORA_WITH_REPLAY_HEAD, ORDINARY, default_model
from helpers.parity import predict
from helpers.symmetry import all_kinds_dataset_info, structures
from metatrain_mace import MetaMACE, export_mace_model
from metatrain_mace.finetune.strategies import apply_finetuning
from metatrain_mace.tools import provenance
from metatrain_mace.tools.export import mace_file_to_model
from metatrain_mace.trunk import mace_args


def _assert_same_state(rebuilt: MetaMACE, original: MetaMACE) -> None:
    mine, theirs = rebuilt.state_dict(), original.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if key.endswith(("dummy_buffer", "type_to_index")):
            # metatrain's placeholders: random numbers that only carry a dtype, and
            # an atomic number -> index map left uninitialised where no type is
            continue
        assert mine[key].dtype == value.dtype, key
        assert torch.equal(mine[key], value), key


def _assert_same_predictions(rebuilt, original, frames, info) -> None:
    mine, theirs = predict(rebuilt, frames, info), predict(original, frames, info)
    assert mine.keys() == theirs.keys() and len(theirs) > 0
    for name, value in theirs.items():
        torch.testing.assert_close(mine[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hypers_built_model_with_every_target_kind(tmp_path, dtype) -> None:
    torch.manual_seed(0)
    hypers = default_model(**ORDINARY)
    info = all_kinds_dataset_info()
    model = MetaMACE(hypers, info).to(dtype).eval()
    with torch.no_grad():
        for parameter in model.heads.parameters():
            parameter.normal_()
    path = tmp_path / "model.pt"
    model.export().save(str(path))

    rebuilt = provenance.rebuild(str(path))
    assert not rebuilt.from_file and rebuilt.hypers == model.hypers
    assert set(rebuilt.dataset_info.targets) == set(info.targets)
    for name, target in info.targets.items():
        assert rebuilt.dataset_info.targets[name].is_compatible_with(target), name
    _assert_same_state(rebuilt, model)
    frames = structures()
    _assert_same_predictions(
        rebuilt.to(torch.float64), model.to(torch.float64), frames, info
    )


FILE_KINDS = {
    "plain MACE": dict(scale_shift=False),
    "two heads and ZBL": dict(heads=["pbe", "r2scan"], pair_repulsion=True),
    "charge and spin": dict(
        embedding_specs=CHARGE_SPIN_SPECS, use_embedding_readout=True
    ),
    "reduced coupling basis": dict(use_reduced_cg=True),
}


@pytest.mark.parametrize("kind", list(FILE_KINDS))
def test_models_exported_from_mace_files(tmp_path, kind) -> None:
    kwargs = FILE_KINDS[kind]
    file = save_mace_model(tmp_path / "file.model", **kwargs)
    head = "r2scan" if "heads" in kwargs else None
    path = tmp_path / "model.pt"
    export_mace_model(str(file), str(path), head=head)

    # the record is JSON, with mace-torch's classes by name
    plain = provenance.read(str(path))
    json.dumps(plain["mace_trunk"])
    assert plain["mace_trunk"]["class"].startswith("mace.modules.models:")
    assert plain["mace_trunk"]["use_reduced_cg"] == ("reduced" in kind)

    rebuilt = provenance.rebuild(str(path))
    direct = mace_file_to_model(str(file), head=head)
    assert type(rebuilt.trunk.mace) is type(direct.trunk.mace)
    assert rebuilt.trunk.head_index == direct.trunk.head_index
    assert mace_args.record(rebuilt.trunk.mace) == mace_args.record(direct.trunk.mace)
    _assert_same_state(rebuilt, direct)
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=ELEMENTS,
        targets={
            "energy": get_energy_target_info(
                "energy",
                {"unit": "eV"},
                add_position_gradients=True,
                add_strain_gradients=True,
            )
        },
    )
    _assert_same_predictions(rebuilt, direct, mixed_structures(), info)


def test_fine_tuned_readout_heads_and_lora_adapters(tmp_path) -> None:
    file = save_mace_model(tmp_path / "file.model", atomic_numbers=[29, 79])
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[29, 79],
        targets={
            name: get_energy_target_info(
                name,
                {"unit": "eV"},
                add_position_gradients=True,
                add_strain_gradients=True,
            )
            for name in ("energy", "energy/new")
        },
    )
    hypers = {
        **get_default_hypers("experimental.mace")["model"],
        "mace_model": str(file),
        "head_hidden_sizes": [8],
    }
    model = MetaMACE(hypers, info)
    apply_finetuning(model, copy.deepcopy(LORA_WITH_REPLAY_HEAD))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name or name.startswith("heads."):
                parameter.normal_(std=0.3)
    model.eval()
    path = tmp_path / "model.pt"
    model.export().save(str(path))

    rebuilt = provenance.rebuild(str(path))
    assert rebuilt.heads.readout_heads == model.heads.readout_heads == ["energy/new"]
    _assert_same_state(rebuilt, model)
    cell = ase.build.bulk("Cu", "fcc", a=3.7, cubic=True) * (2, 1, 1)
    cell.numbers[::3] = 79
    cell.rattle(0.08, seed=2)
    frames = [cell]
    _assert_same_predictions(rebuilt, model, frames, info)


def test_exports_without_a_record_are_refused(tmp_path) -> None:
    class Other(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = Other()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.module(x)

    for name, module in [("bare", Other()), ("wrapped", Wrapper())]:
        path = tmp_path / f"{name}.pt"
        torch.jit.save(torch.jit.script(module), str(path))
        assert provenance.is_exported(path)
        with pytest.raises(ValueError, match="holds no record of its Python model"):
            provenance.rebuild(str(path))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert not provenance.is_exported(text)
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as archive:
        archive.writestr("a.txt", "a")
    assert not provenance.is_exported(tmp_path / "plain.zip")


def test_records_name_only_mace_classes_and_known_gates(tmp_path) -> None:
    file = save_mace_model(tmp_path / "file.model")
    plain = mace_args.record(mace_file_to_model(str(file)).trunk.mace)
    assert json.loads(json.dumps(plain)) == plain
    assert plain["gate"] == "silu"
    rebuilt = mace_args.rebuild(plain)
    assert mace_args.record(rebuilt) == plain
    for key, value, message in [
        ("class", "os:system", "not a class of mace-torch"),
        ("readout_cls", "subprocess:Popen", "not a class of mace-torch"),
        ("class", "mace.tools.cg:U_matrix_real", "not a torch module class"),
        ("gate", "save", "unknown readout gate 'save'"),
    ]:
        with pytest.raises(ValueError, match=message):
            mace_args.rebuild({**plain, key: value})


def test_a_trunk_that_cannot_be_recorded_still_exports(tmp_path, monkeypatch) -> None:
    file = save_mace_model(tmp_path / "file.model")

    def refuse(mace):
        raise ValueError("cannot record the readout gate <softsign> by name")

    monkeypatch.setattr(mace_args, "record", refuse)
    path = tmp_path / "model.pt"
    export_mace_model(str(file), str(path))
    assert provenance.read(str(path))["mace_trunk"] is None
    with pytest.raises(ValueError, match="could not be recorded at export.*softsign"):
        provenance.rebuild(str(path))
