"""``granite-docling export mlx CHECKPOINT OUT``: the checkpoint as an MLX model, by mlx-vlm's own converter.

    granite-docling export mlx outputs/run/final_model outputs/run/final_model-mlx
    granite-docling export mlx outputs/run/final_model out-mlx-4bit --quantize 4 --python .venv-mlx/bin/python

mlx-vlm converts the untied copy (:mod:`~granite_docling.tools.export.untied`), since it refuses tied embeddings and
reads the RoPE base only where transformers 4 wrote it. It runs in the Python that has it: ``--python PATH``; else
this interpreter when it can import ``mlx_vlm``; else ``.venv-mlx/bin/python`` in the current folder (what
``make test-mlx`` builds). ``--quantize 4|8`` is mlx-vlm's affine quantisation of the language model's layers in
groups of 64 (the vision tower stays in float). Serve the result with ``python -m mlx_vlm server --model OUT``
(OpenAI-compatible; ``evaluate.py eval.engine=server`` scores it), or load it in docling's MLX pipeline.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from granite_docling.atomic_folders import publish
from granite_docling.tools.export import (
    folder_size,
    run_converter,
    run_probe,
    runtime_python,
    staging_folder,
    write_export_info,
)
from granite_docling.tools.export.untied import write_untied_copy

log = logging.getLogger(__name__)

TESTED_MLX_VLM = "0.7.10"  # the mlx-vlm release make test-mlx pins and checks
GROUP_SIZE = 64  # weights per quantisation group (mlx-vlm's default); 576 and 1,536 (granite-docling) divide by it
DEFAULT_PYTHON = Path(".venv-mlx") / "bin" / "python"
INSTALL = (
    'install it (pip install "mlx[cpu]" mlx-vlm on Linux, pip install mlx-vlm on a Mac with Apple silicon; '
    "make test-mlx builds .venv-mlx) and pass --python PATH/TO/bin/python"
)
# Run in the candidate Python: mlx-vlm's version, then whether MLX itself loads (on Linux it needs mlx[cpu]).
PROBE = (
    "import importlib.metadata as m, importlib.util as u\n"
    "if u.find_spec('mlx_vlm') is None: raise SystemExit(3)\n"
    "print(m.version('mlx-vlm'), flush=True)\n"
    "import mlx.core\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--quantize", type=int, choices=(4, 8), help="bits per weight of the language model (default: float weights)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16", "float16"), help="float weights' dtype (default: the checkpoint's)"
    )
    parser.add_argument(
        "--python",
        type=Path,
        help=f"a Python with mlx-vlm (default: this one if it has it, else {DEFAULT_PYTHON} when present)",
    )


def export(checkpoint: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """Convert ``checkpoint`` into ``out``; the lines that tell the user what was written and how to serve it."""
    python, version = mlx_python(args.python)
    if version != TESTED_MLX_VLM:
        log.warning("mlx-vlm %s: the export is checked with %s (make test-mlx)", version, TESTED_MLX_VLM)
    with staging_folder(out) as staging:
        untied = Path(staging) / "untied"
        converted = Path(staging) / "mlx"
        changes = write_untied_copy(checkpoint, untied)
        command = [python, "-m", "mlx_vlm", "convert", "--hf-path", str(untied), "--mlx-path", str(converted)]
        run_converter(command + convert_options(args.quantize, args.dtype), f"mlx-vlm {version}'s converter")
        write_export_info(
            converted,
            {
                "runtime": "mlx",
                "checkpoint": str(checkpoint.resolve()),
                "converter": f"mlx-vlm {version}",
                "convert_options": convert_options(args.quantize, args.dtype),
                "changes_to_the_copy": changes,
            },
        )
        publish(converted, out)
    size = folder_size(out)
    form = f"{args.quantize}-bit" if args.quantize else (args.dtype or "the checkpoint's dtype")
    return [
        f"MLX model ({form}, mlx-vlm {version}): {out} ({size / 1e6:.1f} MB)",
        f"serve it: {python} -m mlx_vlm server --host 127.0.0.1 --port 8080 --model {out.resolve()}",
    ]


def convert_options(quantize: int | None, dtype: str | None) -> list[str]:
    """mlx-vlm convert's options for ``--quantize`` and ``--dtype``."""
    options = ["--dtype", dtype] if dtype else []
    if quantize:
        options += ["-q", "--q-bits", str(quantize), "--q-group-size", str(GROUP_SIZE)]
    return options


def mlx_python(given: Path | None) -> tuple[str, str]:
    """(the Python that runs mlx-vlm, mlx-vlm's version): ``given``, else this interpreter, else
    ``.venv-mlx/bin/python``. :class:`ExportError` in one line when none of them has a working mlx-vlm."""
    return runtime_python(given, DEFAULT_PYTHON, probe, INSTALL)


def probe(python: str) -> tuple[str | None, str]:
    """(mlx-vlm's version in ``python``, or None; what is wrong when None)."""
    probed = run_probe(python, PROBE)
    if probed.code not in (0, 3) and probed.found:
        return None, f"{python} has mlx-vlm {probed.found}, but MLX does not load ({probed.last})"
    return probed.outcome(
        missing=f"mlx-vlm is not installed for {python}", broken=f"{python} cannot run mlx-vlm ({probed.last})"
    )
