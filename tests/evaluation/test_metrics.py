"""score_sample on real ground-truth pages and short answers, and the metrics.json aggregation."""

from pathlib import Path

import pytest

from granite_docling.evaluation.doctags import EOS_TOKEN, opened_by_prompt
from granite_docling.evaluation.metrics import (
    METRICS,
    aggregate_metrics,
    score_sample,
    summarize,
)

REAL_DOCS = Path(__file__).parents[1] / "fixtures" / "real_docs"
PAPER_PAGE = (REAL_DOCS / "2305.03393v1-pg9.doctags.txt").read_text()  # text, a table, a caption
CODE_PAGE = (REAL_DOCS / "code_and_formula.doctags.txt").read_text()  # text, code, a formula, no table


@pytest.mark.parametrize("page", [PAPER_PAGE, CODE_PAGE], ids=["paper", "code_and_formula"])
def test_ground_truth_against_itself_is_perfect(page):
    scores = score_sample(page, page)
    assert scores["kind"] == "page"
    assert scores["edit_distance"] == 0.0
    for name in ("precision", "recall", "f1", "bleu", "map", "layout_f1", "exact_match", "doctags_valid"):
        assert scores[name] == 1.0, name
    assert scores["meteor"] == pytest.approx(1.0, abs=1e-6)


def test_tables_are_scored_by_teds_not_by_the_text_metrics():
    perfect = score_sample(PAPER_PAGE, PAPER_PAGE)
    assert (perfect["teds"], perfect["teds_struct"], perfect["n_tables"]) == (1.0, 1.0, 1)
    changed = score_sample(PAPER_PAGE.replace("<fcel>0.965 0.969", "<fcel>0.000 0.000"), PAPER_PAGE)
    assert changed["teds"] < 1.0
    assert changed["teds_struct"] == 1.0
    assert changed["edit_distance"] == 0.0  # the Markdown leaves tables out
    assert score_sample(CODE_PAGE, CODE_PAGE)["teds"] is None  # no table in the reference


def test_a_dropped_table_scores_zero_teds():
    without_table = PAPER_PAGE[: PAPER_PAGE.index("<otsl>")] + PAPER_PAGE[PAPER_PAGE.index("</otsl>") + 7 :]
    scores = score_sample(without_table, PAPER_PAGE)
    assert (scores["teds"], scores["teds_struct"]) == (0.0, 0.0)
    assert scores["map"] < 1.0
    assert scores["doctags_valid"] == 1.0


