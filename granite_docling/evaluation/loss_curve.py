"""The loss curve of a training run, drawn in one place with matplotlib: loss_curve.png at the end of training,
and the curve report.html shows of the run a checkpoint came from.

    run = training_run_folder("outputs/demo/final_model")     # outputs/demo (it holds metrics.jsonl)
    draw_loss_curve(read_metrics(run / "metrics.jsonl"), Path("loss.svg"), mark_step=checkpoint_step(...))

The raw ``train/loss`` zig-zags when length-grouped batches alternate between long pages and short crops, so
the curve to read is its exponential moving average (:func:`ema`, bias-corrected as TensorBoard's smoothing is),
over a span that grows with the run (:func:`ema_weight`). ``val/loss`` is drawn as points, and every logged
``train/loss/<source>`` as its own smoothed line. The y axis is logarithmic when the loss spans more than 2x.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from granite_docling.checkpoint_manifest import read_manifest

log = logging.getLogger(__name__)

SOURCE_PREFIX = "train/loss/"  # train/loss/<source>: the loss of one source's samples in a step
_STEP_CHECKPOINT = re.compile(r"^checkpoint_step_(\d+)$")


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average: ``m_i = w m_{i-1} + (1 - w) x_i``, reported as
    ``m_i / (1 - w^i)`` so that the first points are not pulled towards 0. ``weight=0`` returns ``values``."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"the EMA weight must be in [0, 1), got {weight}")
    smoothed = []
    average = 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1.0 - weight) * value
        smoothed.append(average / (1.0 - weight**i))
    return smoothed


def ema_weight(points: int) -> float:
    """The smoothing of a curve of ``points`` steps: a span of max(10, points / 50) steps, weight 1 - 1/span."""
    return 1.0 - 1.0 / max(10.0, points / 50)


def training_run_folder(target: str | Path | None, _depth: int = 0) -> Path | None:
    """The training run folder that ``target`` (what evaluate.py evaluated) came from, or None.

    A checkpoint is ``<run>/final_model`` or ``<run>/checkpoints/checkpoint_*`` with ``<run>/metrics.jsonl``; a
    predictions.jsonl leads to the model its own evaluation folder's ``.hydra/config.yaml`` names.
    """
    if not target or _depth > 3:
        return None
    path = Path(target)
    if path.suffix == ".jsonl":
        config = path.parent / ".hydra" / "config.yaml"
        if not config.is_file():
            return None
        from omegaconf import OmegaConf

        try:
            saved = OmegaConf.to_container(OmegaConf.load(config), resolve=False)
        except Exception as error:  # an unreadable config only costs the loss curve
            log.debug("%s: %s", config, error)
            return None
        upstream = saved.get("checkpoint") or (saved.get("eval") or {}).get("predictions")
        return training_run_folder(upstream, _depth + 1)
    if path.name == "final_model":
        run = path.parent
    elif path.parent.name == "checkpoints" and path.name.startswith("checkpoint_"):
        run = path.parent.parent
    else:
        return None
    return run if (run / "metrics.jsonl").is_file() else None


def checkpoint_step(target: str | Path | None) -> int | None:
    """The optimizer step of a checkpoint folder (marked on the curve): from its manifest, or N of a
    ``checkpoint_step_N`` folder of the older format; else None."""
    if not target:
        return None
    manifest = read_manifest(Path(target)) if Path(target).is_dir() else None
    if manifest is not None:
        return int(manifest["step"])
    match = _STEP_CHECKPOINT.match(Path(target).name)
    return int(match.group(1)) if match else None


def loss_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """``{"train/loss": [(step, loss), ...], "val/loss": [...], "train/loss/<source>": [...]}`` from metrics.jsonl
    rows; non-finite values are left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key in ("train/loss", "val/loss") or key.startswith(SOURCE_PREFIX):
                if isinstance(value, (int, float)) and math.isfinite(value) and "step" in row:
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def draw_loss_curve(rows: Sequence[Mapping[str, Any]], path: Path, mark_step: int | None = None) -> Path | None:
    """Draw train/loss (every step, and its EMA), each train/loss/<source> (EMA) and val/loss against optimizer
    steps into ``path``, a PNG or an SVG by its suffix; None when no train/loss was logged. ``mark_step``: a dashed
    line there (the evaluated checkpoint). The y axis is logarithmic when the losses span more than 2x."""
    series = loss_series(rows)
    train = series.get("train/loss")
    if not train:
        return None
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    def smoothed(points: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
        return [s for s, _ in points], ema([v for _, v in points], ema_weight(len(points)))

    span = round(1 / (1 - ema_weight(len(train))))  # the EMA, not the mean since step 0, which lags far behind
    values = [v for points in series.values() for _, v in points]
    logarithmic = min(values) > 0 and max(values) / min(values) > 2
    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):  # SVG text stays text
        fig, ax = plt.subplots(figsize=(9.6, 3.4), dpi=120)
        ax.plot(*zip(*train, strict=True), lw=0.8, color="#9ecae1", label="train loss (every step)")
        ax.plot(*smoothed(train), lw=1.8, color="#1f77b4", label=f"train loss, EMA over ~{span} steps")
        for key in sorted(k for k in series if k.startswith(SOURCE_PREFIX)):
            ax.plot(*smoothed(series[key]), lw=1.2, label=f"{key.removeprefix(SOURCE_PREFIX)} (EMA)")
        if "val/loss" in series:
            ax.plot(*zip(*series["val/loss"], strict=True), "o-", lw=1.2, color="#ff7f0e", label="validation loss")
        if mark_step is not None:
            ax.axvline(mark_step, ls="--", lw=1, color="#555", label=f"evaluated: step {mark_step}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss per supervised token" + (" (log scale)" if logarithmic else ""))
        ax.set_yscale("log" if logarithmic else "linear")
        if logarithmic:  # plain numbers (2, 3, 5...) between the decades, not only 10^0 and 10^1
            for set_formatter in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                set_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    return Path(path)
