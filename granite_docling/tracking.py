"""Where metrics go: ``metrics.jsonl`` in the run folder, always; every tracker of ``training.report_to``
(TensorBoard, W&B, MLflow, trackio, Comet, Aim, ClearML, DVCLive, SwanLab) through Accelerate's tracking
classes; and a loss-curve PNG at the end.

    python train.py training.report_to=[tensorboard,mlflow] ...   # wandb.enabled=true adds wandb

One run folder is one tracker run. A resume in the same folder continues the same runs (their ids are kept in
``trackers.json``): ``metrics.jsonl`` is cut back to the rows written when the checkpoint was saved, and the
steps a tracker already received before the stop are not sent to it again, so no step appears twice.

The loop calls one object; on non-main processes it is :class:`NullTracker`, so there are no
``if is_main_process`` branches around log calls (the pattern of nanochat's DummyWandb). Both remember the
latest value of every metric: the objective a sweep optimises is read from there.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from granite_docling.config import Config, ConfigError

log = logging.getLogger(__name__)

TRACKER_IDS = "trackers.json"


def tracker_names(cfg: Config) -> list[str]:
    """``training.report_to`` in order without repeats, plus ``wandb`` when ``wandb.enabled`` (the seed's switch)."""
    names = list(cfg.training.report_to)
    if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
        names.append("wandb")
    return list(dict.fromkeys(names))


def tracker_kwargs(name: str, cfg: Config, run_dir: Path, run_id: str | None) -> dict[str, Any]:
    """Keyword arguments for Accelerate's tracker class ``name``: folders, run names and the run to continue."""
    run_name = cfg.wandb.run_name or run_dir.name
    if name == "tensorboard":  # events in <run folder>/tensorboard
        return {"run_name": "tensorboard", "logging_dir": str(run_dir)}
    if name == "aim":
        return {"run_name": run_name, "logging_dir": str(run_dir)}
    if name == "wandb":
        mode = cfg.wandb.mode
        return {
            "run_name": cfg.wandb.project,
            "name": run_name,
            "entity": cfg.wandb.entity,
            "mode": mode,
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
        }
    if name == "mlflow":  # MLFLOW_TRACKING_URI picks the store (a server, or sqlite:///mlflow.db)
        return {"experiment_name": cfg.wandb.project, "run_name": run_name, "run_id": run_id}
    if name == "trackio":
        return {"run_name": cfg.wandb.project, "name": run_name, "resume": "allow" if run_id else "never"}
    return {"run_name": cfg.wandb.project}


def flat_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as ``{"training.lr_text": 5e-05, ...}``: scalars only, what every tracker accepts."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), item)
        else:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) or value is None else str(value)

    visit("", OmegaConf.to_container(OmegaConf.structured(cfg)))
    return flat


def cut_metrics(path: Path, keep_rows: int | None, keep_through_step: int) -> list[dict]:
    """Cut ``metrics.jsonl`` back to what a checkpoint had seen; returns the rows cut off.

    ``keep_rows`` is the number of rows written when the checkpoint was saved; checkpoints from before it was
    recorded (None) keep the rows up to ``keep_through_step``. The file is replaced atomically.
    """
    rows = read_metrics(path)
    if keep_rows is None:
        keep_rows = next((i for i, row in enumerate(rows) if row.get("step", 0) > keep_through_step), len(rows))
    if keep_rows >= len(rows):
        return []
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows[:keep_rows]), encoding="utf-8")
    os.replace(temporary, path)
    return rows[keep_rows:]


class NullTracker:
    """Records nothing but the latest value of each metric (every process knows the objective)."""

    def __init__(self):
        self.latest: dict[str, float] = {}
        self.rows = 0  # rows of metrics.jsonl written, in total

    def log(self, metrics: dict, step: int) -> None:
        self.latest |= metrics

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """Appends one JSON object per call to ``metrics.jsonl`` (with ``step``) and sends it to every tracker.

    ``resume_step`` / ``resume_rows``: the checkpoint's optimizer step and the metrics.jsonl rows it had seen,
    or None on a fresh start (which moves an older metrics.jsonl of the same folder aside).
    """

    def __init__(self, run_dir: Path, cfg: Config, resume_step: int | None = None, resume_rows: int | None = None):
        super().__init__()
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.sent_through = 0  # steps up to this one reached the trackers before a stop: not sent again
        if resume_step is None:
            if self.path.is_file():
                os.replace(self.path, self.path.with_name("metrics.previous.jsonl"))
        else:
            cut = cut_metrics(self.path, resume_rows, resume_step)
            self.sent_through = max((row.get("step", 0) for row in cut), default=0)
        self.rows = len(read_metrics(self.path))

        ids_file = run_dir / TRACKER_IDS
        previous_ids = json.loads(ids_file.read_text()) if resume_step is not None and ids_file.is_file() else {}
        self.trackers = []
        for name in tracker_names(cfg):
            tracker = LOGGER_TYPE_TO_CLASS[name](**tracker_kwargs(name, cfg, run_dir, previous_ids.get(name)))
            tracker.start()
            if not previous_ids.get(name):  # a continued run keeps the config it started with
                tracker.store_init_configuration(flat_config(cfg))
            self.trackers.append(tracker)
        ids = {t.name: run_id for t in self.trackers if (run_id := _run_id(t))}
        if ids:
            ids_file.write_text(json.dumps(ids, indent=2) + "\n")
        if self.trackers:
            log.info(
                "reporting to %s%s",
                ", ".join(t.name for t in self.trackers),
                f" (continuing the runs of {ids_file})" if previous_ids else "",
            )

    def log(self, metrics: dict, step: int) -> None:
        super().log(metrics, step)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.rows += 1
        if step > self.sent_through:
            for tracker in self.trackers:
                tracker.log(metrics, step=step)

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


def _run_id(tracker) -> str | None:
    """The id under which a tracker's run can be continued (W&B, MLflow); None for the others."""
    if tracker.name == "wandb":
        return tracker.run.id
    if tracker.name == "mlflow":
        return tracker.active_run.info.run_id
    return None


def objective(latest: dict[str, float], name: str) -> float:
    """The value a sweep optimises: metric ``name`` as last logged; 'auto' is val/loss, else train/loss."""
    if name == "auto":
        name = "val/loss" if "val/loss" in latest else "train/loss"
    if name not in latest:
        logged = ", ".join(sorted(k for k in latest if "/" in k)) or "none"
        raise ConfigError(f"training.objective={name} was never logged; logged metrics: {logged}")
    return float(latest[name])


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