def test_a_truncated_generation_is_unhealthy_but_still_scored():
    truncated = PAPER_PAGE[: len(PAPER_PAGE) // 2]
    scores = score_sample(truncated, PAPER_PAGE)
    assert scores["doctags_parses"] == 1.0  # docling-core recovers what it can
    assert scores["doctags_closed"] == 0.0
    assert scores["doctags_valid"] == 0.0
    assert scores["stopped_with_eos"] == 0.0
    assert 0.0 < scores["recall"] < 1.0
    assert scores["precision"] > scores["recall"]


def test_eos_in_the_raw_generation_marks_a_clean_stop_and_is_not_scored():
    scores = score_sample(PAPER_PAGE + EOS_TOKEN + EOS_TOKEN, PAPER_PAGE)
    assert scores["stopped_with_eos"] == 1.0
    assert scores["exact_match"] == 1.0
    assert score_sample(PAPER_PAGE, PAPER_PAGE, stopped=True)["stopped_with_eos"] == 1.0


def test_an_empty_page_prediction():
    scores = score_sample("", PAPER_PAGE)
    assert scores["edit_distance"] == 1.0
    assert scores["f1"] == scores["bleu"] == scores["map"] == scores["teds"] == 0.0


def test_short_answers_use_raw_text_and_exact_match():
    scores = score_sample("a+b", "a+b")
    assert scores["kind"] == "short"
    assert scores["exact_match"] == 1.0
    assert scores["edit_distance"] == 0.0
    assert scores["bleu"] == 0.0  # 13a gives 3 tokens: BLEU-4 without smoothing cannot score, as in docling-eval
    assert scores["teds"] is scores["map"] is scores["doctags_valid"] is None
    wrong = score_sample("E = m c^3", "E = mc^2")
    assert wrong["exact_match"] == 0.0
    assert wrong["edit_distance"] > 0.0


def test_short_otsl_answers_also_get_teds_and_health():
    reference = "<otsl><fcel>a<fcel>b<nl><fcel>1<fcel>2<nl></otsl>"
    scores = score_sample(reference.replace(">2<", ">3<"), reference)
    assert scores["kind"] == "short"
    assert round(scores["teds"], 3) == 0.833
    assert scores["teds_struct"] == 1.0
    assert scores["doctags_valid"] == 1.0
    assert scores["map"] is None  # no locations in the reference


def test_every_registered_metric_is_scored_in_the_registry_order():
    scores = score_sample("x", "y")
    assert list(scores) == [*METRICS, "kind", "n_tables", "loop_rule"]


def test_summarize_skips_metrics_that_do_not_apply():
    samples = [{"teds": 1.0, "bleu": 0.2}, {"teds": None, "bleu": 0.4}, {"teds": 0.5, "bleu": 0.9}]
    summary = summarize(samples, ["teds", "bleu", "map"])
    assert summary["n"] == 3
    assert summary["teds"] == {"mean": 0.75, "median": 0.75, "n": 2}
    assert summary["bleu"]["mean"] == pytest.approx(0.5)
    assert summary["bleu"]["median"] == 0.4
    assert summary["map"] == {"mean": None, "median": None, "n": 0}


def test_aggregate_builds_the_metrics_json_structure():
    page = score_sample(CODE_PAGE, CODE_PAGE)
    formula = score_sample("a+b", "a-b")
    grouped = {"docs": {"arxiv": [page, page], "manuals": [formula]}, "formulas": {"im2latex": [formula]}}
    report = aggregate_metrics(grouped)
    assert set(report) == {"overall", "docs", "formulas"}
    assert report["overall"]["n"] == 4
    assert report["docs"]["n"] == 3
    assert set(report["docs"]["sources"]) == {"arxiv", "manuals"}
    assert report["docs"]["sources"]["arxiv"]["n"] == 2
    assert set(report["overall"]["sources"]) == {"arxiv", "manuals", "im2latex"}
    for group in (report["overall"], report["formulas"], report["docs"]["sources"]["manuals"]):
        for name in METRICS:
            assert set(group[name]) == {"mean", "median", "n"}
    assert report["formulas"]["map"]["mean"] is None  # short answers have no layout
    assert report["docs"]["map"] == {"mean": 1.0, "median": 1.0, "n": 2}
    assert report["docs"]["exact_match"]["mean"] == pytest.approx(2 / 3)
    assert "sources" not in report["docs"]["sources"]["arxiv"]


def test_a_dataset_named_overall_is_refused():
    with pytest.raises(ValueError, match="overall"):
        aggregate_metrics({"overall": {"x": []}})


def test_a_page_prediction_without_doctags_is_not_valid():
    reference = "<doctag><text><loc_10><loc_10><loc_200><loc_30>Hello world</text></doctag>"
    for prediction in ("", "Hello world", "Convert this page to docling."):
        scores = score_sample(prediction, reference, stopped=True)
        assert scores["doctags_valid"] == 0.0, prediction
    assert score_sample(reference, reference, stopped=True)["doctags_valid"] == 1.0


def test_a_formula_crop_answer_closes_what_its_prompt_opened():
    # SynthFormulaNet: the user turn is "<formula>", so the answer closes an element it never opens.
    reference = r"<loc_48><loc_154><loc_452><loc_346>b = \pi</formula>"
    assert opened_by_prompt(reference) == ["formula"]
    assert score_sample(reference, reference, stopped=True)["doctags_valid"] == 1.0
    unclosed = score_sample(r"<loc_48><loc_154><loc_452><loc_346>b = \pi", reference, stopped=True)
    assert unclosed["doctags_closed"] == 0.0  # cut off before </formula>
    extra = score_sample(reference + "</text>", reference, stopped=True)
    assert extra["doctags_closed"] == 0.0
    assert opened_by_prompt("<doctag><text>a</text></doctag>") == []
    assert opened_by_prompt("a</text></code><text>b</text>") == ["code", "text"]  # outermost first
