"""The checkpoint format: training state without pickle, a manifest written last, durable and failure-safe saves."""

from __future__ import annotations

import errno
import json
import math
import random
from dataclasses import asdict

import numpy as np
import pytest
import torch
import xxhash

import granite_docling.checkpoint as checkpoint
from granite_docling.atomic_folders import describe_write_error
from granite_docling.checkpoint import (
    CheckpointError,
    CheckpointSaveError,
    load_training_state,
    pack_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    training_state,
    unpack_state,
    write_training_state,
)
from granite_docling.checkpoint_manifest import (
    MANIFEST_FILE,
    PICKLED_STATE_FILE,
    STATE_FILE,
    TENSORS_FILE,
    complete_checkpoints,
    latest_checkpoint,
    read_manifest,
)
from granite_docling.training_run import LoopState


def test_pack_state_round_trips_every_type_a_training_state_holds():
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)}},
        "param_groups": [{"betas": (0.9, 0.95), "params": [0, 1], "name": "text", "foreach": None, "lr": 1e-3}],
        "numpy": ("MT19937", np.arange(4, dtype=np.uint32), 624, 0, 0.0),
        "python": (3, (1, 2, 3), None),
        "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "odd": {"__tensor__": "not a tag", 1.5: "float key"},
        "nan": float("nan"),
    }
    packed, tensors = pack_state(tree)
    text = json.dumps(packed)  # all of it is JSON
    assert set(tensors) == {"state/0/step", "state/0/exp_avg", "bytes"}
    back = unpack_state(json.loads(text), tensors)
    assert back["state"][0]["exp_avg"].dtype == torch.bfloat16
    assert torch.equal(back["state"][0]["exp_avg"], tree["state"][0]["exp_avg"])
    assert list(back["state"]) == [0]  # an int key stays an int
    assert back["param_groups"][0]["betas"] == (0.9, 0.95) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][1].tolist() == [0, 1, 2, 3]
    assert back["python"] == (3, (1, 2, 3), None)
    assert back["odd"] == {"__tensor__": "not a tag", 1.5: "float key"}  # a key that looks like a tag is no tag
    assert math.isnan(back["nan"])
    with pytest.raises(TypeError, match="cannot store a object"):
        pack_state({"x": object()})


