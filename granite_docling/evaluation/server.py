"""Answers from an OpenAI-compatible server (vLLM, the engine behind docling-serve): ``eval.engine=server``.

    python evaluate.py checkpoint=outputs/<run>/final_model eval.engine=server eval.server_url=http://localhost:8000

The requests carry what the transformers engine gives ``generate``: each sample's first-turn images (PNG, as data
URLs) and question as one user message, which the server puts through the checkpoint's own chat template (as
``vllm serve`` does for ``/v1/chat/completions``); greedy decoding (temperature 0); the same per-sample token budget
(``max_tokens``); special tokens kept (``skip_special_tokens: false``: DocTags are special tokens). A per-dataset
``image_longest_edge`` is passed as ``mm_processor_kwargs``, which vLLM hands to the processor only when it was started
with ``--trust-request-mm-kwargs`` (``make serve`` does; without it vLLM answers 400, which stops the evaluation
in one line naming the flag).
``eval.server_concurrency`` requests are in flight at once, so the server can batch them.

A reply that ends with ``finish_reason: stop`` stopped with eos (vLLM leaves the stop token out of the text, as
:func:`~granite_docling.evaluation.generate.cut_at_eos` does; llama-server, which needs ``--special`` to keep the
DocTags tags, writes it out, and it is cut here); ``length`` means the budget cut it. A prompt whose
image cannot be read gets a :class:`Generation` with ``error`` set, as with the transformers engine; a server that
cannot be reached or answers with an error stops the evaluation with one line naming the URL and the cause.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from granite_docling.data.images import ImageError
from granite_docling.evaluation.doctags import EOS_TOKEN
from granite_docling.evaluation.generate import Generation, Prompt, load_image
from granite_docling.user_error import UserError

REQUEST_TIMEOUT_S = 600  # one answer of up to max_new_tokens on a busy CPU server


class ServerError(UserError, RuntimeError):
    """The server cannot be reached or refused a request; the message says which URL and why."""


def image_url(image) -> str:
    """A prompt image (decoded, a path or encoded bytes) as a PNG data URL."""
    buffer = io.BytesIO()
    load_image(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def request_body(model: str, prompt: Prompt, max_tokens: int, image_longest_edge: int | None) -> dict:
    """The chat-completions request for one prompt: its images, then its question, greedy, special tokens kept."""
    content = [{"type": "image_url", "image_url": {"url": image_url(image)}} for image in prompt.images]
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": prompt.question}]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "skip_special_tokens": False,
    }
    if image_longest_edge:
        body["mm_processor_kwargs"] = {"size": {"longest_edge": image_longest_edge}}
    return body


def answer_of(reply: dict) -> Generation:
    """A chat-completions reply as a :class:`Generation`."""
    choice = reply["choices"][0]
    stopped = choice.get("finish_reason") == "stop"
    tokens = (reply.get("usage") or {}).get("completion_tokens", 0)
    text = choice["message"]["content"] or ""
    if stopped:  # llama-server --special writes out the eos it stopped at; vLLM and mlx-vlm leave it out
        text = text.removesuffix(EOS_TOKEN)
    return Generation(text=text, stopped=stopped, new_tokens=tokens)


def call(url: str, body: dict | None = None) -> dict:
    """GET (no body) or POST ``body`` as JSON; the JSON reply. Raises :class:`ServerError` in one line."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:300].replace("\n", " ")
        raise ServerError(f"{url} answered {error.code}: {detail}") from error
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise ServerError(
            f"cannot reach {url} ({reason}); is the server running? (make serve CHECKPOINT=...)"
        ) from error
    except json.JSONDecodeError as error:
        raise ServerError(f"{url} did not answer with JSON ({error})") from error


def served_model(base_url: str) -> str:
    """The name the server serves its model under (the first of ``/v1/models``)."""
    models = call(f"{base_url}/v1/models").get("data") or []
    if not models:
        raise ServerError(f"{base_url}/v1/models lists no model")
    return models[0]["id"]


def generate_via_server(
    base_url: str,
    prompts: Sequence[Prompt],
    max_new_tokens: Sequence[int],
    concurrency: int = 16,
    image_longest_edge: int | None = None,
    model: str | None = None,
    progress: bool = True,
    desc: str = "generating",
) -> list[Generation]:
    """Greedy answers for ``prompts`` from the server at ``base_url``, in order, ``concurrency`` at a time.

    8 parameters: the server and the prompts, then the same generator knobs as :func:`generate` takes (budget,
    concurrency, resize target, served model name, progress bar and its label).
    """
    base_url = base_url.rstrip("/").removesuffix("/v1")
    model = model or served_model(base_url)

    def answer(index: int) -> Generation:
        try:
            body = request_body(model, prompts[index], max_new_tokens[index], image_longest_edge)
        except ImageError as error:
            return Generation(text="", stopped=False, new_tokens=0, error=str(error))
        return answer_of(call(f"{base_url}/v1/chat/completions", body))

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        answers = pool.map(answer, range(len(prompts)))
        return list(tqdm(answers, total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True))
