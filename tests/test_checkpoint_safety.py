"""Checkpoints one can trust, end to end: no code runs from a crafted training_state.pt, a SIGTERM checkpoints and
SIGKILLs at any moment lose nothing, and a full disk stops every process with one line while the previous
checkpoint stays whole."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_script
from fixture_data import good_dataset, write_image
from test_checkpoint import RunsCode
from transformers import AutoModelForImageTextToText, AutoProcessor

from granite_docling.checkpoint import load_training_state
from granite_docling.checkpoint_manifest import MANIFEST_FILE, PICKLED_STATE_FILE, latest_checkpoint, read_manifest
from granite_docling.run_control import EXIT_INTERRUPTED


def args(data, run_dir, *extra):
    return ["train.py", "experiment=quick", f"dataset.sample.path={data}", "training.batch_size=2",
            "data.val_ratio=0", "data.num_workers=0", "training.log_interval=1", f"hydra.run.dir={run_dir}",
            *extra]  # fmt: skip


def train_losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The data and checkpoint_step_2 of a 2-step run."""
    root = tmp_path_factory.mktemp("trained")
    data = good_dataset(root / "data", 6)
    done = run_script(*args(data, root / "run", "training.max_steps=2", "training.save_steps=2"), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return data, root / "run" / "checkpoints" / "checkpoint_step_2"


def in_older_format(checkpoint, folder, state) -> None:
    """A copy of ``checkpoint`` whose training state is only ``state`` pickled in training_state.pt."""
    shutil.copytree(checkpoint, folder)
    shutil.rmtree(folder / "training_state")
    (folder / MANIFEST_FILE).unlink()
    torch.save(state, folder / PICKLED_STATE_FILE)


def start(*script_args, cwd=REPO):
    return subprocess.Popen([sys.executable, *script_args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip


def test_a_crafted_training_state_never_runs_and_the_older_format_runs_when_trusted(trained, tmp_path):
    data, checkpoint = trained
    marker = tmp_path / "the pickle ran"
    crafted = tmp_path / "crafted" / "checkpoints" / "checkpoint_step_2"
    in_older_format(checkpoint, crafted, {"loop": {"step": 2}, "payload": RunsCode(marker)})
    auto_run = tmp_path / "auto"  # a run folder whose newest checkpoint is the crafted one
    shutil.copytree(crafted.parents[1], auto_run)
    older = tmp_path / "older" / "checkpoints" / "checkpoint_step_2"
    in_older_format(checkpoint, older, load_training_state(checkpoint))
    write_image(tmp_path / "page.png")

    refused = {  # every place a checkpoint is read; each must refuse the pickle in one line, or not read it
        "resume=PATH": start(*args(data, tmp_path / "a", f"training.resume={crafted}", "training.max_steps=3")),
        "resume=auto": start(*args(data, auto_run, "training.resume=auto", "training.max_steps=3")),
        "evaluate.py": start("evaluate.py", f"checkpoint={crafted}", "dataset=[sample]",
                             f"dataset.sample.path={data}", "eval.split=val", f"hydra.run.dir={tmp_path / 'e'}"),
    }  # fmt: skip
    predicted = start("-m", "granite_docling.cli", "predict", str(crafted), str(tmp_path / "page.png"), "--out",
                      str(tmp_path / "p"), "--max-new-tokens", "4")  # fmt: skip
    trusted = start(*args(data, tmp_path / "t", f"training.resume={older}", "training.trust_checkpoint=true",
                          "training.max_steps=4", "training.save_steps=4"))  # fmt: skip

    for where, process in refused.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, f"{where}: {stderr[-3000:]}"
        (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert "pickled format" in line and "trust_checkpoint=true" in line, where
        assert "Traceback" not in stderr, where
    _, stderr = predicted.communicate(timeout=300)
    assert predicted.returncode == 0, stderr[-3000:]  # predict needs no training state: the model files are enough
    assert not marker.exists()

    stdout, stderr = trusted.communicate(timeout=300)
    assert trusted.returncode == 0, stderr[-3000:]
    assert "a pickle, because trust_checkpoint is set" in stdout + stderr
    assert "resumed from" in stdout + stderr and sorted(train_losses(tmp_path / "t")) == [3, 4]
    assert read_manifest(tmp_path / "t" / "checkpoints" / "checkpoint_step_4")["step"] == 4  # saved in the safe format


def test_sigterm_then_sigkills_at_random_moments_of_a_run_that_saves_every_step_lose_nothing(tmp_path):
    data = good_dataset(tmp_path / "data", 8)
    run = ["training.max_steps=14", "training.save_steps=1", "training.max_checkpoints=2", "training.save_interval=0"]
    reference = run_script(*args(data, tmp_path / "reference", *run), timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "stopped"
    checkpoints = run_dir / "checkpoints"
    chance = random.Random(20)
    stopped_at = []
    for signal_name in ("SIGTERM", "SIGKILL", "SIGKILL"):  # each at a random moment of a step or a save
        step_before = newest_step(checkpoints)
        process = start(*args(data, run_dir, *run, "training.resume=auto"))
        deadline = time.time() + 120
        while newest_step(checkpoints) <= step_before:  # this run trains now
            assert process.poll() is None and time.time() < deadline, "no new checkpoint before the signal"
            time.sleep(0.005)
        time.sleep(chance.uniform(0, 0.3))  # a step or a save under way
        process.send_signal(getattr(signal, signal_name))
        stdout, stderr = process.communicate(timeout=60)
        stopped_at.append(newest_step(checkpoints))
        if step_before:
            assert f"resumed from {checkpoints}" in stdout + stderr
        if signal_name == "SIGTERM":  # a checkpoint of the step under way, and the exit code that says so
            assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
            AutoModelForImageTextToText.from_pretrained(latest_checkpoint(checkpoints))  # a stock model folder too
            AutoProcessor.from_pretrained(latest_checkpoint(checkpoints))
            assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # no temporary folder
        for folder in checkpoints.iterdir():  # every folder that looks like a checkpoint loads whole
            if read_manifest(folder):
                load_training_state(folder)
    assert stopped_at[-1] < 14, f"the run ended before the last signal ({stopped_at}): send them sooner"

    finished = run_script(*args(data, run_dir, *run, "training.resume=auto"), timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")]  # what SIGKILLs left is gone
    expected, got = train_losses(tmp_path / "reference"), train_losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 15))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step} (stopped after {stopped_at})"


def newest_step(checkpoints) -> int:
    newest = latest_checkpoint(checkpoints)
    manifest = read_manifest(newest) if newest else None
    return manifest["step"] if manifest else 0


@pytest.fixture
def small_disk(tmp_path):
    """A 150 MB filesystem: one tiny-preset checkpoint (~85 MB) fits, a second does not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_stops_every_process_in_one_line_and_the_previous_checkpoint_resumes(tmp_path, small_disk):
    data = good_dataset(tmp_path / "data", 8)
    run_dir = small_disk / "run"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = ["training.max_steps=4", "training.save_steps=1", "training.max_checkpoints=1", "training.batch_size=1"]
    full = run_script(*launch, *args(data, run_dir, *run), timeout=300)
    assert full.returncode != 0, "the run should have stopped on the full disk"
    main_log, other_log = (run_dir / "train.log").read_text(), (run_dir / "train_rank1.log").read_text()
    (line,) = [line for line in main_log.splitlines() if "ERROR" in line]
    assert f"could not save checkpoint {run_dir / 'checkpoints' / 'checkpoint_step_2'}: No space left on device" in line
    assert "the main process could not save a checkpoint" in other_log  # and so it stopped too
    assert "Traceback" not in main_log + other_log  # (torchrun prints its own when a process exits non-zero)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_step_1"]  # nothing half-written

    previous = run_dir / "checkpoints" / "checkpoint_step_1"
    resume = [f"training.resume={previous}", "training.max_steps=2", "training.batch_size=2"]
    resumed = run_script(*args(data, tmp_path / "resumed", *resume), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "at step 1" in resumed.stdout + resumed.stderr and sorted(train_losses(tmp_path / "resumed")) == [2]


def damage_middle(path) -> None:
    """4 KiB overwritten in the middle of the file, its size unchanged."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = b"!" * 4096
    path.write_bytes(bytes(data))


@pytest.mark.slow  # ~1-2 min on 2 cores, four entry-point runs; tests/test_checkpoint_integrity.py: in-process
def test_damaged_or_truncated_weights_end_each_entry_point_in_one_line_and_resume_auto_takes_the_previous(
    trained, tmp_path
):
    data, checkpoint = trained
    damaged_final = tmp_path / "damaged" / "final_model"
    shutil.copytree(checkpoint.parents[1] / "final_model", damaged_final)
    damage_middle(damaged_final / "model.safetensors")
    truncated_final = tmp_path / "truncated" / "final_model"
    shutil.copytree(checkpoint.parents[1] / "final_model", truncated_final)
    (truncated_final / "model.safetensors").write_bytes((truncated_final / "model.safetensors").read_bytes()[:4096])
    damaged_checkpoint = tmp_path / "copied" / "checkpoint_step_2"
    shutil.copytree(checkpoint, damaged_checkpoint)
    damage_middle(damaged_checkpoint / "model.safetensors")
    auto_run = tmp_path / "auto"  # its newest checkpoint (step 3) damaged, the one before whole
    shutil.copytree(checkpoint, auto_run / "checkpoints" / "checkpoint_step_2")
    newest = auto_run / "checkpoints" / "checkpoint_step_3"
    shutil.copytree(damaged_checkpoint, newest)
    manifest = json.loads((newest / MANIFEST_FILE).read_text())
    (newest / MANIFEST_FILE).write_text(json.dumps({**manifest, "step": 3}))

    refused = {  # where a model folder of ours is read: each names the file and says the checkpoint is damaged
        "evaluate.py": (start("evaluate.py", f"checkpoint={damaged_final}", "dataset=[sample]",
                              f"dataset.sample.path={data}", "eval.split=all", f"hydra.run.dir={tmp_path / 'e'}"),
                        damaged_final, "has other bytes than it was saved with"),
        "model.checkpoint=": (start(*args(data, tmp_path / "m", "model=granite_docling_258m",
                                         f"model.checkpoint={truncated_final}", "training.max_steps=1")),
                              truncated_final, "has 4096 bytes instead of"),
        "resume=PATH": (start(*args(data, tmp_path / "r", f"training.resume={damaged_checkpoint}",
                                    "training.max_steps=3")),
                        damaged_checkpoint, "has other bytes than it was saved with"),
    }  # fmt: skip
    auto = start(*args(data, auto_run, "training.resume=auto", "training.max_steps=3"))
    for where, (process, folder, what) in refused.items():
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, f"{where}: {stderr[-3000:]}"
        (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(f"error: checkpoint {folder} is damaged: model.safetensors {what}"), (where, line)
        assert "Traceback" not in stderr, where

    stdout, stderr = auto.communicate(timeout=300)
    assert auto.returncode == 0, stderr[-3000:]
    (warning,) = [line for line in (auto_run / "train.log").read_text().splitlines() if "is damaged" in line]
    assert f"training.resume=auto: {newest} is damaged (model.safetensors has other bytes" in warning
    assert f"resumed from {auto_run / 'checkpoints' / 'checkpoint_step_2'} at step 2" in stdout + stderr
    assert sorted(train_losses(auto_run)) == [3]  # step 3 trained from the state of step 2
