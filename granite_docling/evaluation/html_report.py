"""report.html: one evaluation on one page, light and self-contained (no script, no network; opens from disk).

    report.html      the headline metrics (before -> after when evaluate.py ran with compare_to), the metric
                     table per dataset and source, the answers that loop (loops.py), the training loss of the run
                     the checkpoint came from (drawn by loss_curve.py), and a few samples side by side: page image |
                     reference rendered | prediction rendered, followed by a word diff of the two; a looping
                     sample is marked
    report_files/    the page images it shows, as WebP thumbnails (~50 KB a page), loaded lazily

Answers are rendered by docling-core's HTML export: the files :func:`~granite_docling.evaluation.report.write_outputs`
left in ``pages/``, or an export written into ``report_files/`` where there are none, in lazy sandboxed iframes.
The diff compares what the text metrics score, the Markdown export of a page conversion (the raw text of other
answers), word by word with difflib: ``<del>`` marks reference words the prediction lacks, ``<ins>`` words it adds.

The page is passed around, and its answers come from datasets and predictions files anyone may write, so nothing
from them is inserted as markup: text is escaped, and a formula's MathML is rebuilt from latex2mathml's element
tree (whose own ``convert`` unescapes ``<`` inside ``\text{...}``) and kept to MathML's presentation elements and
attributes by nh3 (ammonia). The page's Content-Security-Policy allows no script at all, its one stylesheet by
hash, and images and frames from its own folder only.

The runner writes the page once for every evaluation folder, the main folder's with the compare_to side as
before (:func:`write_report_page` ``(after, before)``).
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import html
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nh3
from PIL import Image

from granite_docling.evaluation.doctags import is_page_answer
from granite_docling.evaluation.export import pages_to_document, split_pages
from granite_docling.evaluation.loss_curve import checkpoint_step, draw_loss_curve, ema, ema_weight, training_run_folder
from granite_docling.evaluation.metrics import METRICS, OVERALL_KEY, SOURCES_KEY
from granite_docling.evaluation.records import (
    Outputs,
    Record,
    compare_metrics,
    safe_name,
)
from granite_docling.tracking import read_metrics

PAGE = "report.html"
FILES_DIR = "report_files"
LOSS_CURVE = "loss_curve.svg"  # in FILES_DIR
SAMPLE_SCORES = ("edit_distance", "f1", "bleu", "teds", "map", "exact_match", "doctags_valid", "stopped_with_eos")
LINKED_FILES = (
    "report.md",
    "metrics.json",
    "scores.jsonl",
    "predictions.jsonl",
    "metrics.png",
    "comparison.md",
    "comparison.json",
    "comparison.png",
    "pages",
)
_WORD = re.compile(r"(<[^<>\s]+>|[^\s<]+|<)(\s*)")  # a DocTags tag or a word, and the whitespace after it
_LOC = re.compile(r"<loc_\d+>")
_FORMULA_ANSWER = re.compile(r"^\s*(?:<formula>)?(?:<loc_\d+>)*(.*?)</formula>\s*$", re.DOTALL)  # a formula crop answer

_STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:1.5em auto;max-width:1500px;padding:0 1em;color:#222}
h1{font-size:1.5em;margin:.2em 0}h2{font-size:1.2em;margin:1.4em 0 .5em;border-bottom:1px solid #ddd}
.meta{color:#555}.meta code{background:#f4f4f4;padding:0 .3em}a{color:#1f5fa8}
.cards{display:flex;gap:1em;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;
min-width:11em}.card .name{color:#555;font-size:.9em}.card .value{font-size:1.6em;font-weight:600}
table.metrics{border-collapse:collapse;font-variant-numeric:tabular-nums}
.metrics td,.metrics th{border:1px solid #ddd;padding:3px 8px;text-align:right}.metrics th{background:#f6f6f6}
.metrics td:first-child,.metrics th:first-child{text-align:left}
.better{color:#17702b}.worse{color:#b3261e}.delta{font-size:.85em}
img.loss{max-width:100%;height:auto}
.sample{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em}.sample h3{margin:0 0 .4em;
font-size:1em}.sample .scores{color:#555;font-weight:normal;font-size:.9em}
.cols{display:grid;grid-template-columns:repeat(3,minmax(0,1fr));gap:.8em}.cols h4{margin:0 0 .3em;
font-size:.9em;color:#555}.cols img{max-width:100%;height:auto;border:1px solid #eee}
iframe{width:100%;height:42em;border:1px solid #ddd;background:#fff}
pre{white-space:pre-wrap;word-break:break-word;font-size:12px;max-height:24em;overflow:auto;background:#fafafa;
border:1px solid #eee;padding:.5em;margin:.3em 0}del{background:#fdd;color:#8a1010}
ins{background:#d7f5dc;color:#0b5a1c;text-decoration:none}details{margin-top:.4em}summary{cursor:pointer}
.formula{font-size:1.3em;overflow-x:auto;padding:.3em 0}.loop{color:#b3261e;font-weight:600}"""

