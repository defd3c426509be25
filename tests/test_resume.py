"""The older flag of the seed's scripts, ``--resume CKPT``, continues a run (SIGTERM, SIGKILL and resume=auto:
test_checkpoint_safety.py)."""

from __future__ import annotations

import json

import pytest
from conftest import run_script
from fixture_data import good_dataset


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
            "training.batch_size=2", "data.val_ratio=0", "data.num_workers=0", "training.save_steps=10",
            "training.log_interval=5", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip


@pytest.mark.slow  # --resume's translation: test_launch; legacy files' data keys: test_data_section
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
