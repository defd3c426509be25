"""The GGUF check: ``granite-docling export gguf`` turns a checkpoint trained by train.py into GGUF files that
llama.cpp's ``llama-server`` serves (``-m model.gguf --mmproj mmproj.gguf``), and ``evaluate.py eval.engine=server``
gets from it, greedily, exactly what the transformers engine gets from the checkpoint; the q8_0 export is scored
the same way and its metric deltas printed.

llama.cpp's converter imports mistral-common, and llama-server is built from the pinned release: ``make test-gguf``
builds both (``.venv-gguf``, ``.llama.cpp/``) and runs this file (marked ``gguf``, not part of the default run).
The model is the memorised tiny preset of ``test_mlx_serving.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import test_mlx_serving
from conftest import run_script
from test_mlx_serving import evaluate, train_memorised

from granite_docling.atomic_folders import file_records
from granite_docling.evaluation.metrics import METRICS

LLAMA_SERVER = Path(".llama.cpp") / "build" / "bin" / "llama-server"
transformers_run = test_mlx_serving.transformers_run  # the fixture, on this module's memorised checkpoint


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_processor):
    pytest.importorskip("mistral_common", reason="llama.cpp's converter needs mistral-common (make test-gguf)")
    pytest.importorskip("sentencepiece", reason="llama.cpp's converter needs sentencepiece (make test-gguf)")
    if not LLAMA_SERVER.is_file():
        pytest.skip(f"{LLAMA_SERVER} is not built (make llama.cpp)")
    return train_memorised(tmp_path_factory, tiny_processor)


def export_gguf(checkpoint: Path, out: Path, *options: str) -> Path:
    """``granite-docling export gguf`` in a fresh interpreter; the checkpoint's files are the same bytes after."""
    before = file_records(checkpoint)
    done = run_script("-m", "granite_docling.cli", "export", "gguf", str(checkpoint), str(out), *options, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GGUF model (" in done.stdout and str(out) in done.stdout
    assert file_records(checkpoint) == before
    return out


@contextmanager
def llama_server(model: Path):
    """llama-server on ``model``'s GGUF files, on a free loopback port; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = model.parent / f"{model.name}_server.log"
    log = open(log_path, "w")  # noqa: SIM115
    # --special: DocTags tags are special tokens, and llama-server leaves them out of answers without it (it does
    # not read skip_special_tokens)
    command = [
        str(LLAMA_SERVER.resolve()), "-m", str(model / "model.gguf"), "--mmproj", str(model / "mmproj.gguf"),
        "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "4096", "--parallel", "1", "--threads", "2",
        "--no-warmup", "--special",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@pytest.mark.gguf
def test_the_f16_gguf_export_answers_exactly_what_transformers_answers(memorised, transformers_run, tmp_path):
    data, checkpoint = memorised
    model = export_gguf(checkpoint, tmp_path / "gguf")
    info = json.loads((model / "export.json").read_text())
    assert info["types"] == {"model.gguf": "f16", "mmproj.gguf": "f16"}
    with llama_server(model) as url:
        served, _ = evaluate(checkpoint, data, tmp_path / "eval", "eval.engine=server", f"eval.server_url={url}")
    expected, _ = transformers_run
    assert len(served) == len(expected)
    for ours, theirs in zip(expected, served, strict=True):
        assert ours["id"] == theirs["id"]
        assert (theirs["prediction"], theirs["stopped"]) == (ours["prediction"], ours["stopped"]), ours["id"]


@pytest.mark.gguf
def test_the_q8_0_gguf_export_is_scored_against_transformers(memorised, transformers_run, tmp_path):
    data, checkpoint = memorised
    model = export_gguf(checkpoint, tmp_path / "gguf_q8", "--type", "q8_0")
    f16_bytes = (checkpoint / "model.safetensors").stat().st_size // 2
    q8_bytes = (model / "model.gguf").stat().st_size
    with llama_server(model) as url:
        served, metrics = evaluate(checkpoint, data, tmp_path / "eval", "eval.engine=server", f"eval.server_url={url}")
    expected, reference = transformers_run
    assert [record["id"] for record in served] == [record["id"] for record in expected]
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(expected, served, strict=True))
    deltas = {
        name: metrics["overall"][name]["mean"] - reference["overall"][name]["mean"]
        for name in METRICS
        if (metrics["overall"].get(name) or {}).get("mean") is not None
        and (reference["overall"].get(name) or {}).get("mean") is not None
    }
    assert deltas
    print(
        f"GGUF q8_0: {same}/{len(expected)} answers as transformers', model.gguf {q8_bytes / 1e6:.1f} MB "
        f"(the checkpoint in f16: {f16_bytes / 1e6:.1f} MB); metric deltas vs transformers: "
        + ", ".join(f"{name} {delta:+.3f}" for name, delta in deltas.items())
    )
