"""The recipe for a new metric, kept true: one function of an AnswerContext and one METRICS entry put it in
score_sample, metrics.json, the comparison (with its direction), report.md, report.html and the terminal lines."""

import pytest

from granite_docling.evaluation.html_report import metrics_html
from granite_docling.evaluation.metrics import METRICS, AnswerContext, Headline, Metric, aggregate_metrics, score_sample
from granite_docling.evaluation.records import compare_metrics
from granite_docling.evaluation.report import metrics_report
from granite_docling.evaluation.runner import headline


def length_ratio(answer: AnswerContext) -> float | None:
    """The toy metric: the answer's length over the reference's (lower is better here)."""
    return len(answer.prediction) / len(answer.reference) if answer.reference else None


@pytest.fixture
def registered(monkeypatch):
    """The recipe's one registry entry, undone after the test."""
    toy = Metric("length_ratio", length_ratio, lower_is_better=True, headline=Headline("length ratio", "{:.2f}"))
    monkeypatch.setitem(METRICS, toy.name, toy)
    return monkeypatch


def test_a_registered_metric_reaches_every_output(registered):
    longer = score_sample("a+b+c+d+e", "a+b+c")
    shorter = score_sample("a+b+c", "a+b+c")
    assert (longer["length_ratio"], shorter["length_ratio"]) == (9 / 5, 1.0)
    assert list(shorter)[-4:] == ["length_ratio", "kind", "n_tables", "loop_rule"]

    before = aggregate_metrics({"formulas": {"im2latex": [longer]}})
    after = aggregate_metrics({"formulas": {"im2latex": [shorter]}})
    assert after["overall"]["length_ratio"] == {"mean": 1.0, "median": 1.0, "n": 1}
    row = compare_metrics(after, before)["overall"]["length_ratio"]
    assert row["delta"] == pytest.approx(-0.8)
    assert row["better"] is True  # lower is better: the shorter answer is the improvement

    assert "| length_ratio ↓ |" in metrics_report(after, "toy")
    assert "<td>length_ratio ↓</td>" in metrics_html(after, before)
    assert any("length ratio" in line and "better" in line for line in headline(after["overall"], before["overall"]))

    registered.undo()
    assert "length_ratio" not in score_sample("a+b", "a+b")


def test_the_registry_lists_each_metric_once_under_its_own_name():
    assert all(name == metric.name for name, metric in METRICS.items())
    assert [name for name, metric in METRICS.items() if metric.lower_is_better] == ["edit_distance", "loops"]
    headlines = [name for name, metric in METRICS.items() if metric.headline is not None]
    assert headlines == ["edit_distance", "f1", "doctags_parses", "stopped_with_eos", "loops"]