MATHML_TAGS = frozenset(
    "math mrow mi mn mo ms mtext mspace msub msup msubsup munder mover munderover mfrac msqrt mroot mstyle mpadded "
    "mphantom menclose mtable mtr mtd".split()
)
"""The MathML Core presentation elements latex2mathml writes; no ``semantics``/``annotation-xml`` (which can
hold HTML), no links."""
MATHML_ATTRIBUTES = frozenset(
    "display mathvariant mathsize mathcolor mathbackground displaystyle scriptlevel accent accentunder fence form "
    "largeop lspace rspace maxsize minsize movablelimits separator stretchy symmetric linethickness width height "
    "depth voffset notation columnalign columnlines columnspacing rowalign rowlines rowspacing frame columnspan "
    "rowspan".split()
)
"""Presentation attributes only: no ``href`` (latex2mathml's ``\\href``), ``style`` (``\\style``), ``on*`` or
``xlink:*``."""
_CHARACTER_REFERENCE = re.compile(r"&amp;(#x[0-9A-Fa-f]+;)")  # latex2mathml writes symbols as text "&#x003C1;"


def content_security_policy(*styles: str) -> str:
    """The page's policy: no script of any kind, only the given inline ``<style>`` blocks (by SHA-256), images
    and frames from the page's own folder, nothing else fetched."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in styles)
    return (
        f"default-src 'none'; script-src 'none'; style-src {hashes}; img-src 'self'; frame-src 'self'; "
        "base-uri 'none'; form-action 'none'"
    )


def write_report_page(after: Outputs, before: Outputs | None = None) -> Path:
    """Write ``after.folder/report.html``; ``before`` is the compare_to evaluation, shown as before -> after."""
    run = training_run_folder(after.checkpoint)
    parts = [
        _header(after, before),
        _headline(after.metrics, before.metrics if before else None),
        "<h2>Metrics</h2>",
        metrics_html(after.metrics, before.metrics if before else None),
        loops_html(after.records, after.scores),
    ]
    parts.append(_loss_section(after.folder, run, after.checkpoint))
    previous = {(r.dataset, r.id): (r, s) for r, s in zip(before.records, before.scores, strict=True)} if before else {}
    parts.append(f"<h2>Samples ({len(after.examples)} of {len(after.records)})</h2>")
    for index, images in after.examples.items():
        record = after.records[index]
        parts.append(
            sample_html(
                after.folder,
                record,
                after.scores[index],
                images,
                previous.get((record.dataset, record.id)),
                before.folder if before else None,
            )
        )
    parts.append(
        "<p class=meta>Differences: <del>reference words the prediction lacks</del> "
        "<ins>words the prediction adds</ins>; ↑ higher is better, ↓ lower is better.</p>"
    )
    title = html.escape(after.title)
    policy = content_security_policy(_STYLE)
    page = (
        f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{policy}"><title>Evaluation: {title}</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n"
    )
    path = after.folder / PAGE
    path.write_text(page, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def metric_groups(metrics: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The columns of the metric table: overall, each dataset (when there are several), and each source of a
    dataset that has several (``"dataset / source"``)."""
    datasets = [name for name in metrics if name != OVERALL_KEY]
    groups: dict[str, Mapping[str, Any]] = {OVERALL_KEY: metrics[OVERALL_KEY]}
    for name in datasets:
        if len(datasets) > 1:
            groups[name] = metrics[name]
        sources = metrics[name].get(SOURCES_KEY, {})
        if len(sources) > 1:
            groups |= {f"{name} / {source}": block for source, block in sources.items()}
    return groups


