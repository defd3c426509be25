"""The dataset formats (``dataset.<name>.format``), one module each, and the registry everything else reads:
:func:`detect_format` (``format=auto``), :func:`~granite_docling.data.sources.open_source`, pre-flight, streaming
and the config check :func:`format_problems`.

A format is a :class:`~granite_docling.data.formats.base.Source` subclass with a ``format_name``, a ``detect``,
a ``layout_problem`` and ``streams``. To add one: write its module here and add its class to :data:`FORMATS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from granite_docling.data.formats.base import DatasetNotFoundError, Source
from granite_docling.data.formats.docling_eval import DoclingEvalSource
from granite_docling.data.formats.folder import FolderSource
from granite_docling.data.formats.hub import HubSource

# format name -> its Source class. ``auto`` tries them in this order: docling_eval before hub, which it refines.
FORMATS: dict[str, type[Source]] = {cls.format_name: cls for cls in (FolderSource, DoclingEvalSource, HubSource)}
AUTO = "auto"


def no_columns() -> Sequence[str]:
    return ()


def detect_format(path: str | Path, columns: Callable[[], Sequence[str]] = no_columns) -> str:
    """The first format of :data:`FORMATS` whose ``detect`` recognises ``path``; raises
    :class:`DatasetNotFoundError` for anything else. Without ``columns`` (the column names, read on demand),
    formats told apart by their columns are not considered: docling-eval data is then 'hub'."""
    path = Path(path)
    for name, cls in FORMATS.items():
        if cls.detect(path, columns):
            return name
    raise DatasetNotFoundError(
        f"{path} is not a dataset: expected a Docling folder (anns/<split>/*.json + images), parquet or Arrow "
        "files in the hub layout, or a hub id"
    )


def format_problems(datasets: Mapping[str, Any]) -> list[str]:
    """What is wrong with the ``format`` and ``streaming`` of each ``dataset.<name>`` (a DatasetConfig): a format
    that is not registered, streaming asked of a format that does not stream."""
    problems = []
    for key, source in datasets.items():
        prefix = f"dataset.{key}"
        if source.format != AUTO and source.format not in FORMATS:
            problems.append(f"{prefix}.format={source.format!r} is not one of {', '.join([AUTO, *FORMATS])}")
        elif source.streaming and source.format != AUTO and not FORMATS[source.format].streams:
            problems.append(f"{prefix}: {FORMATS[source.format].not_streamed}; drop {prefix}.streaming=true")
    return problems
