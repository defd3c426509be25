"""Small Docling-format folders built in tests: good samples, and one bad sample of every kind."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from PIL import Image

COLOURS = ["red", "green", "blue", "orange", "purple", "black", "teal", "olive"]


def write_image(path: Path, colour: str = "white", size: tuple[int, int] = (96, 128)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_annotation(root: Path, name: str, record, split: str = "train") -> Path:
    path = root / "anns" / split / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return path


def good_dataset(root: Path, n: int = 4, split: str = "train") -> Path:
    """``n`` good samples alternating the two annotation options (single dict / lists)."""
    for i in range(n):
        image = f"images/{split}/{i:03d}.png"
        write_image(root / image, COLOURS[i % len(COLOURS)])
        if i % 2 == 0:
            record = {
                "img_pth": image,
                "anns": {"user": "Convert formula to latex.", "assistant": f"x^{i}", "source": "synth"},
            }
        else:
            answer = f"<doctag><text>page {i}</text></doctag>"
            turns = [{"user": "Convert this page to docling.", "assistant": answer, "source": "docs"}]
            record = {"img_pth": [image], "anns": turns}
        write_annotation(root, f"{i:03d}.json", record, split)
    return root


# file name -> the reason validate / training must give for it
BAD_FILES = {
    "b_invalid_json.json": "invalid_json",
    "b_wrong_schema.json": "bad_schema",
    "b_empty_answer.json": "empty_answer",
    "b_missing_image.json": "missing_image",
    "b_truncated_image.json": "unreadable_image",
    "b_not_an_image.json": "unreadable_image",
    "b_bomb.json": "image_too_large",
    "b_outside_root.json": "path_outside_root",
    "b_nul_in_path.json": "bad_image_path",
    "b_long_name.json": "bad_image_path",
    "b_symlink_loop.json": "bad_image_path",
    "b_folder_as_image.json": "bad_image_path",
    "b_truncated_qoi.json": "unreadable_image",
    "b_annotation_outside_root.json": "path_outside_root",
}


def dataset_with_bad_samples(root: Path, n_good: int = 4) -> Path:
    """``n_good`` good samples plus one of each kind in :data:`BAD_FILES`, and a README that must be ignored."""
    good_dataset(root, n_good)
    images = root / "images" / "train"
    ok = {"user": "Convert this page to docling.", "assistant": "<doctag></doctag>"}

    write_annotation(root, "b_invalid_json.json", '{"img_pth": "images/train/000.png", "anns": ')
    write_annotation(root, "b_wrong_schema.json", {"image": "images/train/000.png", "anns": ok})
    write_annotation(root, "b_empty_answer.json", {"img_pth": "images/train/000.png", "anns": {**ok, "assistant": " "}})
    write_annotation(root, "b_missing_image.json", {"img_pth": "images/train/nope.png", "anns": ok})

    write_image(images / "whole.png", "red", (300, 300))
    data = (images / "whole.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    write_annotation(root, "b_truncated_image.json", {"img_pth": "images/train/truncated.png", "anns": ok})
    (images / "garbage.png").write_bytes(b"this is not an image at all")
    write_annotation(root, "b_not_an_image.json", {"img_pth": "images/train/garbage.png", "anns": ok})

    Image.new("1", (11_000, 11_000)).save(images / "bomb.png")  # 121 MP of zeros: a small file, a huge image
    write_annotation(root, "b_bomb.json", {"img_pth": "images/train/bomb.png", "anns": ok})

    write_image(root.parent / "secret.png")
    write_annotation(root, "b_outside_root.json", {"img_pth": "../secret.png", "anns": ok})

    write_annotation(root, "b_nul_in_path.json", {"img_pth": "images/train/000.png\0.png", "anns": ok})
    write_annotation(root, "b_long_name.json", {"img_pth": "images/train/" + "x" * 5000 + ".png", "anns": ok})
    os.symlink("loop.png", images / "loop.png")  # a symlink to itself: ELOOP
    write_annotation(root, "b_symlink_loop.json", {"img_pth": "images/train/loop.png", "anns": ok})
    write_annotation(root, "b_folder_as_image.json", {"img_pth": "images/train", "anns": ok})
    qoi = io.BytesIO()
    Image.new("RGB", (40, 30), "red").save(qoi, "QOI")  # PIL opens a cut QOI, then fails with IndexError
    (images / "truncated.qoi").write_bytes(qoi.getvalue()[: len(qoi.getvalue()) // 2])
    write_annotation(root, "b_truncated_qoi.json", {"img_pth": "images/train/truncated.qoi", "anns": ok})
    outside = root.parent / "outside_annotation.json"  # a good annotation, but not the dataset's to read
    outside.write_text(json.dumps({"img_pth": "images/train/000.png", "anns": ok}))
    os.symlink(outside, root / "anns" / "train" / "b_annotation_outside_root.json")

    (root / "anns" / "train" / "README.txt").write_text("not an annotation: ignored")
    return root


def to_hub_rows(samples) -> list[dict]:
    """Samples of a folder as rows of the hub layout (``images`` with the encoded bytes, ``texts``)."""
    rows = []
    for sample in samples:
        images = [{"bytes": ref.read_bytes(), "path": ref.name} for ref in sample.images]
        texts = [{"user": t.user, "assistant": t.assistant, "source": t.source} for t in sample.turns]
        rows.append({"images": images, "texts": texts})
    return rows


REAL_DOCS = Path(__file__).parent / "fixtures" / "real_docs"


def docling_eval_rows(names: list[str], scale: float = 0.1) -> list[dict]:
    """Real DoclingDocuments of tests/fixtures/real_docs as rows of docling-eval's schema (what its
    ``DatasetRecord.as_record_dict`` writes): the document as JSON, one PNG per page in page order (plain pages of
    the page's shape at ``scale``; ``make test-docling`` checks the real thing, written by docling-eval itself)."""
    import io

    rows = []
    for name in names:
        document = json.loads((REAL_DOCS / f"{name}.json").read_text())
        images = []
        for index, page_no in enumerate(sorted(document["pages"], key=int)):
            size = document["pages"][page_no]["size"]
            buffer = io.BytesIO()
            Image.new("RGB", (int(size["width"] * scale), int(size["height"] * scale)), "white").save(buffer, "PNG")
            images.append({"bytes": buffer.getvalue(), "path": None})
            document["pages"][page_no]["image"] = {
                "mimetype": "image/png",
                "dpi": 72,
                "size": size,
                "uri": f"GroundTruthPageImages/{index}",
            }
        rows.append(
            {
                "document_id": name,
                "GroundTruthDocument": json.dumps(document),
                "GroundTruthPageImages": images,
                "GroundTruthPictures": [],
                "modalities": ["layout", "markdown_text"],
                "mime_type": "application/pdf",
            }
        )
    return rows


def write_docling_eval(root: Path, rows: list[dict], split: str = "test") -> Path:
    """``rows`` as docling-eval's shard layout: ``root/<split>/shard_000000_000000.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / split).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / split / "shard_000000_000000.parquet")
    return root
