"""Every benchmark of ``make bench`` (and the GPU check's CPU smoke test) runs in its quickest mode in the default
suite and prints the JSON its users read, so a changed signature fails here rather than in ``make bench``. Numbers
are not checked here beyond what must hold at any size; benchmarks/RESULTS.md has them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_script

BENCHMARKS = REPO / "benchmarks"
REAL_DOCS = REPO / "tests" / "fixtures" / "real_docs"


def last_json_line(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def last_json_object(stdout: str) -> dict:
    """The last JSON object printed, on one line or indented over several."""
    lines = stdout.strip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.loads("\n".join(lines[start:]))


def test_loss_memory_quick_mode_gives_the_stock_loss():
    done = run_script("benchmarks/loss_memory.py", "--json", "--seq-len", "256", "--prompt-tokens", "64",
                      "--vocab", "4096", "--hidden", "64", "--chunk-size", "64")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_line(done.stdout)
    assert {"peak_mb_chunked", "peak_mb_full", "ratio", "supervised_tokens"} <= set(result)
    assert result["supervised_tokens"] == 256 - 64 - 1
    assert result["loss_chunked"] == pytest.approx(result["loss_full"], rel=1e-5)


@pytest.mark.slow  # make test-slow; the quick mode above runs by default
def test_loss_memory_chunked_loss_is_the_stock_loss_in_less_memory():
    # 2,048 positions x 32k classes: full float32 logits are 256 MB, a 256-position chunk 32 MB.
    done = run_script("benchmarks/loss_memory.py", "--json", "--seq-len", "2048", "--prompt-tokens", "512",
                      "--vocab", "32768", "--hidden", "64", "--chunk-size", "256")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_line(done.stdout)
    assert result["loss_chunked"] == pytest.approx(result["loss_full"], rel=1e-5)
    assert result["peak_mb_chunked"] < result["peak_mb_full"] / 2


def test_gpu_check_cpu_smoke_runs_every_part_and_tags_its_lines():
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu-smoke"], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [line["part"] for line in lines] == ["step", "step", "mix", "trl"], lines
    assert not [line for line in lines if "error" in line or "skipped" in line]
    steps, (mix,), (trl,) = lines[:2], lines[2:3], lines[3:]
    assert [line["freeze_vision"] for line in steps] == [False, True]
    for line in steps:
        assert {"samples_per_s", "mfu", "peak_memory_gb", "data_wait_share", "batch_size", "tflop_per_sample"} <= set(
            line
        )
        assert line["samples_per_s"] > 0 and 0 <= line["data_wait_share"] <= 1
        assert line["tiles_per_sample"] > 0 and line["supervised_per_sample"] > 0
    trained, frozen = steps
    assert frozen["tflop_per_sample"] < trained["tflop_per_sample"]  # same page: no vision backward when frozen
    budget, batch1 = mix["budget"], mix["batch1"]  # token_budget.py's quick mode: the same steps, fewer passes
    for run in (batch1, budget):
        assert run["samples_per_s"] > 0 and 0 <= run["data_wait_share"] <= 1
        assert run["mfu"] is None and run["peak_gpu_memory_gb"] is None  # on a CPU: no peak FLOPs, no GPU
    assert budget["largest_padded_tokens"] <= mix["batch_tokens"] == batch1["longest_sample"]
    assert budget["passes"] < batch1["passes"] and budget["passes_logged"] == budget["passes"]
    assert budget["by_dataset"]["crops"]["samples_per_pass"] > 1
    assert budget["mean_loss"] == pytest.approx(batch1["mean_loss"], abs=1e-4)  # the same steps, cut otherwise
    # vs_trl.py in its default mode (its --same-order mode has a test of its own below)
    assert trl["same_samples"] and trl["ratio"] > 0 and trl["ours_peak_gpu_memory_mb"] is None
    assert trl["trl_supervised_tokens_per_sample"] == trl["ours_supervised_tokens_per_sample"] + 1  # the newline
    assert abs(trl["ours_loss"] - trl["trl_loss"]) < 0.05


def test_a_gpu_check_part_that_runs_past_its_slice_says_so(tmp_path):
    # A slice too short for anything: every part reports its time-out (or skip) as a line, and the check ends.
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "GPU_CHECK_LIMIT_S": "6"}
    done = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--cpu-smoke"], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(line) for line in done.stdout.strip().splitlines()]
    assert [line["part"] for line in lines] == ["step", "mix", "trl"], lines
    assert lines[0]["error"] == "timed out after 2 s" and lines[1]["error"] == "timed out after 2 s"
    assert lines[2] == {"part": "trl", "skipped": "time budget"}


@pytest.mark.slow  # vs_trl.py's quick mode runs in the default suite as the GPU check smoke test's trl part
@pytest.mark.parametrize("same_order", [True])  # the other mode runs in the GPU check's smoke test above
def test_vs_trl_smallest_run(tmp_path: Path, same_order: bool):
    from granite_docling.tools.prepare import prepare_dataset

    # Two short real pages of the tiny preset: both trainers, one epoch of batch 1.
    prepare_dataset([REAL_DOCS / "multi_page.pdf"], tmp_path)
    for annotation in (tmp_path / "anns" / "train").glob("*.json"):
        if annotation.stem not in ("multi_page_3", "multi_page_4"):
            annotation.unlink()
    quick = ["--json", "--data", str(tmp_path), "--epochs", "1", "--warmup", "1", "--batch-size", "1"]
    order = ["--same-order"] if same_order else []
    done = run_script(
        "benchmarks/vs_trl.py", *quick, *order, "--num-workers", "0", "--override", "model.random_init=true"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = last_json_line(done.stdout)
    assert {"ratio", "ours_loss", "trl_loss", "ours_samples_per_s", "trl_samples_per_s"} <= set(result)
    assert result["ratio"] > 0 and result["same_samples"] and result["ours_samples"] == 2
    assert result["ours_peak_memory_mb"] > 0 and result["trl_peak_memory_mb"] > 0
    extra = 0 if same_order else 1  # TRL also supervises the newline after <|end_of_text|>, unless masked
    assert result["trl_supervised_tokens_per_sample"] == result["ours_supervised_tokens_per_sample"] + extra
    if same_order:  # the same tokens of the same batches in the same order from the same weights: the same losses
        assert result["max_step_loss_rel_diff"] < 1e-4
    else:
        assert abs(result["ours_loss"] - result["trl_loss"]) < 0.05


def test_checkpoint_io_chooses_the_newest_checkpoint_from_the_manifests_alone():
    done = run_script("benchmarks/checkpoint_io.py", "--preset", "tiny", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_line(done.stdout)
    assert result["checkpoints"] == 3 and len(result["save_seconds"]) == 3
    assert result["resume_auto_bytes_read"] < 10_000  # three small manifests
    assert result["older_format_bytes_read"] > 3 * result["training_state_pt_mb"] * 2**20 * 0.99


def test_checkpoint_hash_quick_mode_times_hashing_and_checking_against_reading():
    done = run_script("benchmarks/checkpoint_hash.py", "--model-mb", "2", "--state-mb", "3", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_line(done.stdout)
    for cache in ("warm", "cold"):
        for part in ("read_all", "hash_all", "check_all", "read_model", "check_model"):
            assert result[f"{cache}_{part}_s"] >= 0 and result[f"{cache}_{part}_gb_s"] > 0, (cache, part)


def test_image_path_quick_mode_compares_the_fast_path_with_the_stock_processor():
    done = run_script("benchmarks/image_path.py", "--max-samples", "1", "--repeats", "1", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_object(done.stdout)
    assert result["input_ids_equal"] and result["tile_layout_equal"]
    assert result["worker_cpu_ratio"] > 0 and result["bytes_ratio"] > 1


def test_padding_quick_mode_predicts_the_padding_the_loader_makes():
    done = run_script("benchmarks/padding.py", "--pages", "6", "--formulas", "6", "--epochs", "1", "--check-batches",
                      "1", "--json", timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_object(done.stdout)
    assert result["predicted_equals_measured"] and result["samples"] > 0
    assert 0 <= result["padding_fraction"] <= result["random_padding_fraction"]


def test_scale_quick_mode_trains_on_a_built_folder(tmp_path):
    # One page a sample: a run starts with its heaviest step, and three-page documents made it ~25 s on 2 cores.
    plan = ["--plan", "folder:20", "--max-pages", "1"]
    done = run_script("benchmarks/scale.py", *plan, "--work", str(tmp_path), "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (case,) = last_json_object(done.stdout)["cases"]
    assert case["samples"] == 20 and set(case["runs"]) == {"first", "cached"}
    for run in case["runs"].values():
        assert run["error"] is None and run["steps"] == 3 and run["memory_mb"] > 0
    assert case["runs"]["cached"]["index_reused"]


def test_step_profile_quick_mode_times_every_phase():
    done = run_script("benchmarks/step_profile.py", "--preset", "tiny", "--samples", "2", "--image-edge", "0", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_line(done.stdout)
    assert result["samples_timed"] == 1
    assert set(result["share"]) == {"data", "inputs", "vision", "connector", "text", "loss", "backward", "optimizer"}
    assert all(seconds >= 0 for seconds in result["seconds_per_sample"].values())
    assert sum(result["share"].values()) == pytest.approx(1.0)


def test_optimizers_quick_mode_trains_and_reports_each_run():
    done = run_script("benchmarks/optimizers.py", "--optimizers", "sgd", "--schedules", "wsd", "--steps", "1",
                      "--pages", "2", "--formulas", "4", timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = last_json_line(done.stdout)
    assert (result["optimizer"], result["scheduler"], result["steps"], result["exit_code"]) == ("sgd", "wsd", 1, 0)
    assert 0 < result["val_loss"] < 20 and result["seconds_per_step"] > 0
