"""Our predictions as a docling-eval evaluation dataset, so that docling-eval's own evaluators score them.

``evaluate.py`` writes ``<run>/docling_eval/test/shard_000000_000000.parquet``: one row per page-conversion sample
(a reference that opens with ``<doctag>``) in the columns of docling-eval's ``DatasetRecordWithPrediction``, which
``docling-eval evaluate`` reads::

    docling-eval evaluate --benchmark PlainFiles --modality markdown_text --input-dir <run>/docling_eval
    docling-eval evaluate --benchmark PlainFiles --modality table_structure --input-dir <run>/docling_eval

* ``GroundTruthDocument``: the reference DocTags converted by docling-core with the sample's page images, the
  document our metrics score against (for a docling-eval source that is its ground-truth page as DocTags, so
  locations are on the 500-step DocTags grid and attributes DocTags cannot carry are gone);
* ``PredictedDocument``: the answer converted the same way (``prediction_format`` ``doctags``, the answer itself
  in ``original_prediction``); ``status`` ``success``, or ``failure`` with no document where docling-core
  rejects the answer;
* ``GroundTruthPageImages`` / ``PredictionPageImages``: the page images (PNG), ``document_id`` the sample id.

An answer that loops (loops.py) goes in as it was generated, loop included (or as ``eval.stop_loops=true`` stopped
it), so docling-eval scores what the model answered. ``eval.docling_eval_strip_loops=true`` asks for it without its
loop instead (``loops.without_loop``: cut after the first block of the repeated run, or stripped of its repeated
tail as docling strips a looping formula), for scores of what a pipeline that removes loops would deliver;
``original_prediction`` keeps the answer as generated either way.

Where docling-eval's means differ from ours by design (``make test-docling`` runs its evaluators on such a folder
and checks the rest agree: edit distance, F1 and BLEU within 0.01, TEDS within 0.005):

* its Markdown-text evaluator leaves out pages whose reference or prediction Markdown is empty, and pages whose
  prediction did not convert (``status`` ``failure``); ours scores them (an empty prediction has edit distance
  1); the test compares the means over the pages docling-eval scored;
* ours is per page, so a multi-page sample is one row with several page images and one score, as in docling-eval.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from granite_docling.evaluation.doctags import is_page_answer
from granite_docling.evaluation.export import pages_to_document, split_pages
from granite_docling.evaluation.loops import without_loop
from granite_docling.evaluation.records import Record

log = logging.getLogger(__name__)

SPLIT = "test"
SHARD = "shard_000000_000000.parquet"
STRING_COLUMNS = (
    "document_id",
    "document_filepath",
    "document_filehash",
    "GroundTruthDocument",
    "ground_truth_segmented_pages",
    "mime_type",
    "predictor_info",
    "status",
    "PredictedDocument",
    "predicted_segmented_pages",
    "prediction_format",
    "prediction_timings",
    "original_prediction",
)
IMAGE_LIST_COLUMNS = ("GroundTruthPictures", "GroundTruthPageImages", "PredictionPictures", "PredictionPageImages")
STRING_LIST_COLUMNS = ("modalities", "tags")


def schema():
    """docling-eval's ``DatasetRecordWithPrediction.pyarrow_schema()``, column for column."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = [(name, pa.string()) for name in STRING_COLUMNS]
    columns += [(name, pa.list_(image)) for name in IMAGE_LIST_COLUMNS]
    columns += [(name, pa.list_(pa.string())) for name in STRING_LIST_COLUMNS]
    columns.append(("BinaryDocument", pa.binary()))
    return pa.schema(columns)


def png_cell(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def prediction_row(record: Record, images: Sequence[Image.Image], strip_loops: bool = False) -> dict:
    """One page-conversion record as a ``DatasetRecordWithPrediction`` row; ValueError if the reference does
    not convert. ``strip_loops``: the predicted document is read from the answer without its loop."""
    reference = pages_to_document(split_pages(record.reference), images, name=record.id)
    answer = without_loop(record.prediction) if strip_loops else record.prediction
    try:
        predicted = pages_to_document(split_pages(answer), images, name=record.id)
    except ValueError as error:
        log.debug("%s: the prediction does not convert (%s)", record.id, error)
        predicted = None
    pages = [png_cell(image) for image in images]
    return {
        "document_id": record.id,
        "document_filepath": None,
        "document_filehash": None,
        "GroundTruthDocument": json.dumps(reference.export_to_dict()),
        "ground_truth_segmented_pages": "{}",
        "mime_type": "image/png",
        "predictor_info": json.dumps({"engine": "granite-docling evaluate.py", "dataset": record.dataset}),
        "status": "success" if predicted is not None else "failure",
        "PredictedDocument": json.dumps(predicted.export_to_dict()) if predicted is not None else None,
        "predicted_segmented_pages": "{}",
        "prediction_format": "doctags",
        "prediction_timings": None,
        "original_prediction": record.prediction,
        "GroundTruthPictures": [],
        "GroundTruthPageImages": pages,
        "PredictionPictures": [],
        "PredictionPageImages": pages,
        "modalities": ["markdown_text", "table_structure", "layout"],
        "tags": [record.dataset],
        "BinaryDocument": None,
    }


def write_docling_eval_dataset(
    folder: Path,
    records: Sequence[Record],
    images_of: Callable[[Record], list[Image.Image | None]],
    strip_loops: bool = False,
) -> Path | None:
    """Write the page-conversion ``records`` under ``folder/test/``; the folder, or None when there are none.
    ``strip_loops``: looping answers go in without their loop (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in records:
        if not is_page_answer(record.reference):
            continue
        images = images_of(record)
        if not images or any(image is None for image in images):
            log.warning("%s/%s left out of the docling-eval export: no page image", record.dataset, record.id)
            continue
        try:
            rows.append(prediction_row(record, images, strip_loops))
        except ValueError as error:
            log.warning("%s/%s left out of the docling-eval export: %s", record.dataset, record.id, error)
    if not rows:
        return None
    (folder / SPLIT).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema()), folder / SPLIT / SHARD)
    return folder
