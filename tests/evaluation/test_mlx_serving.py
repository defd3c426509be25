"""The MLX check: ``granite-docling export mlx`` turns a checkpoint trained by train.py into an MLX model that
mlx-vlm's OpenAI-compatible server runs, and ``evaluate.py eval.engine=server`` gets from it, greedily, exactly
what the transformers engine gets from the checkpoint; 8- and 4-bit exports are scored the same way and their
metric deltas printed.

mlx-vlm pins its own transformers and needs MLX (``mlx[cpu]`` on Linux), so it lives in its own venv:
``make test-mlx`` builds ``.venv-mlx`` and runs this file (marked ``mlx``, not part of the default run). The model
is the tiny preset, trained to memorise a few samples (a page and formula crops) so that the answers compared are
real DocTags and formulas, not one repeated token.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import run_script
from test_memorisation import IMAGE_EDGE, make_memorisation_data

from granite_docling.atomic_folders import file_records
from granite_docling.evaluation.metrics import METRICS

QUANTISED = (8, 4)


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_processor):
    pytest.importorskip("mlx_vlm", reason="mlx-vlm is not installed (make test-mlx)")
    return train_memorised(tmp_path_factory, tiny_processor)


def train_memorised(tmp_path_factory, tiny_processor) -> tuple[Path, Path]:
    """(data folder, checkpoint): the tiny preset trained by train.py until it answers its samples by heart."""
    tmp_path = tmp_path_factory.mktemp("memorised")
    data = make_memorisation_data(tmp_path / "data", tiny_processor)
    files = sorted((data / "anns" / "train").glob("*.json"))
    run = tmp_path / "run"
    trained = run_script(
        "train.py", "experiment=quick", f"dataset.sample.path={data}", f"model.image_longest_edge={IMAGE_EDGE}",
        "training.max_steps=120", f"training.batch_size={len(files)}", "data.val_ratio=0", "data.num_workers=0",
        "training.warmup_steps=0", "training.min_lr=1e-3", "training.log_interval=40", f"hydra.run.dir={run}",
        timeout=1200,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    return data, run / "final_model"


def export_mlx(checkpoint: Path, out: Path, *options: str) -> Path:
    """``granite-docling export mlx`` in a fresh interpreter (this venv's: it has mlx-vlm); the checkpoint's files
    are the same bytes afterwards."""
    before = file_records(checkpoint)
    done = run_script("-m", "granite_docling.cli", "export", "mlx", str(checkpoint), str(out), *options, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "MLX model (" in done.stdout and str(out) in done.stdout
    assert file_records(checkpoint) == before
    return out


# One request at a time: mlx-vlm 0.7.10's server batches concurrent requests and fails (HTTP 500, "[concatenate] All
# the input array dimensions must match") when their pages tile differently (9 and 17 tiles); README, Exporting to MLX
SERVER_ENGINE = ("eval.engine=server", "eval.server_concurrency=1")


@contextmanager
def mlx_server(model: Path):
    """mlx-vlm's server on ``model``, on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = model.parent / f"{model.name}_server.log"
    log = open(log_path, "w")  # noqa: SIM115
    command = [sys.executable, "-m", "mlx_vlm", "server", "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--model", str(model)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def evaluate(checkpoint: Path, data: Path, out: Path, *engine: str) -> tuple[list[dict], dict]:
    """evaluate.py on every sample of ``data``: (predictions.jsonl's records, metrics.json)."""
    done = run_script(
        "evaluate.py", f"checkpoint={checkpoint}", "dataset=[sample]", f"dataset.sample.path={data}", "eval.split=all",
        f"dataset.sample.image_longest_edge={IMAGE_EDGE}", "eval.max_new_tokens=256", f"hydra.run.dir={out}", *engine,
        timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return records, json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def transformers_run(memorised, tmp_path_factory):
    data, checkpoint = memorised
    records, metrics = evaluate(checkpoint, data, tmp_path_factory.mktemp("transformers") / "eval")
    assert len(records) >= 3
    for record in records:  # memorised: the answers compared below are real ones
        assert record["stopped"] and record["prediction"] == record["reference"], record["id"]
    return records, metrics


@pytest.mark.mlx
def test_the_mlx_export_answers_exactly_what_transformers_answers(memorised, transformers_run, tmp_path):
    data, checkpoint = memorised
    model = export_mlx(checkpoint, tmp_path / "mlx")
    config = json.loads((model / "config.json").read_text())
    assert "quantization" not in config and config["text_config"]["rope_theta"] == 100000.0
    with mlx_server(model) as url:
        served, _ = evaluate(checkpoint, data, tmp_path / "eval", *SERVER_ENGINE, f"eval.server_url={url}")
    expected, _ = transformers_run
    assert len(served) == len(expected)
    for ours, theirs in zip(expected, served, strict=True):
        assert ours["id"] == theirs["id"]
        assert (theirs["prediction"], theirs["stopped"]) == (ours["prediction"], ours["stopped"]), ours["id"]


@pytest.mark.mlx
@pytest.mark.parametrize("bits", QUANTISED)
def test_quantised_mlx_exports_are_scored_against_transformers(memorised, transformers_run, tmp_path, bits):
    data, checkpoint = memorised
    model = export_mlx(checkpoint, tmp_path / f"mlx_q{bits}", "--quantize", str(bits))
    config = json.loads((model / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == 64
    text = config["text_config"]
    lm_head_bytes = text["vocab_size"] * text["hidden_size"] * 4  # float32, written out in the untied copy
    float_bytes = (checkpoint / "model.safetensors").stat().st_size + lm_head_bytes
    quantised_bytes = sum(file.stat().st_size for file in model.glob("*.safetensors"))
    # bits/32 of the float32 weights, a float32 scale and bias per 64 of them (1 bit a weight), and what stays float
    # (the vision tower, norms: under 1 bit a weight in the tiny model, whose weights are mostly the embeddings)
    assert float_bytes * bits / 32 < quantised_bytes < float_bytes * (bits + 2) / 32, (quantised_bytes, float_bytes)
    with mlx_server(model) as url:
        served, metrics = evaluate(checkpoint, data, tmp_path / "eval", *SERVER_ENGINE, f"eval.server_url={url}")
    expected, reference = transformers_run
    assert [record["id"] for record in served] == [record["id"] for record in expected]
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(expected, served, strict=True))
    deltas = {
        name: metrics["overall"][name]["mean"] - reference["overall"][name]["mean"]
        for name in METRICS
        if (metrics["overall"].get(name) or {}).get("mean") is not None
        and (reference["overall"].get(name) or {}).get("mean") is not None
    }
    assert deltas  # the same metrics were computed for both engines
    print(
        f"MLX {bits}-bit: {same}/{len(expected)} answers as transformers', {quantised_bytes / 1e6:.1f} MB "
        f"(float {float_bytes / 1e6:.1f} MB); metric deltas vs transformers: "
        + ", ".join(f"{name} {delta:+.3f}" for name, delta in deltas.items())
    )
