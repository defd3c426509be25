"""Run a fine-tuned checkpoint inside docling's own VLM pipeline, offline: the drop-in check.

docling's ``VlmPipeline`` with the transformers engine loads granite-docling from
``<artifacts_path>/ibm-granite--granite-docling-258M`` (the hub id with ``/`` replaced by ``--``) when the
pipeline option ``artifacts_path`` is set, and downloads it from the hub otherwise. A saved checkpoint is a
complete model folder, so pointing that folder at it is all it takes; :func:`docling_artifacts` lays it out as a
symlink (a copy where symlinks are not allowed)::

    result = convert_with_docling("paper.pdf", "outputs/run/final_model")
    print(result.document.export_to_markdown())

Needs ``pip install docling`` (not a dependency of this project; docling brings torchvision, OCR and layout
packages). Written against docling 2.141 (``VlmConvertOptions.from_preset``), with a fallback to the older
``vlm_model_specs.GRANITEDOCLING_TRANSFORMERS`` options of docling 2.5x.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from granite_docling.config import HUB_ID

log = logging.getLogger(__name__)


def repo_cache_folder(repo_id: str = HUB_ID) -> str:
    """The folder name docling looks for under ``artifacts_path``: 'ibm-granite--granite-docling-258M'."""
    return repo_id.replace("/", "--")


def docling_artifacts(checkpoint: str | Path, artifacts_dir: str | Path, repo_id: str = HUB_ID) -> Path:
    """Make ``artifacts_dir/<repo_cache_folder>`` point at ``checkpoint``; return that path.

    An earlier symlink there is replaced; a real folder there (a downloaded model, say) is never touched:
    that raises FileExistsError, so pick another ``artifacts_dir``.
    """
    checkpoint = Path(checkpoint).resolve()
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a model folder (no config.json): give a saved checkpoint")
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    target = artifacts_dir / repo_cache_folder(repo_id)
    if target.is_symlink():
        if target.resolve() == checkpoint:
            return target
        target.unlink()
    elif target.exists():
        raise FileExistsError(f"{target} already holds a model; give docling another artifacts folder")
    try:
        target.symlink_to(checkpoint, target_is_directory=True)
    except OSError:  # file systems or platforms without symlinks
        shutil.copytree(checkpoint, target)
    return target


def docling_converter(
    checkpoint: str | Path,
    artifacts_dir: str | Path | None = None,
    max_new_tokens: int = 8192,
    device: str = "auto",
) -> Any:
    """A docling ``DocumentConverter`` for PDFs and images whose VLM pipeline runs ``checkpoint``.

    ``artifacts_dir`` defaults to a fresh temporary folder. ``device``: auto, cpu, cuda, mps (docling's names).
    """
    try:
        from docling.datamodel.accelerator_options import AcceleratorOptions
        from docling.datamodel.base_models import InputFormat
        from docling.datamodel.pipeline_options import VlmPipelineOptions
        from docling.document_converter import DocumentConverter, ImageFormatOption, PdfFormatOption
        from docling.pipeline.vlm_pipeline import VlmPipeline
    except ImportError as error:
        raise ImportError(f"docling is not installed ({error}): pip install docling") from error

    artifacts_dir = Path(artifacts_dir) if artifacts_dir else Path(tempfile.mkdtemp(prefix="granite_docling_art_"))
    docling_artifacts(checkpoint, artifacts_dir)
    options = VlmPipelineOptions(
        vlm_options=_granite_docling_options(max_new_tokens),
        artifacts_path=str(artifacts_dir),
        enable_remote_services=False,
        generate_page_images=True,
        accelerator_options=AcceleratorOptions(device=device),
    )
    return DocumentConverter(
        format_options={
            InputFormat.PDF: PdfFormatOption(pipeline_cls=VlmPipeline, pipeline_options=options),
            InputFormat.IMAGE: ImageFormatOption(pipeline_cls=VlmPipeline, pipeline_options=options),
        }
    )


def _granite_docling_options(max_new_tokens: int) -> Any:
    """docling's own granite-docling settings (prompt, scale 2, DocTags, stop strings), on the transformers engine."""
    try:
        from docling.datamodel.pipeline_options import VlmConvertOptions
        from docling.datamodel.vlm_engine_options import TransformersVlmEngineOptions
    except ImportError:  # docling before the preset system
        from docling.datamodel import vlm_model_specs

        return vlm_model_specs.GRANITEDOCLING_TRANSFORMERS.model_copy(update={"max_new_tokens": max_new_tokens})
    spec = VlmConvertOptions.get_preset("granite_docling").model_spec
    return VlmConvertOptions.from_preset(
        "granite_docling",
        engine_options=TransformersVlmEngineOptions(),
        model_spec=spec.model_copy(update={"max_new_tokens": max_new_tokens}),  # a copy: the preset is shared
    )


def convert_with_docling(
    source: str | Path,
    checkpoint: str | Path,
    artifacts_dir: str | Path | None = None,
    page_range: tuple[int, int] | None = None,
    max_new_tokens: int = 8192,
    device: str = "auto",
) -> Any:
    """Convert a PDF (pages ``page_range``, 1-based and inclusive; all by default) or an image with
    ``checkpoint`` through docling; returns docling's ``ConversionResult`` (``.document`` is the DoclingDocument,
    ``.pages[i].predictions.vlm_response.text`` the raw DocTags of each page)."""
    converter = docling_converter(checkpoint, artifacts_dir, max_new_tokens, device)
    kwargs = {"page_range": page_range} if page_range else {}
    return converter.convert(str(source), **kwargs)
