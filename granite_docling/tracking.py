"""Where metrics go: ``metrics.jsonl`` in the run folder, W&B when enabled, and a loss-curve PNG at the end.

The loop calls one object; on non-main processes it is :class:`NullTracker`, so there are no
``if is_main_process`` branches around log calls (the pattern of nanochat's DummyWandb).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from omegaconf import OmegaConf

from granite_docling.config import Config

log = logging.getLogger(__name__)


class NullTracker:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def finish(self) -> None:
        pass


class Tracker(NullTracker):
    """Appends one JSON object per call to ``metrics.jsonl`` (with ``step``); mirrors to W&B if enabled."""

    def __init__(self, run_dir: Path, cfg: Config):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.wandb = None
        if cfg.wandb.enabled and cfg.wandb.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb.project,
                name=cfg.wandb.run_name or Path(run_dir).name,
                entity=cfg.wandb.entity,
                mode=cfg.wandb.mode,
                dir=str(run_dir),
                config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                resume="allow",
            )

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def finish(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_path: Path) -> Path | None:
    """train/loss (and its running average) and val/loss against optimizer steps, as a PNG."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    if not train:
        return None
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(*zip(*train, strict=True), lw=0.8, alpha=0.6, label="train loss")
    average = [(r["step"], r["train/avg_loss"]) for r in rows if "train/avg_loss" in r]
    if average:
        ax.plot(*zip(*average, strict=True), lw=1.5, label="train loss, running average")
    val = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", lw=1.5, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per supervised token)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return Path(out_path)
