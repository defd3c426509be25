"""Peak memory of the output layer + loss for one long page: our chunked supervised-token loss against the stock path.

    python benchmarks/loss_memory.py --json                  # one 4,096-token page, the real 100,352 x 576 head
    python benchmarks/loss_memory.py --data data/mine --json # the page's answer: the longest one in data/mine
    python benchmarks/loss_memory.py --seq-len 256 --vocab 4096 --json   # a quick run (tests)

What is measured is the part the two paths differ in, at full size: a (1, T, 576) float32 hidden state (standing
for the text model's last hidden state, with requires_grad) and the tied (100,352 x 576) float32 output weight,
through forward and backward of

* ``chunked``: :func:`granite_docling.loss.supervised_cross_entropy` (logits only at supervised positions,
  ``--chunk-size`` of them at a time, each chunk recomputed in backward), divided by the supervised tokens;
* ``full``: what ``Idefics3ForConditionalGeneration(..., labels=...)`` does: logits for every position
  (``lm_head(hidden)``, upcast to float32), shifted labels, mean cross-entropy over the non-ignored ones.

The page: the real prompt of a 1224x1584 page at the real processor settings (17 tiles: the image tokens with
their tile markers, role headers and the prompt text, counted with the vendored processor), then the answer and its
``<|end_of_text|>`` (supervised), then the template's final newline. By default the answer fills the page to
``--seq-len`` tokens (4,096: the longest real pages, NOTES); with ``--data`` the answer is as long as the longest
first-turn answer in that folder (real tokenizer) and the page as long as that makes it.

How memory is measured: every path runs in a fresh Python process. On CUDA, ``torch.cuda.max_memory_allocated``
minus the allocation before the forward (hidden state and weight are there already). On CPU, the process's peak
resident set size: the kernel's high-water mark (``VmHWM``) is reset through ``/proc/self/clear_refs`` after the
inputs exist, and the peak minus the resident size at that moment is reported. Allocations of glibc's heap that
stay mapped after being freed can make CPU numbers a little low, never high; tensors of this size are mapped and
unmapped one by one. The weight's gradient (231 MB at full size) is part of both peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 2**20


def real_prompt_tokens(height: int = 1584, width: int = 1224) -> int:
    """Tokens before the first answer token of a one-page sample at the real processor settings."""
    from granite_docling.config import ModelConfig
    from granite_docling.data.answers import PAGE_PROMPT
    from granite_docling.data.encoding import ASSISTANT_HEADER, build_messages
    from granite_docling.data.image_tiles import ImageSpec, image_replacements
    from granite_docling.data.sample import Turn
    from granite_docling.model import load_model_config, load_processor

    cfg = ModelConfig(checkpoint=None, random_init=True)
    processor = load_processor(cfg, load_model_config(cfg))
    text = processor.apply_chat_template(build_messages([Turn(PAGE_PROMPT, "x")], 1))
    layout = ImageSpec.from_processor(processor).layout(height, width)
    (text,), _ = processor.get_text_with_replacements(
        [text], images_replacements=image_replacements(processor, [layout])
    )
    prompt = text[: text.index(ASSISTANT_HEADER) + len(ASSISTANT_HEADER)]
    return len(processor.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def longest_answer_tokens(data: Path) -> int:
    """Tokens of the longest first-turn answer in a Docling-format folder, with the real tokenizer."""
    from granite_docling.config import ModelConfig
    from granite_docling.data.sources import ReadOptions, read_dataset
    from granite_docling.model import load_model_config, load_processor

    cfg = ModelConfig(checkpoint=None, random_init=True)
    tokenizer = load_processor(cfg, load_model_config(cfg)).tokenizer
    samples, _ = read_dataset(str(data), "data", ReadOptions(max_turns=1), "auto")
    if not samples:
        raise SystemExit(f"no usable samples in {data}")
    return max(len(tokenizer(s.turns[0].assistant, add_special_tokens=False)["input_ids"]) for s in samples)


# ---------------------------------------------------------------------------------------------------------------
# One measurement, in its own process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)


def measure(path: str, seq_len: int, prompt: int, supervised: int, vocab: int, hidden_size: int, chunk_size: int,
            device: str, seed: int) -> dict:  # fmt: skip
    """Forward + backward of one loss path; peak memory above the inputs, loss and seconds."""
    import torch
    import torch.nn.functional as F

    from granite_docling.data.encoding import IGNORE_INDEX
    from granite_docling.loss import supervised_cross_entropy

    torch.manual_seed(seed)
    dev = torch.device(device)
    hidden = torch.randn(1, seq_len, hidden_size, device=dev, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, hidden_size, device=dev) * 0.02)
    labels = torch.full((1, seq_len), IGNORE_INDEX, device=dev)
    labels[0, prompt : prompt + supervised] = torch.randint(0, vocab, (supervised,), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        _reset_peak_rss()
    start = time.perf_counter()
    if path == "chunked":
        loss_sum, n = supervised_cross_entropy(hidden, labels, weight, chunk_size)
        loss = loss_sum / n
    else:  # transformers' ForCausalLMLoss on lm_head(hidden): full logits, float32, shift, mean over non-ignored
        logits = (hidden @ weight.T).float()  # (1, T, V)
        shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
        loss = F.cross_entropy(logits.view(-1, vocab), shift_labels.reshape(-1), ignore_index=IGNORE_INDEX)
    loss.backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _peak_rss_bytes() - before
    seconds = time.perf_counter() - start
    return {"path": path, "peak_mb": peak / MB, "loss": float(loss), "seconds": seconds,
            "grad_norm": float(hidden.grad.norm())}  # fmt: skip


def run_isolated(path: str, args: argparse.Namespace, seq_len: int, prompt: int, supervised: int) -> dict:
    """:func:`measure` in a fresh interpreter, so that one path's freed memory cannot hide the other's peak."""
    command = [sys.executable, __file__, "--measure", path, "--seq-len", str(seq_len), "--prompt-tokens", str(prompt),
               "--supervised", str(supervised), "--vocab", str(args.vocab), "--hidden", str(args.hidden),
               "--chunk-size", str(args.chunk_size), "--device", args.device, "--seed", str(args.seed)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {path} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="Docling folder: the answer is its longest first-turn answer")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens of the page (ignored with --data)")
    parser.add_argument("--prompt-tokens", type=int, help="unsupervised tokens before the answer; default: real page")
    parser.add_argument("--supervised", type=int, help="supervised tokens (answer + eos); default: fill the page")
    parser.add_argument("--vocab", type=int, default=100_352, help="output classes (granite-docling: 100,352)")
    parser.add_argument("--hidden", type=int, default=576, help="hidden size (granite-docling: 576)")
    parser.add_argument("--chunk-size", type=int, default=2048, help="positions per chunk (training.loss_chunk_size)")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--measure", choices=("chunked", "full"), help=argparse.SUPPRESS)  # one path, in-process
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    prompt = args.prompt_tokens if args.prompt_tokens is not None else real_prompt_tokens()
    if args.measure:
        print(json.dumps(measure(args.measure, args.seq_len, prompt, args.supervised, args.vocab, args.hidden,
                                 args.chunk_size, args.device, args.seed)))  # fmt: skip
        return 0
    if args.data is not None:
        supervised = longest_answer_tokens(args.data) + 1  # + the closing <|end_of_text|>
        seq_len = prompt + supervised + 1  # + the template's newline after it
    else:
        seq_len = args.seq_len
        supervised = args.supervised if args.supervised is not None else seq_len - prompt - 1
    if prompt < 1 or supervised < 1 or prompt + supervised > seq_len:
        parser.error(f"{prompt} prompt + {supervised} supervised tokens do not fit a {seq_len}-token page")

    chunked = run_isolated("chunked", args, seq_len, prompt, supervised)
    full = run_isolated("full", args, seq_len, prompt, supervised)
    result = {
        "peak_mb_chunked": chunked["peak_mb"],
        "peak_mb_full": full["peak_mb"],
        "ratio": full["peak_mb"] / chunked["peak_mb"],  # how many times less memory the chunked loss takes
        "seconds_chunked": chunked["seconds"],
        "seconds_full": full["seconds"],
        "loss_chunked": chunked["loss"],
        "loss_full": full["loss"],
        "seq_len": seq_len,
        "prompt_tokens": prompt,
        "supervised_tokens": supervised,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "chunk_size": args.chunk_size,
        "full_logits_mb": seq_len * args.vocab * 4 / MB,  # one float32 (T, V) tensor, for scale
        "device": args.device,
        "method": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (VmHWM reset)",
        "data": str(args.data) if args.data else None,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:20s} {value:.4g}" if isinstance(value, float) else f"{key:20s} {value}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
