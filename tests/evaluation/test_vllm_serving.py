"""The serving check: vLLM (the engine of docling-serve and batch conversion) loads a checkpoint saved by
train.py and answers, greedily, exactly what stock transformers answers for the same images and prompt.

vLLM pins its own torch and transformers, so it lives in its own venv: `make test-vllm` builds `.venv-vllm` and
runs this file (marked ``vllm``, not part of the default run). vLLM's CPU attention rejects head_dim 16, so the
model is the ``tiny_hd64`` preset (head_dim 64 in both towers, like the real model), trained to memorise a few
samples so that the answers compared are real DocTags and formulas, not one repeated token.
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

import pytest
from conftest import run_script
from PIL import Image
from test_memorisation import IMAGE_EDGE, generate_like_the_model_card, make_memorisation_data
from transformers import AutoModelForImageTextToText, AutoProcessor

EOS = "<|end_of_text|>"


@pytest.fixture(scope="module")
def memorised(tmp_path_factory, tiny_processor):
    """(data folder, checkpoint): tiny_hd64 trained by train.py until it answers its samples by heart."""
    pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm)")
    tmp_path = tmp_path_factory.mktemp("memorised")
    # tiny_hd64 keeps tiny's tiles, patches and pixel shuffle, so tiny's processor sees the same tile layouts.
    data = make_memorisation_data(tmp_path / "data", tiny_processor)
    files = sorted((data / "anns" / "train").glob("*.json"))
    run = tmp_path / "run"
    trained = run_script(
        "train.py", "experiment=quick", "model=tiny_hd64", f"dataset.sample.path={data}",
        f"model.image_longest_edge={IMAGE_EDGE}", "training.max_steps=80", f"training.batch_size={len(files)}",
        "data.val_ratio=0", "data.num_workers=0", "training.warmup_steps=0", "training.min_lr=1e-3",
        "training.log_interval=40", f"hydra.run.dir={run}", timeout=1200,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    return data, run / "final_model"


@pytest.mark.vllm
def test_vllm_answers_a_trained_checkpoint_exactly_like_transformers(memorised, tmp_path):
    data, checkpoint = memorised
    files = sorted((data / "anns" / "train").glob("*.json"))

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    requests, expected = [], []
    for file in files:
        record = json.loads(file.read_text())
        turn = record["anns"][0] if isinstance(record["anns"], list) else record["anns"]
        paths = record["img_pth"] if isinstance(record["img_pth"], list) else [record["img_pth"]]
        assert len(paths) == 1  # vLLM is started with limit_mm_per_prompt={"image": 1}
        images = [Image.open(data / p).convert("RGB") for p in paths]
        max_tokens = len(processor.tokenizer(turn["assistant"])["input_ids"]) + 10
        answer = generate_like_the_model_card(model, processor, images, turn["user"], max_tokens)
        assert answer == turn["assistant"] + EOS, file.name  # memorised: the answers below are worth comparing
        expected.append(answer)
        requests.append({"images": [str(data / p) for p in paths], "question": turn["user"], "max_tokens": max_tokens})
    (tmp_path / "requests.json").write_text(json.dumps(requests))

    served = run_script(
        "tests/scripts/vllm_generate.py", str(checkpoint), str(tmp_path / "requests.json"),
        str(tmp_path / "answers.json"), timeout=900,
    )  # fmt: skip
    assert served.returncode == 0, served.stderr[-3000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert len(answers) == len(files)
    for file, answer, want in zip(files, answers, expected, strict=True):
        for route in ("generate", "chat"):  # the model card's prompt, and vLLM's own chat template (vllm serve)
            # vLLM leaves the stop token out of the text but keeps it in the ids
            assert answer[route]["text"] + EOS == want, (file.name, route)
            assert answer[route]["token_ids"][-1] == processor.tokenizer.eos_token_id, (file.name, route)


@pytest.fixture(scope="module")
def server(memorised):
    """``make serve``'s command on the memorised checkpoint, on a free port; its base URL."""
    _, checkpoint = memorised
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(checkpoint.parent / "vllm_server.log", "w")  # noqa: SIM115
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--served-model-name",
        "granite-docling",
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "4096",
        "--gpu-memory-utilization",  # on a CPU: the share of RAM vLLM keeps for its KV cache
        "0.15",
        "--limit-mm-per-prompt",
        '{"image": 1}',
        "--trust-request-mm-kwargs",  # a dataset's image_longest_edge travels as mm_processor_kwargs
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900
    try:
        while True:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError((checkpoint.parent / "vllm_server.log").read_text()[-3000:]) from None
                time.sleep(2)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@pytest.mark.vllm
def test_the_server_engine_predicts_what_the_transformers_engine_predicts(memorised, server, tmp_path):
    data, checkpoint = memorised
    common = [
        f"checkpoint={checkpoint}",
        "dataset=[sample]",
        f"dataset.sample.path={data}",
        "eval.split=all",
        f"dataset.sample.image_longest_edge={IMAGE_EDGE}",
        "eval.max_new_tokens=256",
    ]
    runs = {}
    for engine in ("transformers", "server"):
        runs[engine] = tmp_path / engine
        done = run_script(
            "evaluate.py",
            *common,
            f"eval.engine={engine}",
            f"eval.server_url={server}",
            f"hydra.run.dir={runs[engine]}",
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    read = {
        e: [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
        for e, run in runs.items()
    }
    assert len(read["server"]) == len(read["transformers"]) >= 3
    for ours, theirs in zip(read["transformers"], read["server"], strict=True):
        assert ours["id"] == theirs["id"]
        assert (theirs["prediction"], theirs["stopped"]) == (ours["prediction"], ours["stopped"]), ours["id"]
        assert ours["stopped"] and ours["prediction"] == ours["reference"]  # memorised: real answers compared
