"""``granite-docling predict``: convert PDFs and page images with a checkpoint, page by page.

    granite-docling predict outputs/run/final_model report.pdf scan.png --out converted/
    granite-docling predict ibm-granite/granite-docling-258M docs/ --out converted/ --batch-size 8

Every PDF page is rendered with pypdfium2 at ``--scale`` (2.0 = 144 dpi, as docling and ``prepare`` do) and every
image is one page; each page gets the training prompt "Convert this page to docling." (the model card's). For
each input ``NAME`` the output folder ``OUT/NAME/`` holds ``page_NNN.doctags`` / ``.md`` / ``.html`` for every
page and ``NAME.doctags`` / ``.md`` / ``.html`` / ``.json`` (DoclingDocument) for the whole document.
A folder given as input stands for the PDFs and images directly inside it.
``--stop-loops`` ends a page's answer once it loops by docling's repetition rules (loops.py) instead of letting it
run to ``--max-new-tokens``; the answer is kept up to that point.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from PIL import Image

from granite_docling.config import ConfigError
from granite_docling.data.answers import PAGE_PROMPT
from granite_docling.evaluation.export import pages_to_document, write_document_files
from granite_docling.evaluation.generate import Prompt, generate
from granite_docling.tools.pages import IMAGE_SUFFIXES, PageFileError, is_page_file, page_files, render_pages

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="model folder (e.g. outputs/run/final_model) or hub id")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="PDF files, images, or folders of them")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one subfolder per input")
    parser.add_argument("--batch-size", type=int, default=4, help="pages per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=8192, help="answer budget per page, in tokens")
    parser.add_argument("--scale", type=float, default=2.0, help="PDF render scale (pixels per point)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weight dtype (bfloat16 on a GPU is faster)",
    )
    parser.add_argument("--device", default=None, help="torch device; default: cuda when available, else cpu")
    parser.add_argument(
        "--stop-loops",
        action="store_true",
        help="stop a page's answer once it loops (docling's repetition rules), instead of at --max-new-tokens",
    )


def input_files(inputs: list[Path]) -> list[Path]:
    """The PDFs and images named by ``inputs`` (folders expand to their direct contents, sorted)."""
    files = []
    for path in inputs:
        if path.is_dir():
            files += page_files(path)
        elif path.is_file():
            if not is_page_file(path):
                raise PageFileError(f"{path}: not a PDF or an image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            files.append(path)
        else:
            raise PageFileError(f"{path}: no such file or folder")
    if not files:
        raise PageFileError(f"no PDFs or images in {', '.join(map(str, inputs))}")
    return files


def output_stems(files: list[Path]) -> list[str]:
    """One folder name per input: the file stem, with ``_2``, ``_3`` ... where stems repeat."""
    stems = []
    seen = {}
    for path in files:
        stem = path.stem
        seen[stem] = seen.get(stem, 0) + 1
        stems.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return stems


def predict(
    checkpoint: str,
    files: list[Path],
    out: Path,
    batch_size: int = 4,
    max_new_tokens: int = 8192,
    scale: float = 2.0,
    dtype: str = "float32",
    device: str | None = None,
    stop_loops: bool = False,
) -> dict[Path, Path]:
    """Convert every file; returns {input file: its output folder}.

    9 parameters: one per command-line option of ``predict``, passed by keyword.
    """
    from granite_docling.config import ModelConfig
    from granite_docling.model import load_model_and_processor

    model, processor = load_model_and_processor(
        ModelConfig(name=Path(checkpoint).name, checkpoint=checkpoint, dtype=dtype)
    )
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    written = {}
    for path, stem in zip(files, output_stems(files), strict=True):
        pages = render_pages(path, scale)
        prompts = [Prompt(images=[page], question=PAGE_PROMPT) for page in pages]
        answers = generate(model, processor, prompts, max_new_tokens, batch_size, desc=path.name, stop_loops=stop_loops)
        looped = [i + 1 for i, answer in enumerate(answers) if answer.loop]
        if looped:
            log.warning("%s: page(s) %s looped and were stopped early (--stop-loops)", path.name, looped)
        cut = [i + 1 for i, answer in enumerate(answers) if not answer.stopped and not answer.loop]
        if cut:
            log.warning("%s: page(s) %s reached --max-new-tokens %d before eos", path.name, cut, max_new_tokens)
        page_doctags = [answer.text for answer in answers]
        folder = out / stem
        doc = _document(page_doctags, pages, stem)
        write_document_files(folder, stem, page_doctags, doc)
        written[path] = folder
    return written


def _document(page_doctags: list[str], pages: list[Image.Image], stem: str):
    try:
        return pages_to_document(page_doctags, pages, name=stem)
    except ValueError as error:
        log.warning("%s: %s; writing the DocTags only", stem, error)
        return None


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.scale <= 0:
        raise ConfigError("--batch-size and --max-new-tokens must be at least 1, --scale positive")
    files = input_files(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)  # an unwritable --out fails now, not after the first document
    written = predict(
        args.checkpoint,
        files,
        args.out,
        args.batch_size,
        args.max_new_tokens,
        args.scale,
        args.dtype,
        args.device,
        args.stop_loops,
    )
    for path, folder in written.items():
        print(f"{path} -> {folder}/ ({folder.name}.md, {folder.name}.html, {folder.name}.doctags, page_NNN.*)")
    return 0
