"""The README's "Use your model in docling" recipes, run: docling's ``VlmPipeline`` converts a real page with a
checkpoint saved by train.py, in-process (``InlineVlmOptions`` with a local folder, transformers) and through
the two servers this machine can run (``ApiVlmOptions``: vLLM, and llama-server on the GGUF export), and gets
the answer the model gives in transformers.

The server options are the README's own code block, executed here with only the port changed, so the README
cannot drift from what was tested. The model is ``tiny_hd64`` (vLLM's CPU attention needs head_dim 64) trained
to answer the page (the first two elements of its ground truth: page headers) by heart, so the answers compared
are real DocTags, special tokens included.

Needs docling (``.venv-docling``), vLLM (``.venv-vllm``), llama.cpp (``.llama.cpp/``) and its converter
(``.venv-gguf``): ``make test-docling-serving`` builds them and runs this file (marked ``docling_serving``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pypdfium2
import pytest
from conftest import REPO, run_script

from granite_docling.data.answers import PAGE_PROMPT

PAGE = REPO / "tests" / "fixtures" / "real_docs" / "2305.03393v1-pg9.pdf"
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
LLAMA_SERVER = REPO / ".llama.cpp" / "build" / "bin" / "llama-server"
IMAGE_EDGE = 256  # the checkpoint's processor resizes pages to this long edge: every runtime reads it from there
EOS = "<|end_of_text|>"

pytestmark = pytest.mark.docling_serving


def readme_block(defining: str) -> str:
    """The README's Python block that assigns the name ``defining`` at its top level."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(encoding="utf-8"), re.S)
    [block] = [b for b in blocks if re.search(rf"^{defining} = ", b, re.M)]
    return block


