"""The drop-in check: a checkpoint saved by train.py runs inside docling's own VLM pipeline, offline, and
answers exactly what our generation answers for the same page."""

from __future__ import annotations

import pypdfium2
import pytest
from conftest import run_script
from eval_helpers import save_tiny_checkpoint

from granite_docling.evaluation.docling_pipeline import docling_artifacts, repo_cache_folder

REAL_DOCS = __import__("pathlib").Path(__file__).parents[1] / "fixtures" / "real_docs"


def test_the_artifacts_folder_is_named_after_the_hub_id_and_points_at_the_checkpoint(tmp_path):
    first = save_tiny_checkpoint(tmp_path / "first")
    second = tmp_path / "second"
    second.mkdir()
    (second / "config.json").write_text("{}")
    assert repo_cache_folder() == "ibm-granite--granite-docling-258M"

    link = docling_artifacts(first, tmp_path / "artifacts")
    assert link == tmp_path / "artifacts" / "ibm-granite--granite-docling-258M"
    assert link.resolve() == first.resolve() and (link / "model.safetensors").is_file()
    assert docling_artifacts(second, tmp_path / "artifacts").resolve() == second.resolve()  # replaced

    (tmp_path / "downloaded" / "ibm-granite--granite-docling-258M").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        docling_artifacts(first, tmp_path / "downloaded")
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        docling_artifacts(tmp_path / "downloaded", tmp_path / "elsewhere")


@pytest.mark.slow
def test_a_trained_checkpoint_converts_a_page_inside_docling(tmp_path):
    pytest.importorskip("docling", reason="docling is not installed (pip install docling)")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from granite_docling.cli import main
    from granite_docling.data.answers import PAGE_PROMPT
    from granite_docling.evaluation.docling_pipeline import convert_with_docling
    from granite_docling.evaluation.generate import Prompt, generate

    assert main(["sample-data", str(tmp_path / "data"), "--pages", "2", "--formulas", "2"]) == 0
    run_dir = tmp_path / "run"
    trained = run_script(
        "train.py", "experiment=quick", "training.max_steps=2", "data.val_ratio=0",
        f"dataset.sample.path={tmp_path / 'data'}", f"hydra.run.dir={run_dir}", timeout=300,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    checkpoint = run_dir / "final_model"

    pdf = REAL_DOCS / "multi_page.pdf"
    result = convert_with_docling(pdf, checkpoint, tmp_path / "artifacts", page_range=(2, 2), max_new_tokens=10,
                                  device="cpu")  # fmt: skip
    assert result.status.name == "SUCCESS"
    [page] = result.pages
    docling_answer = page.predictions.vlm_response.text.split("<|end_of_text|>")[0]
    assert docling_answer

    model = AutoModelForImageTextToText.from_pretrained(checkpoint)
    processor = AutoProcessor.from_pretrained(checkpoint)
    image = pypdfium2.PdfDocument(pdf)[1].render(scale=2).to_pil().convert("RGB")  # docling renders at scale 2 too
    [ours] = generate(model, processor, [Prompt([image], PAGE_PROMPT)], max_new_tokens=10, progress=False)
    assert ours.text.startswith(docling_answer)  # docling also stops at "</doctag>"
