"""What ``evaluate.py`` does: samples -> answers -> scores -> files, for one checkpoint, or two to compare.

    python evaluate.py checkpoint=outputs/demo/final_model dataset=[sample] eval.split=all

1. Samples: the sources' indexes (``indexed_sources``) and, for ``eval.split=val``, ``split_positions`` with the
   training run's seed and
   val_ratio, so the held-out samples are exactly the ones training never saw; then ``eval.max_samples``.
2. Answers: the first turn of every sample, generated with :func:`granite_docling.evaluation.generate.generate`;
   under torchrun / accelerate launch each process takes every world_size-th sample and the main process
   gathers them. Or, with ``eval.predictions=FILE``, the answers of an earlier run, and no model at all.
3. Scores and files: :func:`granite_docling.evaluation.report.write_outputs` into the run folder; with
   ``compare_to`` the second evaluation goes to ``<run>/compare_to/`` and the deltas to ``comparison.*``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from granite_docling.config import ConfigError, ModelConfig
from granite_docling.data.index import cache_root
from granite_docling.data.indexed import indexed_sources
from granite_docling.data.sample import Sample
from granite_docling.data.sources import RecordError
from granite_docling.data.split import split_positions
from granite_docling.data.training_data import image_edges, summarise
from granite_docling.evaluation.config import EvalConfig, EvaluateConfig, is_predictions_file, training_split_settings
from granite_docling.evaluation.docling_eval_export import write_docling_eval_dataset
from granite_docling.evaluation.generate import first_turn_prompt, generate, prompt_text, reference_budgets
from granite_docling.evaluation.html_report import write_report_page
from granite_docling.evaluation.metrics import METRICS, OVERALL_KEY
from granite_docling.evaluation.records import (
    Outputs,
    Record,
    compare_metrics,
    read_predictions,
)
from granite_docling.evaluation.report import (
    comparison_report,
    metrics_table,
    plot_metrics,
    record_images,
    write_outputs,
)
from granite_docling.evaluation.server import generate_via_server

log = logging.getLogger(__name__)

COMPARE_DIR = "compare_to"
DOCLING_EVAL_DIR = "docling_eval"  # the page predictions as a docling-eval dataset (docling_eval_export.py)


@dataclass
class EvaluationResult:
    """What the main process hands back to evaluate.py to print."""

    outputs: Outputs
    compared: Outputs | None = None
    comparison_files: dict[str, Path] = field(default_factory=dict)
    comparison_text: str = ""

    def summary(self) -> str:
        lines = [metrics_table(self.outputs.metrics)]
        if self.compared is not None:
            lines.append(self.comparison_text)
        for label, outputs in (("evaluation", self.outputs), ("compare_to", self.compared)):
            if outputs is not None:
                lines.append(f"{label} outputs in {outputs.folder}:")
                lines += [f"  {name:<12} {path}" for name, path in outputs.files.items()]
        if self.comparison_files:
            lines.append("comparison:")
            lines += [f"  {name:<12} {path}" for name, path in self.comparison_files.items()]
        if "page" in self.outputs.files:
            lines.append(f"report: {self.outputs.files['page']}")
        if self.compared is not None:  # the headline last, where a terminal leaves the eye
            lines += headline(self.outputs.metrics[OVERALL_KEY], self.compared.metrics[OVERALL_KEY])
        return "\n".join(lines)


def headline(after: dict, before: dict) -> list[str]:
    """``compare_to -> checkpoint`` lines for the headline metrics both sides have (overall means)."""
    lines = [f"before (compare_to) -> after (checkpoint), {after['n']} samples:"]
    for name, metric in METRICS.items():
        if metric.headline is None:
            continue
        label, number = metric.headline
        b = before.get(name, {}).get("mean")
        a = after.get(name, {}).get("mean")
        if a is not None and b is not None:
            verdict = "same" if a == b else "better" if (a < b) == metric.lower_is_better else "worse"
            change = f"{a - b:+.3f}" if "%" not in number else f"{100 * (a - b):+.0f} points"
            lines.append(f"  {label:<19} {number.format(b):>6} -> {number.format(a):<6} ({change}, {verdict})")
    return lines


def evaluation_samples(cfg: EvaluateConfig) -> dict[str, list[Sample]]:
    """The samples to evaluate, per dataset display name (see the module docstring)."""
    e = cfg.eval
    val_ratio, seed = training_split_settings(cfg.checkpoint or cfg.compare_to, e, cfg.trust_checkpoint)
    from transformers import AutoProcessor

    from granite_docling.model import ASSETS_DIR

    processor = AutoProcessor.from_pretrained(ASSETS_DIR)  # the records and their order; lengths are not used
    chosen = {}
    for source, index in indexed_sources(cfg.dataset, processor, cache_root(None)):
        name = source.name
        if index.problems:
            log.warning("%s: %s", name, summarise(index.problems))
        positions = range(len(index))
        if e.split == "val":
            _, positions = split_positions(len(index), val_ratio, seed, name)
            if not len(positions):
                raise ConfigError(
                    f"dataset {name}: training held out no validation samples (val_ratio={val_ratio}, seed={seed}); "
                    "use eval.split=all, or set eval.val_ratio / eval.seed to the training run's values"
                )
        chosen[name] = []
        for position in positions:
            if e.max_samples and len(chosen[name]) == e.max_samples:
                break
            try:
                chosen[name].append(source.read(index.locator(int(position))))
            except RecordError as error:  # changed since it was indexed
                log.warning("%s: record %s skipped: %s", name, index.locator(int(position)), error)
        log.info(
            "%s: %d sample(s) to evaluate (split=%s, val_ratio=%s, seed=%d)",
            name,
            len(chosen[name]),
            e.split,
            val_ratio,
            seed,
        )
    return chosen


def check_model(target: str, weights: bool = True) -> None:
    """Raise :class:`~granite_docling.checkpoint_manifest.CheckpointError` when ``target`` cannot be loaded (no such
    folder or hub id, another architecture, a folder that asks to run its code) or, with ``weights``, when it is a
    model folder of ours whose files differ from its manifest."""
    from granite_docling.model import check_weights, load_model_config

    model_config = ModelConfig(name=Path(target).name, checkpoint=target)
    load_model_config(model_config)
    if weights:
        check_weights(model_config)


def generate_records(
    checkpoint: str, samples: dict[str, list[Sample]], edges: dict[str, int | None], e: EvalConfig, accelerator
) -> list[Record]:
    """Load ``checkpoint``, answer every sample's first turn (this process's share) and gather the records.

    Returns the records on the main process, [] elsewhere.
    """
    from accelerate.utils import gather_object

    from granite_docling.model import load_model_and_processor, load_model_config, load_processor

    rank = accelerator.process_index
    world = accelerator.num_processes
    model_config = ModelConfig(name=Path(checkpoint).name, checkpoint=checkpoint, dtype=e.dtype)
    if e.engine == "server":  # the server holds the model; the processor gives the prompts and the budgets
        model = None
        processor = load_processor(model_config, load_model_config(model_config))
        log.info("answers from the server at %s (%d requests at a time)", e.server_url, e.server_concurrency)
    else:
        model, processor = load_model_and_processor(model_config)
        model.to(accelerator.device)
    records = []
    for name, group in samples.items():
        prompts = [first_turn_prompt(sample) for sample in group]
        references = [sample.turns[0].assistant for sample in group]
        budgets = reference_budgets(processor, references, e.max_new_tokens, e.reference_length_factor)
        mine = list(range(rank, len(prompts), world))
        desc = f"{Path(checkpoint).name}: {name}"
        progress = accelerator.is_main_process
        if model is None:
            answers = generate_via_server(
                e.server_url,
                [prompts[i] for i in mine],
                [budgets[i] for i in mine],
                e.server_concurrency,
                edges.get(name),
                progress=progress,
                desc=desc,
            )
        else:
            answers = generate(
                model,
                processor,
                [prompts[i] for i in mine],
                [budgets[i] for i in mine],
                e.batch_size,
                image_longest_edge=edges.get(name),
                progress=progress,
                desc=desc,
                stop_loops=e.stop_loops,
            )
        pairs = list(zip(mine, answers, strict=True))
        if world > 1:
            pairs = gather_object(pairs)
        for index, answer in sorted(pairs, key=lambda pair: pair[0]):
            sample = group[index]
            if answer.error is not None:
                log.warning("%s/%s skipped: %s", name, sample.id, answer.error)
                continue
            records.append(
                Record(
                    id=sample.id,
                    dataset=name,
                    source=sample.source,
                    prompt=prompt_text(processor, sample.turns[0].user, len(sample.images)),
                    prediction=answer.text,
                    reference=references[index],
                    stopped=answer.stopped,
                    images=[str(ref) if isinstance(ref, Path) else "" for ref in sample.images],
                    new_tokens=answer.new_tokens,
                    max_new_tokens=budgets[index],
                    loop_stopped=answer.loop,
                )
            )
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return records if accelerator.is_main_process else []


def evaluate(cfg: EvaluateConfig, run_dir: str | Path) -> EvaluationResult | None:
    """Run the evaluation ``cfg`` describes into ``run_dir``; the result on the main process, None elsewhere."""
    run_dir = Path(run_dir)
    e = cfg.eval
    sides = [(e.predictions or cfg.checkpoint, run_dir)]
    if cfg.compare_to is not None:
        sides.append((cfg.compare_to, run_dir / COMPARE_DIR))
    needs_model = any(not is_predictions_file(target) for target, _ in sides)

    accelerator = None
    samples = {}
    edges = {}
    image_refs = {}
    if needs_model:
        from accelerate import Accelerator

        for target, _ in sides:
            if not is_predictions_file(target):
                check_model(target, e.engine != "server")  # fails now, not after every sample is read

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        samples = evaluation_samples(cfg)
        edges = image_edges(cfg.dataset)
        image_refs = {(s.dataset, s.id): s.images for group in samples.values() for s in group}
    is_main = accelerator is None or accelerator.is_main_process

    results = []
    for target, folder in sides:
        if is_predictions_file(target):
            roots = [source.path for source in cfg.dataset.values()]  # where its images may be read from
            records = read_predictions(Path(target), image_roots=roots) if is_main else []
            log.info("scoring %d saved predictions from %s", len(records), target)
        else:
            records = generate_records(target, samples, edges, e, accelerator)
        if is_main:
            results.append(score_side(target, folder, records, e, image_refs))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not is_main:
        return None

    result = EvaluationResult(outputs=results[0])
    if len(results) == 2:
        result.compared = results[1]
        result.comparison_text, result.comparison_files = write_comparison(results[0], results[1], run_dir)
    for outputs in results:  # report.html once per folder, the main one with the compare_to side as before
        outputs.files["page"] = write_report_page(outputs, result.compared if outputs is results[0] else None)
    return result


def score_side(target: str, folder: Path, records: list[Record], e: EvalConfig, image_refs: dict) -> Outputs:
    """Score one side's records and write its files into ``folder`` (and its docling-eval dataset, if asked)."""
    log.info("scoring %d answers of %s", len(records), target)
    outputs = write_outputs(
        folder,
        records,
        title=str(target),
        num_examples=e.num_examples,
        page_exports=e.page_exports,
        image_refs=image_refs,
        checkpoint=str(target),
    )
    if e.docling_eval_export:
        images = functools.partial(record_images, image_refs=image_refs)
        exported = write_docling_eval_dataset(folder / DOCLING_EVAL_DIR, records, images, e.docling_eval_strip_loops)
        if exported is not None:
            outputs.files["docling_eval"] = exported
            log.info("docling-eval dataset of the page predictions: %s", exported)
    return outputs


def write_comparison(after: Outputs, before: Outputs, run_dir: Path) -> tuple[str, dict[str, Path]]:
    """comparison.json / .md / .png in ``run_dir``: the deltas of ``after`` (the checkpoint) over ``before``
    (compare_to). Returns (the comparison's text, its files)."""
    if after.samples != before.samples:
        log.warning(
            "the two evaluations cover different samples (%d in common of %d and %d): the deltas mix "
            "model and data differences",
            len(after.samples & before.samples),
            len(after.samples),
            len(before.samples),
        )
    comparison = compare_metrics(after.metrics, before.metrics)
    text = comparison_report(comparison, after_name=after.title, before_name=before.title)
    files = {
        "json": run_dir / "comparison.json",
        "report": run_dir / "comparison.md",
        "plot": run_dir / "comparison.png",
    }
    files["json"].write_text(json.dumps(comparison, indent=2) + "\n")
    files["report"].write_text(text)
    plot_metrics(
        {f"before: {Path(before.title).name}": before.metrics, f"after: {Path(after.title).name}": after.metrics},
        files["plot"],
    )
    return text, files
