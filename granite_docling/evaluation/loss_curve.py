"""The training loss of the run a checkpoint came from, smoothed, as inline SVG for report.html.

    run = training_run_folder("outputs/demo/final_model")     # outputs/demo (it holds metrics.jsonl)
    svg, legend = loss_curve_svg(read_metrics(run / "metrics.jsonl"))

The raw ``train/loss`` zig-zags when length-grouped batches alternate between long pages and short crops, so
the curve to read is its exponential moving average (:func:`ema`, bias-corrected as TensorBoard's smoothing is),
over a span that grows with the run (:func:`ema_weight`). ``val/loss`` is drawn as points, and every logged
``train/loss/<source>`` as its own smoothed line. The y axis is logarithmic when the loss spans more than 2x.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from granite_docling.checkpoint_files import read_manifest

log = logging.getLogger(__name__)

SOURCE_PREFIX = "train/loss/"  # train/loss/<source>: the loss of one source's samples in a step
_STEP_CHECKPOINT = re.compile(r"^checkpoint_step_(\d+)$")
_COLOURS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Bias-corrected exponential moving average: ``m_i = w m_{i-1} + (1 - w) x_i``, reported as
    ``m_i / (1 - w^i)`` so that the first points are not pulled towards 0. ``weight=0`` returns ``values``."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"the EMA weight must be in [0, 1), got {weight}")
    smoothed, average = [], 0.0
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


def _nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round values (1, 2 or 5 x 10^k apart) between low and high."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _log_ticks(low: float, high: float) -> list[float]:
    ticks = [
        m * 10.0**k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1) for m in (1, 2, 5)
    ]
    return [t for t in ticks if low <= t <= high]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.0e}"


def loss_curve_svg(
    rows: Sequence[Mapping[str, Any]], mark_step: int | None = None, width: int = 960, height: int = 300
) -> tuple[str, list[tuple[str, str]]]:
    """(an ``<svg>`` of the loss curves, the legend as [(colour, label)]); ("", []) when no train/loss was logged.

    ``mark_step`` draws a dashed vertical line there (the evaluated step checkpoint).
    """
    series = loss_series(rows)
    train = series.get("train/loss", [])
    if not train:
        return "", []
    weight = ema_weight(len(train))
    span = round(1 / (1 - weight))
    lines: list[tuple[str, list[tuple[int, float]], str]] = [  # (colour, points, style)
        ("#9ecae1", train, "raw"),
        ("#1f77b4", list(zip([s for s, _ in train], ema([v for _, v in train], weight), strict=True)), "main"),
    ]
    legend = [("#9ecae1", "train loss (every step)"), ("#1f77b4", f"train loss, EMA over ~{span} steps")]
    sources = sorted(k for k in series if k.startswith(SOURCE_PREFIX))
    for colour, key in zip(_COLOURS, sources, strict=False):
        points = series[key]
        smoothed = ema([v for _, v in points], ema_weight(len(points)))
        lines.append((colour, list(zip([s for s, _ in points], smoothed, strict=True)), "source"))
        legend.append((colour, f"{key.removeprefix(SOURCE_PREFIX)} (EMA)"))
    val = series.get("val/loss", [])
    if val:
        lines.append(("#ff7f0e", val, "points"))
        legend.append(("#ff7f0e", "validation loss"))

    every = [p for _, points, _ in lines for p in points]
    x_low, x_high = min(s for s, _ in every), max(s for s, _ in every)
    x_high = x_high if x_high > x_low else x_low + 1
    y_low, y_high = min(v for _, v in every), max(v for _, v in every)
    logarithmic = y_low > 0 and y_high / y_low > 2
    if logarithmic:
        y_low, y_high = math.log10(y_low) - 0.02, math.log10(y_high) + 0.02
    else:
        pad = (y_high - y_low) * 0.05 or 0.5
        y_low, y_high = y_low - pad, y_high + pad
    left, right, top, bottom = 56, 12, 10, 36
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(step: float) -> float:
        return left + (step - x_low) / (x_high - x_low) * plot_w

    def y_of(value: float) -> float:
        v = math.log10(value) if logarithmic else value
        return top + (y_high - v) / (y_high - y_low) * plot_h

    parts = [
        f'<svg class="loss" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="training loss curve">',
        f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ccc"/>',
    ]
    y_ticks = _log_ticks(10**y_low, 10**y_high) if logarithmic else _nice_ticks(y_low, y_high)
    if logarithmic and len(y_ticks) < 2:
        y_ticks = [10**v for v in _nice_ticks(y_low, y_high, 3)]
    for tick in y_ticks:
        y = y_of(tick)
        parts.append(
            f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
            f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end">{_label(tick)}</text>'
        )
    for tick in _nice_ticks(x_low, x_high):
        x = x_of(tick)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#eee"/>'
            f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{tick:g}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="{height - 4}" text-anchor="middle">optimizer step</text>'
        f'<text transform="translate(12 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
        f"loss{' (log scale)' if logarithmic else ''}</text>"
    )
    if mark_step is not None and x_low <= mark_step <= x_high:
        x = x_of(mark_step)
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#555" '
            f'stroke-dasharray="4 3"><title>evaluated: step {mark_step}</title></line>'
        )
    for colour, points, style in lines:
        stride = max(1, len(points) // 1500)  # a long run's polyline stays a few tens of KB
        shown = points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
        coordinates = " ".join(f"{x_of(s):.1f},{y_of(v):.1f}" for s, v in shown)
        stroke = {"raw": 1, "main": 2.2, "source": 1.6, "points": 1}[style]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke}" points="{coordinates}"/>')
        if style == "points":
            parts += [
                f'<circle cx="{x_of(step):.1f}" cy="{y_of(value):.1f}" r="3.5" fill="{colour}">'
                f"<title>step {step}: validation loss {value:.4f}</title></circle>"
                for step, value in points
            ]
    parts.append("</svg>")
    return "".join(parts), [(colour, html.escape(label)) for colour, label in legend]