def _value(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _delta(delta: float | None, better: bool | None) -> str:
    if delta is None:
        return "–"
    mark = {True: "better", False: "worse", None: ""}[better]
    return f'<span class="delta {mark}">{delta:+.3f}</span>'


def _arrow(name: str) -> str:
    return METRICS[name].arrow


def metrics_html(after: Mapping[str, Any], before: Mapping[str, Any] | None = None) -> str:
    """The metric table (means): a column per group, or before | after | delta per group with ``before``."""
    groups = metric_groups(after)
    names = [n for n in METRICS if any(block.get(n, {}).get("mean") is not None for block in groups.values())]
    if before is None:
        head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(g)}</th>" for g in groups) + "</tr>"
        rows = ["<tr><td>samples</td>" + "".join(f"<td>{block['n']}</td>" for block in groups.values()) + "</tr>"]
        for name in names:
            cells = "".join(f"<td>{_value(block.get(name, {}).get('mean'))}</td>" for block in groups.values())
            rows.append(f"<tr><td>{name} {_arrow(name)}</td>{cells}</tr>")
    else:
        comparison = compare_metrics(groups, metric_groups(before))
        head = (
            "<tr><th rowspan=2>metric</th>"
            + "".join(f"<th colspan=3>{html.escape(g)}</th>" for g in comparison)
            + "</tr><tr>"
            + "<th>before</th><th>after</th><th>Δ</th>" * len(comparison)
            + "</tr>"
        )
        rows = [
            "<tr><td>samples</td>"
            + "".join(f"<td>{c['n']['before']}</td><td>{c['n']['after']}</td><td></td>" for c in comparison.values())
            + "</tr>"
        ]
        for name in names:
            cells = "".join(
                f"<td>{_value(c[name]['before'])}</td><td>{_value(c[name]['after'])}</td>"
                f"<td>{_delta(c[name]['delta'], c[name]['better'])}</td>"
                for c in comparison.values()
            )
            rows.append(f"<tr><td>{name} {_arrow(name)}</td>{cells}</tr>")
    return f"<table class=metrics id=metrics>{head}{''.join(rows)}</table>"


def _headline(after: Mapping[str, Any], before: Mapping[str, Any] | None) -> str:
    cards = []
    for name, metric in METRICS.items():
        value = after[OVERALL_KEY].get(name, {}).get("mean")
        if metric.headline is None or value is None:
            continue
        change = ""
        if before is not None:
            row = compare_metrics({"g": after[OVERALL_KEY]}, {"g": before[OVERALL_KEY]})["g"][name]
            change = f"<div>before {_value(row['before'])} &nbsp;{_delta(row['delta'], row['better'])}</div>"
        cards.append(
            f"<div class=card><div class=name>{name} {_arrow(name)}</div>"
            f"<div class=value>{value:.3f}</div>{change}</div>"
        )
    return f"<div class=cards>{''.join(cards)}</div>"


