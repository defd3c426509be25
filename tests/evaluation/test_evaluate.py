"""evaluate.py end to end on a tiny checkpoint: every output file, the validation split, saved predictions,
before/after comparison, and configuration errors."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, compose_config, data_of, run_script
from eval_helpers import save_tiny_checkpoint, write_eval_data
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from granite_docling.config import ConfigError
from granite_docling.evaluation.config import (
    EvalConfig,
    EvaluateConfig,
    register_eval_configs,
    training_split_settings,
    validate_eval,
)
from granite_docling.evaluation.metrics import METRICS
from granite_docling.evaluation.records import Record, read_predictions, write_predictions
from granite_docling.evaluation.runner import evaluate, evaluation_samples, headline

register_eval_configs()


def compose_eval(*overrides: str) -> EvaluateConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return save_tiny_checkpoint(root / "after", seed=0), save_tiny_checkpoint(root / "before", seed=1)


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory):
    return write_eval_data(tmp_path_factory.mktemp("data") / "sample_eval")


@pytest.fixture(scope="module")
def evaluated(checkpoints, eval_data, tmp_path_factory):
    """One evaluate.py run with compare_to, as a user types it."""
    after, before = checkpoints
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    result = run_script(
        "evaluate.py", f"checkpoint={after}", f"compare_to={before}", "dataset=[sample]",
        f"dataset.sample.path={eval_data}", "eval.split=all", "eval.max_new_tokens=6", "eval.batch_size=3",
        f"hydra.run.dir={run_dir}", timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


def test_the_demo_command_composes():
    cfg = compose_eval("checkpoint=outputs/demo/final_model", "compare_to=outputs/demo/initial_model",
                       "dataset=[sample]", "dataset.sample.path=data/demo/eval", "eval.split=all")  # fmt: skip
    validate_eval(cfg)
    assert cfg.dataset["sample"].path == "data/demo/eval"
    assert (cfg.checkpoint, cfg.compare_to, cfg.eval.split) == ("outputs/demo/final_model",
                                                                "outputs/demo/initial_model", "all")  # fmt: skip


def test_the_headline_lines_give_before_after_and_the_change():
    before = {"n": 24, "edit_distance": {"mean": 0.998}, "doctags_parses": {"mean": 0.0},
              "stopped_with_eos": {"mean": 0.5}}  # fmt: skip
    after = {"n": 24, "edit_distance": {"mean": 0.675}, "doctags_parses": {"mean": 1.0},
             "stopped_with_eos": {"mean": 0.25}}  # fmt: skip
    assert headline(after, before) == [
        "before (compare_to) -> after (checkpoint), 24 samples:",
        "  edit distance        0.998 -> 0.675  (-0.323, better)",
        "  DocTags that parse      0% -> 100%   (+100 points, better)",
        "  stopped with eos       50% -> 25%    (-25 points, worse)",
    ]


def test_evaluate_writes_every_output(evaluated):
    run_dir, stdout = evaluated
    lines = [json.loads(line) for line in (run_dir / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    for line in lines:
        assert {"id", "dataset", "source", "prompt", "prediction", "reference", "stopped"} <= set(line)
        assert line["prompt"].endswith("<|start_of_role|>assistant<|end_of_role|>")
        assert line["stopped"] is False and line["new_tokens"] == 6  # a random model, cut by the budget
    assert {line["prompt"].count("<image>") for line in lines} == {1, 2}  # the two-page document has 2 images

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"overall", "sample"}
    for block in metrics.values():
        assert block["n"] == 4
        for name in METRICS:
            assert {"mean", "median"} <= set(block[name])
    assert metrics["overall"]["exact_match"]["mean"] == 0.0

    report = (run_dir / "report.md").read_text()
    assert "| edit_distance ↓ |" in report and "## Medians" in report
    assert (run_dir / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    page = (run_dir / "report.html").read_text()
    assert page.count("<div class=sample>") == 4 and "<iframe" in page and "data:image" not in page
    assert len(list((run_dir / "report_files").iterdir())) == 5  # the page images, one document has two

    documents = sorted(p for p in (run_dir / "pages" / "sample").iterdir())
    assert len(documents) == 2  # the two page conversions, not the formulas
    two_pages = [d for d in documents if (d / "reference" / "page_002.md").is_file()]
    assert len(two_pages) == 1
    for name in ("page_001.md", "page_001.html", "page_001.doctags", "prediction.md", "prediction.html"):
        assert (documents[0] / "prediction" / name).is_file(), name
    assert "<!DOCTYPE html>" in (two_pages[0] / "reference" / "page_002.html").read_text()
    for path in ("predictions.jsonl", "metrics.json", "report.md", "metrics.png", "report.html", "pages"):
        assert str(run_dir / path) in stdout, path


def test_the_page_predictions_are_written_as_a_docling_eval_dataset(evaluated):
    import pyarrow.parquet as pq
    from docling_core.types.doc import DoclingDocument

    from granite_docling.evaluation.docling_eval_export import schema
    from granite_docling.evaluation.doctags import document_markdown
    from granite_docling.evaluation.export import pages_to_document, split_pages

    run_dir, _ = evaluated
    table = pq.read_table(run_dir / "docling_eval" / "test" / "shard_000000_000000.parquet")
    assert table.schema.equals(schema())
    rows = table.to_pylist()
    records = {r["id"]: r for r in map(json.loads, (run_dir / "predictions.jsonl").read_text().splitlines())}
    pages = {i: r for i, r in records.items() if r["reference"].startswith("<doctag>")}
    assert sorted(row["document_id"] for row in rows) == sorted(pages)  # the two page conversions, not formulas
    for row in rows:
        record = pages[row["document_id"]]
        truth = DoclingDocument.model_validate_json(row["GroundTruthDocument"])
        assert document_markdown(truth) == document_markdown(pages_to_document(split_pages(record["reference"])))
        assert len(row["GroundTruthPageImages"]) == record["prompt"].count("<image>") == len(truth.pages)
        assert row["original_prediction"] == record["prediction"] and row["prediction_format"] == "doctags"
        assert (row["status"] == "success") == (row["PredictedDocument"] is not None)
    assert (run_dir / "compare_to" / "docling_eval" / "test").is_dir()


def test_compare_to_writes_the_second_evaluation_and_the_deltas(evaluated):
    run_dir, stdout = evaluated
    assert (run_dir / "compare_to" / "metrics.json").is_file()
    assert (run_dir / "comparison.png").is_file()
    comparison = json.loads((run_dir / "comparison.json").read_text())
    after = json.loads((run_dir / "metrics.json").read_text())
    before = json.loads((run_dir / "compare_to" / "metrics.json").read_text())
    row = comparison["overall"]["f1"]
    assert row["after"] == after["overall"]["f1"]["mean"] and row["before"] == before["overall"]["f1"]["mean"]
    assert row["delta"] == pytest.approx(row["after"] - row["before"])
    assert "| f1 ↑ |" in (run_dir / "comparison.md").read_text() and "delta" in stdout
    assert "<th>before</th><th>after</th><th>Δ</th>" in (run_dir / "report.html").read_text()
    assert "<th>before</th>" not in (run_dir / "compare_to" / "report.html").read_text()


def test_saved_predictions_are_scored_without_loading_a_model(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("no model may be loaded to score a predictions file")

    monkeypatch.setattr("granite_docling.model.load_model_and_processor", no_model)
    page = "<doctag><text><loc_10><loc_10><loc_200><loc_20>Hello world</text></doctag>"
    good = [
        Record("p1", "docs", "src", "", page, page, True),
        Record("f1", "formulas", None, "", "x ^ 2", "x ^ 2", True),
    ]
    bad = [Record("p1", "docs", "src", "", "", page, False), Record("f1", "formulas", None, "", "y", "x ^ 2", True)]
    write_predictions(tmp_path / "good.jsonl", good)
    write_predictions(tmp_path / "bad.jsonl", bad)
    assert read_predictions(tmp_path / "good.jsonl") == good

    cfg = compose_eval(f"eval.predictions={tmp_path / 'good.jsonl'}", f"compare_to={tmp_path / 'bad.jsonl'}")
    validate_eval(cfg)
    result = evaluate(cfg, tmp_path / "run")
    metrics = result.outputs.metrics
    assert set(metrics) == {"overall", "docs", "formulas"}
    assert metrics["overall"]["exact_match"]["mean"] == 1.0
    assert metrics["docs"]["f1"]["mean"] == 1.0 and metrics["docs"]["doctags_valid"]["mean"] == 1.0
    deltas = json.loads((tmp_path / "run" / "comparison.json").read_text())["overall"]
    assert deltas["exact_match"] == {"before": 0.0, "after": 1.0, "delta": 1.0, "better": True}
    assert deltas["edit_distance"]["delta"] < 0 and deltas["edit_distance"]["better"] is True
    assert deltas["stopped_with_eos"]["before"] == 0.5


def test_the_val_split_is_the_one_training_held_out(checkpoints, eval_data, tmp_path, tiny_processor):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("training:\n  val_ratio: 0.5\n  seed: 7\n")
    (run / "final_model").symlink_to(checkpoints[0])
    cfg = compose_eval(f"checkpoint={run / 'final_model'}", "dataset=[sample]", f"dataset.sample.path={eval_data}")
    assert training_split_settings(cfg.checkpoint, cfg.eval) == (0.5, 7)
    assert training_split_settings(cfg.checkpoint, EvalConfig(val_ratio=0.25, seed=1)) == (0.25, 1)

    held_out = [s.id for s in evaluation_samples(cfg)["sample"]]
    training = data_of(compose_config("model=tiny", "dataset=[sample]", f"dataset.sample.path={eval_data}",
                                         "data.val_ratio=0.5", "training.seed=7"), tiny_processor)  # fmt: skip
    assert held_out == [s.id for s in training.val.samples(100)] and len(held_out) == 2


def test_no_held_out_samples_is_a_clear_error(checkpoints, eval_data):
    cfg = compose_eval(f"checkpoint={checkpoints[0]}", "dataset=[sample]", f"dataset.sample.path={eval_data}",
                       "eval.val_ratio=0")  # fmt: skip
    with pytest.raises(ConfigError, match="eval.split=all"):
        evaluation_samples(cfg)


def test_configuration_errors_are_listed_together():
    with pytest.raises(ConfigError) as error:
        validate_eval(
            compose_eval("checkpoint=x", "eval.split=test", "eval.batch_size=0", "dataset.docling_matix.path=")
        )
    message = str(error.value)
    assert "eval.split='test'" in message and "eval.batch_size=0" in message
    assert "dataset.docling_matix.path is not set" in message
    with pytest.raises(ConfigError, match="pass checkpoint="):
        validate_eval(compose_eval())
    with pytest.raises(ConfigError, match="no such file"):
        validate_eval(compose_eval("eval.predictions=/nonexistent/predictions.jsonl"))