def page_image():
    return pypdfium2.PdfDocument(PAGE)[0].render(scale=2).to_pil().convert("RGB")  # docling renders at scale 2


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> tuple[Path, str]:
    """(checkpoint, the answer it learned): tiny_hd64 trained by train.py on the real page until it answers by
    heart."""
    pytest.importorskip("docling", reason="docling is not installed (make test-docling-serving)")
    root = tmp_path_factory.mktemp("memorised")
    elements = (PAGE.with_suffix(".doctags.txt")).read_text().removeprefix("<doctag>").split("\n")
    answer = "<doctag>" + "\n".join(elements[:2]) + "</doctag>"
    (root / "data" / "anns" / "train").mkdir(parents=True)
    page_image().save(root / "data" / "page.png")
    record = {"img_pth": "page.png", "anns": [{"user": PAGE_PROMPT, "assistant": answer, "source": "real_docs"}]}
    (root / "data" / "anns" / "train" / "page.json").write_text(json.dumps(record))
    trained = run_script(
        "train.py", "experiment=quick", "model=tiny_hd64", f"dataset.sample.path={root / 'data'}",
        f"model.image_longest_edge={IMAGE_EDGE}", "training.max_steps=60", "training.batch_size=1",
        "data.val_ratio=0", "data.num_workers=0", "training.warmup_steps=0", "training.min_lr=1e-3",
        "training.log_interval=20", f"hydra.run.dir={root / 'run'}", timeout=1200,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = root / "run" / "final_model"
    assert transformers_answer(checkpoint) == answer  # learned: the answers compared below are real DocTags
    return checkpoint, answer


def transformers_answer(checkpoint: Path) -> str:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from granite_docling.evaluation.generate import Prompt, generate

    model = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    [ours] = generate(model, processor, [Prompt([page_image()], PAGE_PROMPT)], max_new_tokens=200, progress=False)
    return ours.text.split(EOS)[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def server(command: list[str], port: int, log_path: Path, start_timeout: float):
    """``command`` running an OpenAI-compatible server on ``port``, until it answers /v1/models."""
    log = open(log_path, "w")  # noqa: SIM115
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    deadline = time.time() + start_timeout
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(log_path.read_text()[-3000:]) from None
                time.sleep(2)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


def readme_options(name: str):
    """One of the README's docling options (its own code block, executed)."""
    namespace: dict = {}
    exec(readme_block(name), namespace)  # noqa: S102 - the README's own code
    return namespace[name]


def readme_server_options(name: str, port: int):
    """The README's ``ApiVlmOptions`` for one runtime, the port changed to the test server's."""
    options = readme_options(name)
    return options.model_copy(update={"url": re.sub(r":\d+/", f":{port}/", str(options.url))})


def docling_answer(vlm_options, **pipeline_options) -> tuple[str, object]:
    """docling's VlmPipeline on the page: (the model's answer as docling received it, the document)."""
    from docling.datamodel.base_models import InputFormat
    from docling.datamodel.pipeline_options import VlmPipelineOptions
    from docling.document_converter import DocumentConverter, PdfFormatOption
    from docling.pipeline.vlm_pipeline import VlmPipeline

    options = VlmPipelineOptions(vlm_options=vlm_options, **pipeline_options)
    converter = DocumentConverter(
        format_options={InputFormat.PDF: PdfFormatOption(pipeline_cls=VlmPipeline, pipeline_options=options)}
    )
    result = converter.convert(PAGE)
    assert result.status.name == "SUCCESS", result.errors
    [page] = result.pages
    return page.predictions.vlm_response.text.split(EOS)[0], result.document


def page_headers(document) -> list[str]:
    from docling_core.types.doc import ContentLayer

    items = document.iterate_items(included_content_layers={ContentLayer.BODY, ContentLayer.FURNITURE})
    return [item.text for item, _ in items if hasattr(item, "text")]


def test_docling_runs_the_checkpoint_in_process_from_a_local_folder(memorised):
    checkpoint, answer = memorised
    options = readme_options("TRANSFORMERS")
    assert options.repo_id == checkpoint.name == "final_model"  # the README's folder: <run>/final_model
    received, document = docling_answer(options, artifacts_path=str(checkpoint.parent))
    assert received == answer
    assert "Optimized Table Tokenization for Table Structure Recognition" in page_headers(document)


def test_docling_through_vllm_gets_the_checkpoints_answer(memorised):
    if not VLLM_PYTHON.is_file():
        pytest.skip(f"{VLLM_PYTHON} is missing (make .venv-vllm/.installed)")
    checkpoint, answer = memorised
    port = free_port()
    # make serve's command
    command = [
        str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint), "--port", str(port),
        "--served-model-name", "granite-docling", "--dtype", "float32", "--enforce-eager", "--max-model-len", "8192",
        "--gpu-memory-utilization", "0.15", "--limit-mm-per-prompt", '{"image": 1}',
    ]  # fmt: skip
    with server(command, port, checkpoint.parent / "vllm_server.log", start_timeout=900):
        received, document = docling_answer(readme_server_options("VLLM", port), enable_remote_services=True)
        assert received == answer
        assert "Optimized Table Tokenization for Table Structure Recognition" in page_headers(document)
        # the preset spelling (VlmConvertOptions with an API engine) gets the same answer
        preset = readme_options("PRESET_VLLM")
        engine = preset.engine_options
        engine = engine.model_copy(update={"url": re.sub(r":\d+/", f":{port}/", str(engine.url))})
        received_preset, _ = docling_answer(preset.model_copy(update={"engine_options": engine}),
                                            enable_remote_services=True)  # fmt: skip
        assert received_preset == answer
        # docling's own GRANITEDOCLING_VLLM_API preset asks for skip_special_tokens=True: the tags are lost
        stripped = readme_server_options("VLLM", port)
        stripped = stripped.model_copy(update={"params": {**stripped.params, "skip_special_tokens": True}})
        received_stripped, _ = docling_answer(stripped, enable_remote_services=True)
        assert "<doctag>" not in received_stripped and "Optimized Table Tokenization" in received_stripped


def test_docling_through_llama_server_gets_the_checkpoints_answer(memorised, tmp_path):
    if not LLAMA_SERVER.is_file():
        pytest.skip(f"{LLAMA_SERVER} is not built (make llama.cpp)")
    checkpoint, answer = memorised
    exported = run_script("-m", "granite_docling.cli", "export", "gguf", str(checkpoint), str(tmp_path / "gguf"),
                          timeout=900)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    port = free_port()
    gguf = tmp_path / "gguf"
    # the README's command
    command = [
        str(LLAMA_SERVER), "-m", str(gguf / "model.gguf"), "--mmproj", str(gguf / "mmproj.gguf"),
        "--special", "--ctx-size", "8192", "--host", "127.0.0.1", "--port", str(port), "--threads", "2", "--no-warmup",
    ]  # fmt: skip
    with server(command, port, tmp_path / "llama_server.log", start_timeout=300):
        received, document = docling_answer(readme_server_options("LLAMA_SERVER", port), enable_remote_services=True)
    assert received == answer
    assert "Optimized Table Tokenization for Table Structure Recognition" in page_headers(document)