def loops_html(records: Sequence[Record], scores: Sequence[Mapping[str, Any] | None], limit: int = 100) -> str:
    """The answers that end in a loop (scores' ``loop_rule``): how many, and the first ``limit`` of them by name,
    rule and tokens."""
    looping = [(r, s["loop_rule"]) for r, s in zip(records, scores, strict=True) if s and s.get("loop_rule")]
    head = (
        f"<h2>Loops</h2><p class=meta>{len(looping)} of {len(records)} answer(s) end in a loop, by docling's rules "
        "(repeated_blocks: three or more same blocks at equal or evenly spaced boxes; repeated_tail: a unit of up "
        "to 64 characters repeated over at least 320)"
    )
    if not looping:
        return head + ".</p>"
    items = []
    for record, rule in looping[:limit]:
        tokens = "" if record.new_tokens is None else f"{record.new_tokens} tokens"
        tokens += "" if not tokens or record.max_new_tokens is None else f" of {record.max_new_tokens}"
        stop = "stopped early" if record.loop_stopped else "cut at max_new_tokens" if record.stopped is False else ""
        detail = "; ".join(part for part in (tokens, stop) if part)
        items.append(
            f"<li>{html.escape(record.dataset)} / {html.escape(record.id)}: <span class=loop>{html.escape(rule)}"
            f"</span>{f' ({html.escape(detail)})' if detail else ''}</li>"
        )
    more = f"<li>… and {len(looping) - limit} more (scores.jsonl: loop_rule)</li>" if len(looping) > limit else ""
    return f"{head}:</p><ul>{''.join(items)}{more}</ul>"


def _header(after: Outputs, before: Outputs | None) -> str:
    short = "/".join(Path(after.title).parts[-2:]) or after.title  # run/final_model, not final_model
    lines = [
        f"<h1>Evaluation: {html.escape(short)}</h1>",
        f"<p class=meta>evaluated <code>{html.escape(after.title)}</code> on {after.metrics[OVERALL_KEY]['n']} "
        "sample(s)",
    ]
    if before is not None:
        link = os.path.relpath(before.folder / PAGE, after.folder)
        lines.append(
            f"; before = <code>{html.escape(before.title)}</code> (<a href='{html.escape(link)}'>its report</a>)"
        )
    links = [f"<a href='{name}'>{name}</a>" for name in LINKED_FILES if (after.folder / name).exists()]
    lines.append(f".<br>Files: {' · '.join(links)}</p>")
    return "".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Loss curve


def _loss_section(folder: Path, run: Path | None, checkpoint: str | None) -> str:
    if run is None:
        return (
            "<h2>Training loss</h2><p class=meta>No training run found for this checkpoint (the curve shows "
            "for <code>&lt;run&gt;/final_model</code> and <code>&lt;run&gt;/checkpoints/checkpoint_*</code> "
            "next to the run's metrics.jsonl).</p>"
        )
    rows = read_metrics(run / "metrics.jsonl")
    (folder / FILES_DIR).mkdir(parents=True, exist_ok=True)
    curve = draw_loss_curve(rows, folder / FILES_DIR / LOSS_CURVE, checkpoint_step(checkpoint))
    if curve is None:
        return f"<h2>Training loss</h2><p class=meta>{html.escape(str(run))}/metrics.jsonl has no train/loss.</p>"
    train = [row["train/loss"] for row in rows if "train/loss" in row]
    val = [row["val/loss"] for row in rows if "val/loss" in row]
    summary = (
        f"{len(train)} steps; train loss {train[0]:.3f} at the first step, "
        f"{ema(train, ema_weight(len(train)))[-1]:.3f} at the end (EMA)"
    )
    if val:
        summary += f"; validation loss {val[-1]:.3f} at the end"
    return (
        f"<h2>Training loss</h2><p class=meta>From <code>{html.escape(str(run / 'metrics.jsonl'))}</code>: "
        f"{summary}.</p><img class=loss src='{FILES_DIR}/{LOSS_CURVE}' alt='training loss curve'>"
    )


# ---------------------------------------------------------------------------------------------------------------
# Samples


def write_thumbnails(folder: Path, stem: str, images: Sequence[Image.Image | None], max_side: int = 900) -> list:
    """Save the images as ``report_files/<stem>_<k>.webp`` (at most ``max_side`` px); [(relative path, w, h)]."""
    (folder / FILES_DIR).mkdir(parents=True, exist_ok=True)
    written = []
    for k, image in enumerate(images, start=1):
        if image is None:
            continue
        thumb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        thumb = thumb.copy()
        thumb.thumbnail((max_side, max_side))
        name = f"{FILES_DIR}/{stem}_{k}.webp"
        thumb.save(folder / name, quality=80)
        written.append((name, *thumb.size))
    return written


