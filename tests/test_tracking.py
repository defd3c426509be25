"""Trackers: metrics.jsonl always, TensorBoard and MLflow through Accelerate read back equal to it, a resumed run
continues the same tracker runs without a step twice; the objective a sweep optimises."""

from __future__ import annotations

import json

import pytest
from accelerate.state import AcceleratorState
from conftest import compose_config
from fixture_data import good_dataset

from granite_docling import train_loop
from granite_docling.config import ConfigError, validate
from granite_docling.tracking import TRACKER_IDS, cut_metrics, flat_config, objective, read_metrics, tracker_names


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_cut_metrics_keeps_the_rows_a_checkpoint_had_seen(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}, {"step": 2, "val/loss": 2.5},
            {"step": 3, "train/loss": 1.0}]  # fmt: skip
    write_rows(path, rows)
    assert cut_metrics(path, 2, keep_through_step=2) == rows[2:]  # the val row came after the checkpoint
    assert read_metrics(path) == rows[:2]
    write_rows(path, rows)
    assert cut_metrics(path, None, keep_through_step=2) == rows[3:]  # older checkpoints: by step
    assert cut_metrics(path, None, keep_through_step=2) == []
    assert not list(tmp_path.glob("*.tmp"))


def test_objective_is_the_final_validation_loss_else_the_last_training_loss():
    assert objective({"train/loss": 1.5, "val/loss": 2.0}, "auto") == 2.0
    assert objective({"train/loss": 1.5}, "auto") == 1.5
    assert objective({"train/loss": 1.5, "gen/edit_distance": 0.3}, "gen/edit_distance") == 0.3
    with pytest.raises(ConfigError, match="never logged; logged metrics: train/loss"):
        objective({"train/loss": 1.5, "epoch": 0}, "val/loss")


def test_report_to_names_and_config_checks():
    cfg = compose_config(
        "experiment=quick", "training.report_to=[tensorboard,mlflow,tensorboard]", "wandb.enabled=true"
    )
    assert tracker_names(cfg) == ["tensorboard", "mlflow", "wandb"]
    flat = flat_config(cfg)
    assert flat["training.lr_connector"] == cfg.training.lr_connector and flat["model.name"] == "tiny"
    assert all(isinstance(v, (bool, int, float, str)) or v is None for v in flat.values())
    cfg.training.report_to = ["tensorbored"]
    with pytest.raises(ConfigError, match="'tensorbored'; choose from .*tensorboard"):
        validate(cfg)
    cfg.training.report_to, cfg.data.val_ratio, cfg.training.objective = [], 0.0, "val/loss"
    with pytest.raises(ConfigError, match="objective=val/loss needs a validation split"):
        validate(cfg)


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_history(run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow.tracking import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient().get_metric_history(run_id, key))


def test_tensorboard_and_mlflow_equal_metrics_jsonl_and_a_resume_sends_no_step_twice(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    data = good_dataset(tmp_path / "data", 6)
    run = tmp_path / "run"
    overrides = ["experiment=quick", f"dataset.sample.path={data}", "data.num_workers=0", "training.batch_size=2",
                 "data.val_ratio=0.3", "training.val_steps=2", "training.save_steps=2", "training.max_steps=5",
                 "training.max_checkpoints=5", "training.report_to=[tensorboard,mlflow]"]  # fmt: skip
    assert train_loop.train(compose_config(*overrides), run).exit_code == 0
    first_run_id = json.loads((run / TRACKER_IDS).read_text())["mlflow"]

    # As after a crash at step 5: continue from the step-2 checkpoint in the same folder. Steps 3-5 run again.
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed = compose_config(*overrides, f"training.resume={run / 'checkpoints' / 'checkpoint_step_2'}")
    result = train_loop.train(resumed, run)
    assert result.exit_code == 0
    assert json.loads((run / TRACKER_IDS).read_text())["mlflow"] == first_run_id  # the same MLflow run

    rows = read_metrics(run / "metrics.jsonl")
    train_rows = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    val_rows = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    assert [step for step, _ in train_rows] == [1, 2, 3, 4, 5]  # once each, the replayed ones replaced
    assert [step for step, _ in val_rows] == [2, 4, 5]  # every 2 steps, and the final model's
    assert result.latest["val/loss"] == val_rows[-1][1]

    scalars = tensorboard_scalars(run / "tensorboard")
    for key, expected in (("train/loss", train_rows), ("val/loss", val_rows)):
        for got in (scalars[key], mlflow_history(first_run_id, key)):
            assert [step for step, _ in got] == [step for step, _ in expected]
            assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-5)
    assert set(scalars) >= {"train/lr", "train/grad_norm", "train/supervised_tokens", "epoch"}
