"""Model folders of ours are loaded whole or refused in one line: every saved file has its content hash in the
manifest, a same-size overwrite or a truncation is named wherever a folder is read (model loading for evaluate.py,
predict and model.checkpoint=, resume, resume=auto passing over to the checkpoint before), a folder that is no
granite-docling model is refused before anything loads, and saved files follow the umask."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict

import pytest
import torch
from conftest import compose_config
from PIL import Image

from granite_docling.checkpoint import load_training_state, rng_state, save_checkpoint, training_state
from granite_docling.checkpoint_manifest import (
    MANIFEST_FILE,
    STATE_FILE,
    TENSORS_FILE,
    CheckpointError,
    DamagedCheckpointError,
    folder_manifest,
    is_training_checkpoint,
    model_folder_problem,
    read_manifest,
)
from granite_docling.cli import main
from granite_docling.config import ConfigError, ModelConfig, TrainingConfig
from granite_docling.evaluation.runner import check_model
from granite_docling.model import load_model_and_processor, stock_processor
from granite_docling.preflight import check_paths
from granite_docling.run_control import whole_training_state
from granite_docling.training_run import LoopState

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model_and_processor(compose_config("model=tiny").model)


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    """A final_model (no training state) and a checkpoint_step_1 of the tiny preset, saved as train.py saves them."""
    model, processor = tiny
    root = tmp_path_factory.mktemp("saved")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = training_state(optimizer, scheduler, asdict(LoopState(step=1)), [rng_state()], "")
    final = save_checkpoint(root / "final_model", model, processor, None)
    step = save_checkpoint(root / "checkpoints" / "checkpoint_step_1", model, processor, state)
    return final, step


def overwrite_middle(path, size=4096) -> None:
    """Same size, other bytes: 4 KiB in the middle of the file, as a bad sector or a stray write leaves it."""
    data = bytearray(path.read_bytes())
    size = min(size, len(data) // 2)
    start = (len(data) - size) // 2
    data[start : start + size] = b"!" * size
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def copy(folder, to):
    shutil.copytree(folder, to)
    return to


def loads(folder) -> ModelConfig:
    return ModelConfig(name="t", checkpoint=str(folder), random_init=False)


def test_a_model_folder_alone_has_a_manifest_with_hashes_but_is_no_training_checkpoint(saved):
    final, step = saved
    manifest = folder_manifest(final)
    assert manifest["format"] == 3 and "step" not in manifest
    assert set(manifest["files"][WEIGHTS]) == {"bytes", "xxh3_128"}
    assert manifest["files"][WEIGHTS]["bytes"] == (final / WEIGHTS).stat().st_size
    assert read_manifest(final) is None and not is_training_checkpoint(final)
    assert read_manifest(step)["step"] == 1 and {STATE_FILE, TENSORS_FILE, WEIGHTS} <= set(read_manifest(step)["files"])
    with pytest.raises(CheckpointError, match="it is a model folder, not a training checkpoint"):
        load_training_state(final)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_saved_file_follows_the_umask(tiny, tmp_path, umask, mode):
    model, processor = tiny
    before = os.umask(umask)
    try:
        folder = save_checkpoint(tmp_path / "final_model", model, processor, None)
    finally:
        os.umask(before)
    modes = {path.relative_to(folder).as_posix(): path.stat().st_mode & 0o777 for path in folder.rglob("*")}
    assert WEIGHTS in modes and MANIFEST_FILE in modes  # safetensors writes 0600 whatever the umask
    assert {name: mode for name in modes} == modes


def test_same_size_damage_and_truncation_are_refused_by_the_model_loaders(saved, tmp_path):
    final, step = saved
    damaged = copy(final, tmp_path / "damaged")
    overwrite_middle(damaged / WEIGHTS)
    truncated = copy(final, tmp_path / "truncated")
    truncate(truncated / WEIGHTS)
    hub_like = copy(final, tmp_path / "no_manifest")  # someone else's model: no manifest, loads as it is
    (hub_like / MANIFEST_FILE).unlink()

    model, _ = load_model_and_processor(loads(final))
    assert model.config.model_type == "idefics3"
    for folder, what in ((damaged, "has other bytes than it was saved with"), (truncated, "bytes instead of")):
        for load in (lambda f: load_model_and_processor(loads(f)), check_model):  # predict / train.py; evaluate.py
            with pytest.raises(DamagedCheckpointError) as raised:
                load(str(folder))
            assert str(raised.value).startswith(f"checkpoint {folder} is damaged: {WEIGHTS} ")
            assert what in str(raised.value) and "\n" not in str(raised.value)
    load_model_and_processor(loads(hub_like))
    truncate(hub_like / WEIGHTS)
    with pytest.raises(DamagedCheckpointError, match=f"is damaged: {WEIGHTS} cannot be read"):
        load_model_and_processor(loads(hub_like))

    training_state_only = copy(step, tmp_path / "checkpoint_step_1")  # model.checkpoint= reads the model's files
    overwrite_middle(training_state_only / TENSORS_FILE)
    load_model_and_processor(loads(training_state_only))
    with pytest.raises(DamagedCheckpointError, match=f"{TENSORS_FILE} has other bytes"):
        load_training_state(training_state_only)


def test_predict_names_a_damaged_checkpoint_in_one_line(saved, tmp_path, capsys):
    final, _ = saved
    damaged = copy(final, tmp_path / "final_model")
    overwrite_middle(damaged / WEIGHTS)
    Image.new("RGB", (32, 32), "white").save(tmp_path / "page.png")
    code = main(["predict", str(damaged), str(tmp_path / "page.png"), "--out", str(tmp_path / "out")])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: checkpoint {damaged} is damaged: {WEIGHTS} has other bytes")
    assert not list((tmp_path / "out").rglob("*.doctags"))


def test_resume_auto_passes_over_a_damaged_newest_checkpoint_and_resume_path_refuses_it(saved, tmp_path, caplog):
    _, step = saved
    root = tmp_path / "checkpoints"
    folders = [copy(step, root / f"checkpoint_step_{n}") for n in (1, 2, 3)]
    for n, folder in enumerate(folders, 1):  # the manifest's step orders them; it is not among the hashed files
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        (folder / MANIFEST_FILE).write_text(json.dumps({**manifest, "step": n}))
    overwrite_middle(folders[2] / WEIGHTS)
    truncate(folders[1] / TENSORS_FILE)

    with caplog.at_level(logging.WARNING, logger="granite_docling.run_control"):
        chosen, state = whole_training_state(folders[2], TrainingConfig(resume="auto"))
    assert chosen == folders[0] and state["loop"]["step"] == 1
    warnings = [record.getMessage() for record in caplog.records]
    assert len(warnings) == 2
    assert warnings[0].startswith(f"training.resume=auto: {folders[2]} is damaged ({WEIGHTS} has other bytes")
    assert warnings[1].startswith(f"training.resume=auto: {folders[1]} is damaged ({TENSORS_FILE} has ")

    with pytest.raises(DamagedCheckpointError, match=f"checkpoint {folders[2]} is damaged: {WEIGHTS} has other"):
        whole_training_state(folders[2], TrainingConfig(resume=str(folders[2])))
    overwrite_middle(folders[0] / WEIGHTS)
    with pytest.raises(CheckpointError, match=f"every checkpoint in {root} is damaged"):
        whole_training_state(folders[2], TrainingConfig(resume="auto"))


def test_an_older_manifest_of_sizes_alone_still_loads(saved, tmp_path):
    _, step = saved
    older = copy(step, tmp_path / "checkpoint_step_1")
    manifest = json.loads((older / MANIFEST_FILE).read_text())
    sizes = {name: record["bytes"] for name, record in manifest["files"].items()}
    (older / MANIFEST_FILE).write_text(json.dumps({**manifest, "format": 2, "files": sizes}))
    assert load_training_state(older)["loop"]["step"] == 1
    load_model_and_processor(loads(older))
    truncate(older / WEIGHTS)
    with pytest.raises(DamagedCheckpointError, match=f"{WEIGHTS} has .* bytes instead of"):
        load_training_state(older)


def folder_with_config(tmp_path, name, config) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return str(folder)


def test_folders_that_are_no_granite_docling_model_are_refused_before_anything_loads(saved, tmp_path, capsys):
    final, _ = saved
    custom = json.loads((final / "config.json").read_text()) | {"auto_map": {"AutoConfig": "evil.Config"}}
    cases = {
        folder_with_config(tmp_path, "bert", {"model_type": "bert"}): "holds a 'bert' model, not granite-docling's",
        folder_with_config(tmp_path, "empty", {}): "its config.json names no model_type",
        folder_with_config(tmp_path, "custom", custom): "asks to run the folder's own code (auto_map)",
        folder_with_config(tmp_path, "broken", "{not json"): "its config.json cannot be read as JSON",
        str(tmp_path / "run" / "final_model"): "no such folder",
        str(tmp_path): "is not a model folder (no config.json)",
    }
    for folder, expected in cases.items():
        assert expected in model_folder_problem("checkpoint", folder), folder
        for load in (lambda f: load_model_and_processor(loads(f)), stock_processor, check_model):
            with pytest.raises(CheckpointError, match=expected.replace("(", r"\(").replace(")", r"\)")):
                load(folder)
        code = main(["validate", str(tmp_path), "--checkpoint", folder])
        assert code == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith(f"error: {folder}") and expected in line

    bert = next(iter(cases))
    with pytest.raises(ConfigError, match=f"model.checkpoint={bert} holds a 'bert' model"):
        check_paths(compose_config("experiment=quick", f"model.checkpoint={bert}", "model.random_init=false"))