def word_diff(reference: str, prediction: str, limit: int = 2000) -> tuple[str, dict[str, int]]:
    """(HTML of ``prediction`` against ``reference`` with ``<del>`` / ``<ins>`` marks, word counts).

    Words and DocTags tags are the units; the whitespace after each is kept from the side shown. Counts:
    ``same`` (words in both), ``missing`` (reference words the prediction lacks), ``extra`` (words it adds).
    Only the first ``limit`` words of each side are compared (a looping answer stays cheap, the page light).
    """
    ref = _WORD.findall(reference)[:limit]
    pred = _WORD.findall(prediction)[:limit]
    matcher = difflib.SequenceMatcher(None, [w for w, _ in ref], [w for w, _ in pred], autojunk=False)
    out = []
    counts = {"same": 0, "missing": 0, "extra": 0}

    def text(words: Sequence[tuple[str, str]]) -> str:
        return html.escape("".join(word + space for word, space in words))

    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            out.append(text(pred[j1:j2]))
            counts["same"] += i2 - i1
            continue
        if i2 > i1:
            out.append(f"<del>{text(ref[i1:i2])}</del>")
            counts["missing"] += i2 - i1
        if j2 > j1:
            out.append(f"<ins>{text(pred[j1:j2])}</ins>")
            counts["extra"] += j2 - j1
    return "".join(out), counts


def diff_text(answer: str) -> tuple[str, bool]:
    """(what the diff compares, whether it is docling-core's Markdown): a page conversion's Markdown export, or
    the answer itself (other answers, and DocTags docling-core cannot read)."""
    if is_page_answer(answer):
        try:
            return pages_to_document(split_pages(answer)).export_to_markdown(), True
        except ValueError:
            pass
    return answer, False


def formula_mathml(answer: str) -> str | None:
    """MathML of a formula answer (``[<loc_..>x4]LATEX</formula>``, SynthFormulaNet's form), which browsers draw
    natively; None for other answers and LaTeX that latex2mathml (docling-core's converter) rejects.

    Safe to insert into a page whatever the answer holds: markup in the LaTeX stays text, and only the elements
    and attributes of :data:`MATHML_TAGS` and :data:`MATHML_ATTRIBUTES` are kept.
    """
    match = _FORMULA_ANSWER.match(answer)
    if match is None or not match.group(1).strip():
        return None
    from xml.etree.ElementTree import tostring

    from latex2mathml.converter import convert_to_element

    try:
        tree = convert_to_element(match.group(1), display="block")
    except Exception:  # latex2mathml raises assorted types on malformed LaTeX, which a prediction may well be
        return None
    return sanitize_mathml(_CHARACTER_REFERENCE.sub(r"&\1", tostring(tree, encoding="unicode")))


def sanitize_mathml(markup: str) -> str:
    """``markup`` cut down to the MathML elements and attributes of the allowlists (text kept, as text)."""
    return nh3.clean(markup, tags=set(MATHML_TAGS), attributes={"*": set(MATHML_ATTRIBUTES)})


def _rendered(folder: Path, record: Record, side: str) -> str:
    """docling-core's HTML of one answer: the pages/ export in a lazy iframe, the export inline, a formula's
    MathML, or the text."""
    answer = record.prediction if side == "prediction" else record.reference
    raw = f"<details><summary>DocTags</summary><pre>{html.escape(answer) or '(empty)'}</pre></details>"
    if not is_page_answer(answer):
        mathml = formula_mathml(answer)
        shown = f"<div class=formula>{mathml}</div>" if mathml else ""
        return f"{shown}<pre>{html.escape(answer) or '(empty)'}</pre>"
    exported = Path("pages") / safe_name(record.dataset) / safe_name(record.id) / side / f"{side}.html"
    if not (folder / exported).is_file():
        # Its own file rather than srcdoc: a srcdoc frame would inherit the page's policy, which blocks its style.
        try:
            rendered = pages_to_document(split_pages(answer)).export_to_html()
        except ValueError:
            return f"<pre>{html.escape(answer)}</pre>"
        exported = Path(FILES_DIR) / "pages" / safe_name(record.dataset) / safe_name(record.id) / f"{side}.html"
        (folder / exported).parent.mkdir(parents=True, exist_ok=True)
        (folder / exported).write_text(rendered, encoding="utf-8")
    return f"<iframe loading=lazy sandbox src='{html.escape(exported.as_posix())}'></iframe>{raw}"


