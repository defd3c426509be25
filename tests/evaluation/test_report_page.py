"""report.html (html_report.py, loss_curve.py): the EMA and the word diff on literal cases, finding the training
run of a checkpoint, the SVG loss curve, and one evaluate.py run with compare_to re-scoring saved predictions
(no model) next to a fake training run: before -> after metrics, the loss curve, samples with their images.
And what keeps the page safe to pass around: formula MathML through an allowlist, a Content-Security-Policy, and
the images a predictions file may name confined to its folder and the datasets given."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import random
import re
from pathlib import Path

import pytest
from eval_helpers import write_eval_data

from granite_docling.data.sources import ReadOptions, read_dataset
from granite_docling.errors import user_error_message
from granite_docling.evaluation.html_report import formula_mathml, metrics_html, sanitize_mathml, word_diff
from granite_docling.evaluation.loss_curve import (
    checkpoint_step,
    draw_loss_curve,
    ema,
    ema_weight,
    loss_series,
    training_run_folder,
)
from granite_docling.evaluation.records import PredictionsFileError, Record, read_predictions, write_predictions
from granite_docling.evaluation.report import write_outputs


def test_ema_on_literal_numbers():
    assert ema([1.0, 1.0, 1.0], 0.5) == [1.0, 1.0, 1.0]  # bias-corrected: a constant stays itself from the start
    assert ema([4.0, 0.0, 0.0], 0.5) == pytest.approx([4.0, 1 / 0.75, 0.5 / 0.875])
    assert ema([0.0, 2.0], 0.5) == pytest.approx([0.0, 4 / 3])
    assert ema([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    assert ema([], 0.9) == []
    with pytest.raises(ValueError, match="EMA weight"):
        ema([1.0], 1.0)
    assert ema_weight(90) == pytest.approx(0.9) and ema_weight(10_000) == pytest.approx(0.995)


def test_word_diff_marks_missing_and_added_words():
    marked, counts = word_diff("a b c", "a x c")
    assert marked == "a <del>b </del><ins>x </ins>c"
    assert counts == {"same": 2, "missing": 1, "extra": 1}
    marked, counts = word_diff("<text>x < y</text>", "<text>x < y</text><text>z</text>")
    assert marked == "&lt;text&gt;x &lt; y&lt;/text&gt;<ins>&lt;text&gt;z&lt;/text&gt;</ins>"  # tags are words
    assert counts == {"same": 5, "missing": 0, "extra": 3}
    assert word_diff("", "") == ("", {"same": 0, "missing": 0, "extra": 0})


def test_formula_answers_become_mathml_and_other_answers_do_not():
    mathml = formula_mathml("<loc_9><loc_43><loc_491><loc_457>W _ { j } ^ { 9 7 } = \\rho</formula>")
    assert mathml.startswith("<math") and 'display="block"' in mathml
    assert "<msubsup><mi>W</mi><mrow><mi>j</mi></mrow><mrow><mn>9</mn><mn>7</mn></mrow></msubsup>" in mathml
    assert "<loc_" not in mathml
    assert formula_mathml("x + 1</formula>") is not None  # without boxes
    assert formula_mathml("<loc_1><loc_2> x x x x") is None  # cut before </formula>: shown as text
    assert formula_mathml("<doctag><text>x</text></doctag>") is None
    assert formula_mathml("The title is Y.") is None


BOX = "<loc_10><loc_20><loc_30><loc_40>"


def test_markup_in_a_formula_stays_text_and_only_presentation_mathml_is_kept():
    # latex2mathml's convert() unescapes its output, so \text{<img ...>} used to become a live <img onerror>.
    assert formula_mathml(BOX + "x = \\text{<img/src/onerror=document.title='X'>}</formula>") == (
        '<math display="block"><mrow><mi>x</mi><mo>=</mo>'
        "<mtext>&lt;img/src/onerror=document.title='X'&gt;</mtext></mrow></math>"
    )
    assert formula_mathml(BOX + "\\text{<script>document.title='X'</script>}</formula>") == (
        "<math display=\"block\"><mrow><mtext>&lt;script&gt;document.title='X'&lt;/script&gt;</mtext></mrow></math>"
    )
    hostile = [
        "\\href{javascript:document.title='X'}{y}",  # latex2mathml writes <mrow href="javascript:...">
        "\\style{background:url(x)}{y}",  # and <mrow style="...">
        "\\text{<svg onload=document.title='X'>}",
        "\\text{<math href=javascript:document.title='X'>m</math>}",
        "\\text{<a xlink:href=javascript:document.title='X'>a</a>}",
        "\\text{&#x3C;script&#x3E;}",
    ]
    for latex in hostile:
        mathml = formula_mathml(BOX + latex + "</formula>")
        tags = re.findall(r"<([\w:-]+)", mathml)
        assert set(tags) <= {"math", "mrow", "mi", "mtext"}, (latex, mathml)
        assert not re.search(r"<[^>]*\s(on\w+|href|xlink:href|style)=", mathml), (latex, mathml)
        assert "javascript:" not in re.sub(r"<mtext>.*?</mtext>", "", mathml), (latex, mathml)  # only as text
    # Legitimate MathML keeps its elements, attributes and symbols (written by latex2mathml as &#x...; text).
    assert formula_mathml(BOX + "\\color{red}{y} \\le \\{ \\alpha \\}</formula>") == (
        '<math display="block"><mrow><mstyle mathcolor="red"><mrow><mi>y</mi></mrow><mo>≤</mo>'
        '<mo stretchy="false">{</mo><mi>α</mi><mo stretchy="false">}</mo></mstyle></mrow></math>'
    )
    assert formula_mathml(BOX + "\\begin{array}{c|c}a&b\\end{array}</formula>") == (
        '<math display="block"><mrow><mtable columnlines="solid"><mtr><mtd columnalign="center"><mi>a</mi></mtd>'
        '<mtd columnalign="center"><mi>b</mi></mtd></mtr></mtable></mrow></math>'
    )


def test_the_mathml_allowlist_on_hostile_markup():
    markup = (
        '<math href="javascript:alert(1)" display=block><mi onclick="alert(1)" xlink:href="javascript:alert(1)" '
        'style="color:red" class=c id=i>x</mi><semantics><annotation-xml encoding="text/html"><img src=x '
        'onerror="alert(1)"></annotation-xml></semantics><mtext><svg onload="alert(1)"><a '
        'xlink:href="javascript:alert(1)">a</a></svg></mtext><mtext><script>alert(1)</script></mtext>'
        "<maction actiontype=statusline>m</maction><mfrac linethickness=0>1</mfrac></math>"
    )
    assert sanitize_mathml(markup) == (
        '<math display="block"><mi>x</mi><mtext></mtext><mtext></mtext>m<mfrac linethickness="0">1</mfrac></math>'
    )


def test_predictions_files_read_images_only_from_their_folder_and_the_datasets(tmp_path, caplog):
    from PIL import Image

    dataset = tmp_path / "data"
    outside = tmp_path / "private"
    shared = tmp_path / "shared"
    for folder in (dataset, outside, shared):
        folder.mkdir()
    for path, size in (
        (dataset / "page.png", (40, 30)),
        (outside / "secret.png", (50, 50)),
        (shared / "beside.png", (20, 10)),
    ):
        Image.new("RGB", size, "white").save(path)
    (dataset / "link.png").symlink_to(outside / "secret.png")  # inside by name, outside once resolved
    escaped = str(dataset / ".." / "private" / "secret.png")
    images = [str(dataset / "page.png"), str(outside / "secret.png"), str(dataset / "link.png"), escaped,
              str(shared / "beside.png"), "", "bad\0name.png"]  # fmt: skip
    write_predictions(shared / "predictions.jsonl", [Record("p1", "d", None, "", "x", "x", True, images)])

    with caplog.at_level(logging.WARNING, logger="granite_docling.evaluation.records"):
        [record] = read_predictions(shared / "predictions.jsonl", image_roots=[str(dataset), "org/hub-id", ""])
    assert record.images == [str(dataset / "page.png"), "", "", "", str(shared / "beside.png"), "", ""]
    [warning] = caplog.messages
    assert "names 4 image(s) outside its folder" in warning and "secret.png" in warning
    assert "dataset.NAME.path=FOLDER" in warning

    outputs = write_outputs(tmp_path / "eval", [record], "t", page_exports=False)  # no copy of what was refused
    assert [size for _, *size in outputs.examples[0]] == [[40, 30], [20, 10]]
    assert sorted(p.name for p in (tmp_path / "eval" / "report_files").iterdir()) == [
        "0000_p1_1.webp",
        "0000_p1_2.webp",
    ]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"id": "a", "dataset": "d", "prediction": "x", "reference": "x", "images": [5]}', "list of file paths"),
        ('{"id": "a", "dataset": "d", "prediction": "x", "reference": "x", "images": "a.png"}', "list of file paths"),
        ('{"id": "a", "dataset": "d", "prediction": 5, "reference": "x"}', "'prediction' is a JSON int"),
        ("[1, 2]", "a JSON list, not an object"),
        ("{not json", "Expecting property name"),
    ],
)
def test_a_broken_predictions_file_is_one_line(tmp_path, line, message):
    path = tmp_path / "predictions.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PredictionsFileError, match=re.escape(message)) as error:
        read_predictions(path)
    assert user_error_message(error.value) == str(error.value) and str(error.value).startswith(f"{path}:1: ")
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(PredictionsFileError, match="cannot read"):
        read_predictions(path)


def test_the_training_run_is_found_from_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "final_model").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint_step_40").mkdir(parents=True)
    assert training_run_folder(run / "final_model") is None  # no metrics.jsonl: not a training run
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    assert training_run_folder(run / "final_model") == run
    assert training_run_folder(str(run / "checkpoints" / "checkpoint_step_40")) == run
    assert checkpoint_step(run / "checkpoints" / "checkpoint_step_40") == 40 and checkpoint_step(run) is None
    assert training_run_folder(run) is None and training_run_folder("ibm-granite/granite-docling-258M") is None
    evaluation = tmp_path / "eval"  # re-scoring an evaluation's predictions leads to the model it evaluated
    (evaluation / ".hydra").mkdir(parents=True)
    (evaluation / "predictions.jsonl").write_text("")
    (evaluation / ".hydra" / "config.yaml").write_text(f"checkpoint: {run / 'final_model'}\n")
    assert training_run_folder(evaluation / "predictions.jsonl") == run
    assert training_run_folder(tmp_path / "elsewhere" / "predictions.jsonl") is None


def fake_training_metrics(path: Path, steps: int = 90) -> None:
    """metrics.jsonl of a run whose loss zig-zags (pages and crops alternate) while it falls, with per-source
    losses and a validation loss every 30 steps."""
    with path.open("w") as f:
        for step in range(1, steps + 1):
            loss = 4.5 * math.exp(-step / 25) + 0.3 + (0.8 if step % 2 else 0.0)
            row = {"step": step, "train/loss": loss, "train/loss/pages": 1.3 * loss, "train/loss/formulas": 0.6 * loss}
            f.write(json.dumps(row) + "\n")
            if step % 30 == 0:
                f.write(json.dumps({"step": step, "val/loss": 0.9 * loss, "epoch": 0}) + "\n")


def test_the_loss_curve(tmp_path):
    fake_training_metrics(tmp_path / "metrics.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sorted(loss_series(rows)) == ["train/loss", "train/loss/formulas", "train/loss/pages", "val/loss"]
    svg = draw_loss_curve(rows, tmp_path / "loss.svg", mark_step=60).read_text()
    labels = ["train loss (every step)", "train loss, EMA over ~10 steps", "pages (EMA)", "formulas (EMA)",
              "validation loss", "evaluated: step 60", "(log scale)"]  # fmt: skip
    assert all(label in svg for label in labels)  # the legend and axis, as text
    assert draw_loss_curve([{"step": 1, "val/loss": 1.0}], tmp_path / "none.svg") is None
    assert draw_loss_curve(rows, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_the_metric_table_shows_before_and_after():
    def block(n: int, f1: float, edit: float) -> dict:
        return {"n": n, "f1": {"mean": f1}, "edit_distance": {"mean": edit}, "teds": {"mean": None}}

    after = {"overall": block(4, 0.75, 0.25), "docs": block(4, 0.75, 0.25)}
    table = metrics_html(after)
    assert table.count("<th>") == 2 and "teds" not in table  # one dataset: overall only; no TEDS anywhere
    assert "<td>f1 ↑</td><td>0.750</td>" in table and "<td>edit_distance ↓</td><td>0.250</td>" in table
    table = metrics_html(after, {"overall": block(4, 0.5, 0.5), "docs": block(4, 0.5, 0.5)})
    assert "<th>before</th><th>after</th><th>Δ</th>" in table
    assert '<td>0.500</td><td>0.750</td><td><span class="delta better">+0.250</span></td>' in table
    assert '<td>0.500</td><td>0.250</td><td><span class="delta better">-0.250</span></td>' in table


def build_evaluation_folder(root: Path) -> tuple[Path, Path]:
    """(evaluation folder, training run folder): evaluate.py re-scoring saved predictions of a run's final_model
    with compare_to a worse predictions file, as ``make demo`` compares the trained model with the untrained one.

    The predictions are the references with one word in six replaced (tags kept, so they still convert; page
    conversions, formula crops, a two-page document); the "before" answers are an unclosed fragment.
    """
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from granite_docling.evaluation.config import register_eval_configs, validate_eval
    from granite_docling.evaluation.runner import evaluate

    samples, _ = read_dataset(write_eval_data(root / "data"), "sample", ReadOptions())
    rng = random.Random(0)

    def changed(text: str) -> str:
        words = text.split(" ")
        plain = [i for i, word in enumerate(words) if "<" not in word and ">" not in word]
        for i in rng.sample(plain, max(1, len(plain) // 6)):
            words[i] = "changed"
        return " ".join(words)

    def records(answer) -> list[Record]:
        return [Record(s.id, s.dataset, s.source, "", answer(s.turns[0].assistant), s.turns[0].assistant, True,
                       [str(path) for path in s.images]) for s in samples]  # fmt: skip

    run = root / "run"
    (run / "final_model").mkdir(parents=True)
    fake_training_metrics(run / "metrics.jsonl")
    earlier = root / "earlier_eval"  # the evaluation that generated the answers, as evaluate.py leaves it
    (earlier / ".hydra").mkdir(parents=True)
    (earlier / ".hydra" / "config.yaml").write_text(f"checkpoint: {run / 'final_model'}\n")
    write_predictions(earlier / "predictions.jsonl", records(changed))
    write_predictions(root / "untrained.jsonl", records(lambda _: "<doctag><text><loc_1>"))

    register_eval_configs()
    # dataset=: the folder the images the predictions name may be read from (no sample is read)
    overrides = [f"eval.predictions={earlier / 'predictions.jsonl'}", f"compare_to={root / 'untrained.jsonl'}",
                 "dataset=[sample]", f"dataset.sample.path={root / 'data'}"]  # fmt: skip
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="evaluate", overrides=overrides))
    validate_eval(cfg)
    evaluate(cfg, root / "eval")
    return root / "eval", run


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory):
    return build_evaluation_folder(tmp_path_factory.mktemp("report"))


def local_references(page: str) -> list[str]:
    return [ref for ref in re.findall(r"(?:src|href)='([^']+)'", page) if "://" not in ref]


def test_report_page_of_a_comparison_with_a_training_run(evaluation):
    folder, run = evaluation
    page = (folder / "report.html").read_text()
    assert "data:image" not in page and len(page.encode()) < 150_000  # images are files, not base64
    assert "<th>before</th><th>after</th><th>Δ</th>" in page and 'class="delta better"' in page
    assert "stopped_with_eos" in page and "doctags_parses" in page  # the headline cards
    assert "<img class=loss src='report_files/loss_curve.svg'" in page and str(run / "metrics.jsonl") in page
    assert "pages (EMA)" in (folder / "report_files" / "loss_curve.svg").read_text()

    assert page.count("<div class=sample>") == 4  # every sample (fewer than eval.num_examples)
    assert page.count("<del>") > 4 and page.count("<ins>") > 4 and "Reference → before (compare_to)" in page
    images = re.findall(r"<img loading=lazy src='([^']+)'", page)
    assert len(images) == 5 and all(path.startswith("report_files/") for path in images)  # one 2-page document
    assert page.count("<iframe loading=lazy sandbox src='pages/") == 4  # the 2 documents, reference + prediction
    assert page.count("<div class=formula><math") == 4  # the 2 formula crops, reference + prediction
    for ref in local_references(page):
        assert (folder / ref).exists(), ref
    before_page = (folder / "compare_to" / "report.html").read_text()
    assert "<th>before</th>" not in before_page and "No training run found" in before_page


def test_the_page_allows_no_script_and_its_own_style_by_hash(evaluation):
    folder, _ = evaluation
    page = (folder / "report.html").read_text()
    [policy] = re.findall(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    directives = dict(d.strip().split(" ", 1) for d in policy.split(";"))
    [style] = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(style.encode()).digest()).decode()
    assert directives == {
        "default-src": "'none'",
        "script-src": "'none'",
        "style-src": f"'sha256-{digest}'",
        "img-src": "'self'",
        "frame-src": "'self'",
        "base-uri": "'none'",
        "form-action": "'none'",
    }
    assert page.index("Content-Security-Policy") < page.index("<style>")  # in force before anything it governs
    assert "<script" not in page and " style=" not in page and "srcdoc" not in page
