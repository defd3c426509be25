"""One run folder for all processes of a launch; legacy argv translation."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO, run_script

from granite_docling import launch

STAMP_SCRIPT = """
import os, time
rank = int(os.environ["RANK"])
time.sleep(2.5 * rank)  # rank 1 asks seconds later: its own clock would give another folder
from granite_docling.launch import run_stamp
print(f"rank{rank}={run_stamp()}", flush=True)
"""


def test_all_torchrun_processes_agree_on_one_run_folder(tmp_path):
    script = tmp_path / "stamp.py"
    script.write_text(STAMP_SCRIPT)
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), timeout=120)
    assert result.returncode == 0, result.stderr
    stamps = dict(line.split("=", 1) for line in result.stdout.split() if line.startswith("rank"))
    assert set(stamps) == {"rank0", "rank1"}
    assert stamps["rank0"] == stamps["rank1"]


def test_single_process_stamp_is_a_date_and_time(monkeypatch):
    monkeypatch.setattr(launch, "_stamp", None)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    date, clock = launch.run_stamp().split("/")
    assert len(date) == 10 and len(clock) == 8
    assert launch.run_stamp() == f"{date}/{clock}"  # stable within a process


def test_rank_suffix_keeps_log_files_apart(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert launch.rank_suffix() == ""
    monkeypatch.setenv("RANK", "3")
    assert launch.rank_suffix() == "_rank3"


def test_argv_without_legacy_flags_is_untouched():
    argv = ["dataset=[sample]", "training.seed=3", "-m"]
    assert launch.translate_legacy_argv(argv) == argv


def test_legacy_argv_becomes_a_generated_primary_config(tmp_path):
    argv = launch.translate_legacy_argv(
        ["--config", str(REPO / "conf/legacy/granite_docling_test.py"), "--resume", str(tmp_path), "training.seed=1"]
    )
    assert argv[0] == "--config-dir" and argv[2:4] == ["--config-name", "legacy_config"]
    assert argv[4:] == [f"training.resume={tmp_path}", "training.seed=1"]
    generated = (Path(argv[1]) / "legacy_config.yaml").read_text()
    assert "DoclingMatix_test" in generated and "config_schema" in generated


def test_resume_flag_without_legacy_config_says_what_to_use():
    with pytest.raises(SystemExit, match="training.resume"):
        launch.translate_legacy_argv(["--resume", "ckpt"])


def test_hydra_settings_put_runs_under_outputs():
    result = run_script("train.py", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr
    assert "dir: outputs/${run_stamp:}" in result.stdout
    assert "dir: outputs/multirun/${run_stamp:}" in result.stdout
