"""``eval.engine=server``: the requests an OpenAI-compatible server gets, and answers equal to the transformers
engine's. The server here is a stand-in that answers with our own ``generate`` on what each request carries
(images from the data URLs, the question, ``max_tokens``, the resize target), so equal predictions mean the
requests carry exactly the transformers engine's inputs; ``make test-vllm`` checks a real vLLM server."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from eval_helpers import save_tiny_checkpoint, write_eval_data
from PIL import Image
from test_evaluate import compose_eval

from granite_docling.config import ModelConfig
from granite_docling.evaluation.generate import Prompt, generate
from granite_docling.evaluation.runner import evaluate
from granite_docling.evaluation.server import ServerError, answer_of, generate_via_server, request_body
from granite_docling.model import load_model_and_processor


class StandIn(BaseHTTPRequestHandler):
    model = processor = None
    lock = threading.Lock()
    bodies: list[dict] = []

    def log_message(self, *args) -> None:  # quiet
        pass

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.reply(200, {"data": [{"id": "stand-in"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StandIn.bodies.append(body)
        if body.get("model") != "stand-in":
            return self.reply(404, {"error": {"message": f"model {body.get('model')} does not exist"}})
        content = body["messages"][0]["content"]
        images = [image_of(part["image_url"]["url"]) for part in content if part["type"] == "image_url"]
        [question] = [part["text"] for part in content if part["type"] == "text"]
        edge = (body.get("mm_processor_kwargs") or {}).get("size", {}).get("longest_edge")
        with StandIn.lock:
            [answer] = generate(
                StandIn.model,
                StandIn.processor,
                [Prompt(images, question)],
                body["max_tokens"],
                image_longest_edge=edge,
                progress=False,
            )
        finish = "stop" if answer.stopped else "length"
        self.reply(
            200,
            {
                "choices": [{"message": {"content": answer.text}, "finish_reason": finish}],
                "usage": {"completion_tokens": answer.new_tokens},
            },
        )


def image_of(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint") / "model", seed=0)
    model_config = ModelConfig(name="served", checkpoint=str(checkpoint))  # as the evaluation loads it
    StandIn.model, StandIn.processor = load_model_and_processor(model_config)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield checkpoint, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_a_request_is_the_prompt_greedy_with_special_tokens_kept():
    image = Image.new("RGB", (40, 30), "red")
    body = request_body("m", Prompt([image], "Convert this page to docling."), 17, 512)
    [picture, text] = body["messages"][0]["content"]
    assert image_of(picture["image_url"]["url"]).tobytes() == image.tobytes()  # lossless
    assert text == {"type": "text", "text": "Convert this page to docling."}
    assert body["max_tokens"] == 17 and body["temperature"] == 0.0 and body["skip_special_tokens"] is False
    assert body["mm_processor_kwargs"] == {"size": {"longest_edge": 512}}
    assert "mm_processor_kwargs" not in request_body("m", Prompt([image], "q"), 1, None)
    stopped = answer_of(
        {"choices": [{"message": {"content": "<doctag>"}, "finish_reason": "stop"}], "usage": {"completion_tokens": 4}}
    )
    assert (stopped.text, stopped.stopped, stopped.new_tokens) == ("<doctag>", True, 4)
    assert not answer_of({"choices": [{"message": {"content": "x"}, "finish_reason": "length"}]}).stopped
    # llama-server --special writes out the eos it stopped at: cut, as vLLM does; a budget-cut answer is left as is
    ended = {"message": {"content": "<doctag></doctag><|end_of_text|>"}, "finish_reason": "stop"}
    assert answer_of({"choices": [ended]}).text == "<doctag></doctag>"
    assert answer_of({"choices": [{**ended, "finish_reason": "length"}]}).text == "<doctag></doctag><|end_of_text|>"


def test_server_predictions_equal_the_transformers_engines(server, tmp_path):
    checkpoint, url = server
    data = write_eval_data(tmp_path / "data")
    common = [
        f"checkpoint={checkpoint}",
        "dataset=[sample]",
        f"dataset.sample.path={data}",
        "eval.split=all",
        "eval.max_new_tokens=8",
        "eval.page_exports=false",
    ]
    local = evaluate(compose_eval(*common, "eval.batch_size=3"), tmp_path / "transformers")
    served = evaluate(
        compose_eval(*common, "eval.engine=server", f"eval.server_url={url}/v1", "eval.server_concurrency=3"),
        tmp_path / "server",
    )
    read = lambda run: [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]  # noqa: E731
    ours, theirs = read(tmp_path / "transformers"), read(tmp_path / "server")
    assert len(ours) == 4 and [r["id"] for r in theirs] == [r["id"] for r in ours]
    for mine, other in zip(ours, theirs, strict=True):
        for key in ("prediction", "stopped", "new_tokens", "max_new_tokens", "prompt", "reference"):
            assert other[key] == mine[key], (mine["id"], key)
    assert served.outputs.metrics == local.outputs.metrics


def test_an_unreachable_or_failing_server_is_one_clear_line():
    with pytest.raises(ServerError, match=r"cannot reach http://127.0.0.1:9/v1/models .*make serve"):
        generate_via_server("http://127.0.0.1:9", [Prompt([], "q")], [4], progress=False)


def test_a_refused_request_names_the_url_and_the_reason(server):
    _, url = server
    with pytest.raises(ServerError, match=r"/v1/chat/completions answered 404: .*model nope does not exist"):
        generate_via_server(url, [Prompt([Image.new("RGB", (8, 8))], "q")], [4], model="nope", progress=False)