def test_rng_states_survive_the_round_trip_exactly():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    packed, tensors = pack_state(rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(unpack_state(json.loads(json.dumps(packed)), tensors))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def small_training(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW([{"params": model.parameters(), "name": "all"}], lr=1e-2, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    return model, optimizer, scheduler


def take_step(model, optimizer, scheduler, seed: int) -> None:
    torch.manual_seed(seed)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def test_saved_optimizer_and_schedule_continue_exactly(tmp_path):
    model, optimizer, scheduler = small_training()
    for seed in range(3):
        take_step(model, optimizer, scheduler, seed)
    loop = asdict(LoopState(step=3, epoch=1, samples_in_epoch=15))
    write_training_state(tmp_path, training_state(optimizer, scheduler, loop, [rng_state()], "training: {}\n"))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert (manifest["format"], manifest["step"], manifest["epoch"]) == (3, 3, 1)
    assert set(manifest["files"]) == {STATE_FILE, TENSORS_FILE}
    tensors = (tmp_path / TENSORS_FILE).read_bytes()
    assert manifest["files"][TENSORS_FILE] == {"bytes": len(tensors), "xxh3_128": xxhash.xxh3_128(tensors).hexdigest()}

    saved = load_training_state(tmp_path)
    resumed_model, resumed_optimizer, resumed_scheduler = small_training(seed=9)
    resumed_model.load_state_dict(model.state_dict())
    resumed_optimizer.load_state_dict(saved["optimizer"])
    resumed_scheduler.load_state_dict(saved["scheduler"])
    assert saved["loop"]["samples_in_epoch"] == 15 and saved["config"] == "training: {}\n"
    take_step(model, optimizer, scheduler, seed=7)
    take_step(resumed_model, resumed_optimizer, resumed_scheduler, seed=7)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_damaged_or_unfinished_checkpoint_is_refused_with_advice(tmp_path):
    model, optimizer, scheduler = small_training()
    take_step(model, optimizer, scheduler, 0)
    write_training_state(tmp_path, training_state(optimizer, scheduler, asdict(LoopState(step=1)), [rng_state()], ""))
    tensors = tmp_path / TENSORS_FILE
    tensors.write_bytes(tensors.read_bytes()[:-10])  # what a power cut without fsync can leave
    with pytest.raises(CheckpointError, match="is damaged: .*tensors.safetensors has .* bytes instead of"):
        load_training_state(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="not completely written: resume from an earlier checkpoint"):
        load_training_state(tmp_path)


class RunsCode:
    """Unpickling this creates ``marker``: what a crafted training_state.pt can do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickled_state_is_read_only_when_asked_and_then_only_as_plain_data(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "checkpoints" / "checkpoint_step_4"
    folder.mkdir(parents=True)
    torch.save({"loop": {"step": 4}, "payload": RunsCode(marker)}, folder / PICKLED_STATE_FILE)
    with pytest.raises(CheckpointError, match="pickled format.*training.trust_checkpoint=true"):
        load_training_state(folder)
    assert latest_checkpoint(folder.parent) == folder  # listing it reads nothing
    with pytest.raises(CheckpointError, match="holds more than tensors and plain values, so it is not read"):
        load_training_state(folder, trust_pickle=True)
    assert not marker.exists()  # not even when asked

    model, optimizer, scheduler = small_training()
    take_step(model, optimizer, scheduler, 0)
    older = training_state(optimizer, scheduler, asdict(LoopState(step=4)), [rng_state()], "training: {}\n")
    torch.save(older, folder / PICKLED_STATE_FILE)  # what the older format wrote: tensors, NumPy RNG arrays
    loaded = load_training_state(folder, trust_pickle=True)
    assert loaded["loop"]["step"] == 4 and np.array_equal(loaded["rng"][0]["numpy"][1], older["rng"][0]["numpy"][1])


def test_newest_checkpoint_comes_from_the_manifests_alone(tmp_path, monkeypatch):
    model, optimizer, scheduler = small_training()
    take_step(model, optimizer, scheduler, 0)
    root = tmp_path / "checkpoints"
    for name, step in [("checkpoint_step_20", 20), ("checkpoint_epoch_1", 25), ("checkpoint_step_5", 5)]:
        (root / name).mkdir(parents=True)
        write_training_state(root / name, training_state(optimizer, scheduler, asdict(LoopState(step=step)), [], ""))
    (root / "checkpoint_step_9").mkdir()  # a pickled one of the older format: oldest
    torch.save({}, root / "checkpoint_step_9" / PICKLED_STATE_FILE)
    (root / "checkpoint_step_30").mkdir()  # no manifest: never finished
    (root / ".checkpoint_step_31.tmp-123").mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("listing checkpoints loaded training state")

    monkeypatch.setattr(checkpoint, "load_file", no_loading)
    monkeypatch.setattr(torch, "load", no_loading)
    names = [p.name for p in complete_checkpoints(root)]
    assert names == ["checkpoint_step_9", "checkpoint_step_5", "checkpoint_step_20", "checkpoint_epoch_1"]
    assert [p.name for p in checkpoint.rotate_checkpoints(root, keep=2)] == names[:2]


class Processor:
    def save_pretrained(self, folder):
        (folder / "processor_config.json").write_text("{}")


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)

    def save_pretrained(self, folder, safe_serialization=True):
        folder.mkdir(parents=True, exist_ok=True)
        checkpoint.save_file(self.state_dict(), folder / "model.safetensors")


def test_a_full_disk_mid_save_leaves_the_previous_checkpoint_and_no_temporary_folder(tmp_path, monkeypatch):
    model, optimizer, scheduler = small_training()
    take_step(model, optimizer, scheduler, 0)
    root = tmp_path / "checkpoints"
    state = training_state(optimizer, scheduler, asdict(LoopState(step=1)), [rng_state()], "")
    first = save_checkpoint(root / "checkpoint_step_1", Model(), Processor(), state)
    before = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()}

    real_save_file = checkpoint.save_file

    def disk_full(tensors, path):
        real_save_file(tensors, path)
        with open(path, "r+b") as file:  # half the file is on the disk when the space runs out
            file.truncate(path.stat().st_size // 2)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    for name in ("checkpoint_step_2", "checkpoint_step_1"):  # a new name, and the same name again (final_model)
        with pytest.raises(CheckpointSaveError) as raised:
            save_checkpoint(root / name, Model(), Processor(), state)
        message = str(raised.value)
        assert message.startswith(f"could not save checkpoint {root / name}: No space left on device")
        assert "\n" not in message
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_step_1"]  # no temporary folder left
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file()} == before
    monkeypatch.setattr(checkpoint, "save_file", real_save_file)
    assert load_training_state(first)["loop"]["step"] == 1


def test_write_errors_are_told_in_a_users_words(tmp_path):
    assert describe_write_error(PermissionError(errno.EACCES, "x"), tmp_path / "c") == "Permission denied"
    wrapped = RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert describe_write_error(wrapped, tmp_path / "c").startswith("No space left on device (")
    assert describe_write_error(RuntimeError("unexpected pos 25785472"), tmp_path / "c") == "unexpected pos 25785472"


def test_the_loss_curve_marks_a_checkpoint_at_the_step_of_its_manifest(tmp_path):
    from granite_docling.evaluation.loss_curve import checkpoint_step

    model, optimizer, scheduler = small_training()
    folder = tmp_path / "checkpoint_epoch_1"
    folder.mkdir()
    write_training_state(folder, training_state(optimizer, scheduler, asdict(LoopState(step=25, epoch=1)), [], ""))
    assert checkpoint_step(folder) == 25
    assert checkpoint_step(tmp_path / "checkpoint_step_40") == 40  # no manifest: the folder's name


def test_rotation_renames_a_checkpoint_out_of_sight_before_deleting_it(tmp_path, monkeypatch):
    model, optimizer, scheduler = small_training()
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"checkpoint_step_{step}").mkdir(parents=True)
        write_training_state(
            root / f"checkpoint_step_{step}", training_state(optimizer, scheduler, asdict(LoopState(step)), [], "")
        )
    (root / ".checkpoint_step_0.deleting-99").mkdir()  # left by a rotation that was killed

    def killed_mid_delete(path, ignore_errors=False):  # deletes one file (not the manifest), then the process dies
        [p for p in sorted(path.rglob("*")) if p.is_file()][-1].unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.rotate_checkpoints(root, keep=2)
    assert [p.name for p in complete_checkpoints(root)] == ["checkpoint_step_2", "checkpoint_step_3"]
    for folder in complete_checkpoints(root):  # nothing that looks complete is half-deleted
        load_training_state(folder)
    assert [read_manifest(p) for p in root.glob(".checkpoint_step_1.deleting-*")] == [None]  # no manifest over holes
    monkeypatch.undo()
    checkpoint.rotate_checkpoints(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint_step_2", "checkpoint_step_3"]


def test_evaluate_reads_the_split_settings_from_a_checkpoints_own_state_or_asks_to_trust_a_pickle(tmp_path):
    from granite_docling.evaluation.config import EvalConfig, training_split_settings

    model, optimizer, scheduler = small_training()
    folder = tmp_path / "copied" / "checkpoint_step_3"  # no run folder (.hydra) above it
    folder.mkdir(parents=True)
    config = "training:\n  seed: 7\n  val_ratio: 0.2\n"
    write_training_state(folder, training_state(optimizer, scheduler, asdict(LoopState(step=3)), [rng_state()], config))
    assert training_split_settings(str(folder), EvalConfig()) == (0.2, 7)
    assert training_split_settings(str(folder), EvalConfig(seed=1, val_ratio=0.1)) == (0.1, 1)

    older = tmp_path / "older" / "checkpoint_step_3"
    older.mkdir(parents=True)
    torch.save({"config": config}, older / PICKLED_STATE_FILE)
    with pytest.raises(CheckpointError, match="eval.seed=... eval.val_ratio=..., or trust_checkpoint=true"):
        training_split_settings(str(older), EvalConfig())
    assert training_split_settings(str(older), EvalConfig(), trust_pickle=True) == (0.2, 7)
    assert training_split_settings(str(older), EvalConfig(split="all")) == (0.0, 42)  # needs no settings


def test_a_replacement_killed_between_its_renames_gets_its_old_copy_back(tmp_path):
    model, optimizer, scheduler = small_training()
    state = training_state(optimizer, scheduler, asdict(LoopState(step=1)), [rng_state()], "")
    final = save_checkpoint(tmp_path / "final_model", Model(), Processor(), state)
    aside = tmp_path / ".final_model.old-4242"
    final.rename(aside)  # the old copy moved aside; the process died before the new one was renamed in
    (tmp_path / ".final_model.tmp-4242").mkdir()
    checkpoint.remove_temporaries(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_model"]
    assert load_training_state(final)["loop"]["step"] == 1
