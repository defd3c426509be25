"""Training state is never lost: SIGTERM writes a checkpoint, and a resumed run logs the same losses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, run_script
from fixture_data import good_dataset
from transformers import AutoModelForImageTextToText, AutoProcessor

from granite_docling.checkpoint import complete_checkpoints, load_training_state
from granite_docling.train_loop import EXIT_INTERRUPTED


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return good_dataset(tmp_path_factory.mktemp("resume"), 10)


def args(data, run_dir, *extra):
    return ["train.py", "experiment=quick", f"dataset.sample.path={data}", "training.max_steps=24",
            "training.batch_size=2", "training.val_ratio=0", "training.num_workers=0", "training.save_steps=10",
            "training.log_interval=5", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip


def test_sigterm_checkpoint_then_resume_auto_logs_the_same_losses(data, tmp_path):
    reference = run_script(*args(data, tmp_path / "a"), timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run_dir = tmp_path / "b"
    process = subprocess.Popen(
        [sys.executable, *args(data, run_dir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "checkpoint_step_10").exists():
        assert process.poll() is None and time.time() < deadline, "no first checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    (stopped_at,) = complete_checkpoints(run_dir / "checkpoints")
    interrupted_step = load_training_state(stopped_at)["loop"]["step"]
    assert 10 <= interrupted_step < 24, "the signal should stop the run early"
    assert not (run_dir / "final_model").exists()
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temporary folders
    # the checkpoint is a stock model folder too
    AutoModelForImageTextToText.from_pretrained(stopped_at)
    AutoProcessor.from_pretrained(stopped_at)

    resumed = run_script(*args(data, run_dir, "training.resume=auto"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stopped_at}" in resumed.stdout + resumed.stderr
    expected, got = losses(tmp_path / "a"), losses(run_dir)
    assert sorted(got) == sorted(expected) == list(range(1, 25))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), f"step {step}"


def test_legacy_resume_flag_continues_from_a_checkpoint(data, tmp_path):
    first = run_script(*args(data, tmp_path / "a", "training.max_steps=4", "training.save_steps=4"), timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = tmp_path / "a" / "checkpoints" / "checkpoint_step_4"
    legacy = tmp_path / "legacy.py"
    legacy.write_text(
        "def get_config():\n"
        f"    return {{'model': {{'checkpoint': None}}, 'datasets': [{{'name': 'sample', 'path': '{data}'}}],\n"
        "            'training': {'num_epochs': 1, 'batch_size': 2, 'val_ratio': 0.0, 'num_workers': 0}}\n"
    )
    result = run_script("train.py", "--config", str(legacy), "--resume", str(checkpoint), "model=tiny",
                        "training.max_steps=6", "training.mixed_precision=no", "training.gradient_checkpointing=false",
                        f"hydra.run.dir={tmp_path / 'b'}", timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "at step 4" in result.stdout + result.stderr
    assert sorted(losses(tmp_path / "b")) == [5, 6]