def _scores_line(scores: Mapping[str, Any] | None, before: Mapping[str, Any] | None) -> str:
    if not scores:
        return "not scored"
    shown = []
    for key in SAMPLE_SCORES:
        if scores.get(key) is None:
            continue
        value = f"{scores[key]:.3f}"
        if before and before.get(key) is not None:
            value = f"{before[key]:.3f} → {value}"
        shown.append(f"{key} {value}")
    return ", ".join(shown)


def _diff_block(reference: str, prediction: str, label: str, open_: bool, limit: int = 2000) -> str:
    (ref_text, ref_md) = diff_text(reference)
    (pred_text, pred_md) = diff_text(prediction)
    what = "Markdown words" if ref_md and pred_md else "words"
    if ref_md != pred_md:  # compare like with like: the DocTags, without their <loc_> boxes, when one side fails
        ref_text = _LOC.sub("", reference)
        pred_text = _LOC.sub("", prediction)
        what = "DocTags words without <loc_> boxes" if is_page_answer(reference) else what
    marked, counts = word_diff(ref_text, pred_text, limit)
    if max(len(_WORD.findall(ref_text)), len(_WORD.findall(pred_text))) > limit:
        what += f" (the first {limit})"
    what = html.escape(what)
    return (
        f"<details{' open' if open_ else ''}><summary>{label}: {what}, {counts['same']} in both, "
        f"<del>{counts['missing']} missing</del>, <ins>{counts['extra']} added</ins></summary>"
        f"<pre class=diff>{marked or '(both empty)'}</pre></details>"
    )


def sample_html(
    folder: Path,
    record: Record,
    scores: Mapping[str, Any] | None,
    images: Sequence[tuple[str, int, int]],
    before: tuple[Record, Mapping[str, Any] | None] | None = None,
    before_folder: Path | None = None,
) -> str:
    """One sample: a header with its scores, image | reference | prediction, and the diff (and the before one)."""
    stop = {True: "stopped with eos", False: "cut at max_new_tokens", None: "eos unknown"}[record.stopped]
    if record.loop_stopped:
        stop = "stopped early: it loops"
    title = f"{html.escape(record.dataset)} / {html.escape(record.id)}"
    rule = (scores or {}).get("loop_rule")
    if rule:
        title += f" <span class=loop>loops ({html.escape(str(rule))})</span>"
    source = f"{html.escape(record.source)}; " if record.source else ""
    line = _scores_line(scores, before[1] if before else None)
    shown = (
        "".join(
            f"<img loading=lazy src='{html.escape(path)}' width={w} height={h} alt='page {k}'>"
            for k, (path, w, h) in enumerate(images, start=1)
        )
        or "<p class=meta>(no image)</p>"
    )
    parts = [
        f"<div class=sample><h3>{title} <span class=scores>({source}{stop}; {line})</span></h3>",
        f"<div class=cols><div><h4>page image</h4>{shown}</div>",
        f"<div><h4>reference</h4>{_rendered(folder, record, 'reference')}</div>",
        f"<div><h4>prediction</h4>{_rendered(folder, record, 'prediction')}</div></div>",
        _diff_block(record.reference, record.prediction, "Reference → prediction", open_=True),
    ]
    if before is not None:
        label = "Reference → before (compare_to)"
        if before_folder is not None:
            exported = Path("pages") / safe_name(record.dataset) / safe_name(record.id) / "prediction"
            if (before_folder / exported / "prediction.html").is_file():
                href = os.path.relpath(before_folder / exported / "prediction.html", folder)
                label += f" <a href='{html.escape(href)}'>rendered</a>"
        parts.append(_diff_block(record.reference, before[0].prediction, label, open_=False, limit=500))
    parts.append("</div>")
    return "".join(parts)
