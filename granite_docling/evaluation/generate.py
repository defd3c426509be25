"""Batched greedy generation with the model card's inference recipe, and a quick generation-based score.

The prompt is exactly what the model card (and training, :mod:`granite_docling.data.encoding`) renders: the
user turn holds the images, then the question, and ``apply_chat_template(..., add_generation_prompt=True)``
opens the assistant turn. Prompts are LEFT-padded, so every row of a batch ends at the same position and the
new tokens start together; greedy decoding stops at ``<|end_of_text|>``. Answers are decoded with special tokens
kept (DocTags tags such as ``<doctag>`` and ``<otsl>`` are special tokens) and cut at the first eos::

    prompts = [Prompt(images=[page], question=PAGE_PROMPT)]
    [answer] = generate(model, processor, prompts, max_new_tokens=4096)
    answer.text, answer.stopped          # DocTags, and whether it ended with eos before the budget

With ``stop_loops=True`` an answer that loops stops early: every :data:`LOOP_CHECK_EVERY` new tokens each row's
answer so far is decoded and read with docling's two loop rules (:func:`granite_docling.evaluation.loops.loops`), and
a row they fire on finishes there (``answer.loop`` names the rule; ``stopped`` stays False: no eos).

Multi-turn samples are evaluated on their first turn (the page conversion in DoclingMatix): the later
questions would need the reference answers of the earlier turns as context, thousands of tokens per page.

For the training loop, :func:`evaluate_generation` generates for a few samples and returns the means of the
main metrics as ``gen/<metric>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from granite_docling.data.encoding import build_messages
from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.sample import ImageRef, Sample, Turn
from granite_docling.evaluation.loops import loops
from granite_docling.evaluation.metrics import METRICS, score_sample, summarize

log = logging.getLogger(__name__)

LOOP_CHECK_EVERY = 32
"""New tokens between two loop checks of ``stop_loops`` (docling's ``DocTagsRepetitionStopper(N=32)``; its
transformers engine checks at every token): a looping answer runs at most 31 tokens past the point docling stops."""


@dataclass
class Prompt:
    """One generation request: the images of the user turn (decoded or not) and the question after them."""

    images: Sequence[Image.Image | ImageRef]
    question: str


@dataclass
class Generation:
    """One answer: the text up to (not including) eos, with special tokens kept."""

    text: str
    stopped: bool  # ended with eos before max_new_tokens
    new_tokens: int  # tokens generated, eos included
    error: str | None = field(default=None)  # why there is no answer (an image that could not be read)
    loop: str | None = None  # the loop rule that stopped it early (stop_loops; loops.RULES), else None


def prompt_text(processor, question: str, num_images: int) -> str:
    """The chat-template prompt for one user turn: ``num_images`` images, then ``question``, then the open
    assistant turn (``<|start_of_role|>assistant<|end_of_role|>``)."""
    [user_turn, _assistant] = build_messages([Turn(user=question, assistant="")], num_images)
    return processor.apply_chat_template([user_turn], add_generation_prompt=True)


def first_turn_prompt(sample: Sample) -> Prompt:
    """The prompt of a sample's first turn: all its images, then the first question."""
    return Prompt(images=list(sample.images), question=sample.turns[0].user)


def cut_at_eos(token_ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """(the tokens before the first eos, whether there was one). Everything after eos is padding (pad == eos)."""
    ids = list(token_ids)
    if eos_id in ids:
        return ids[: ids.index(eos_id)], True
    return ids, False


def generate(
    model: torch.nn.Module,
    processor,
    prompts: Sequence[Prompt],
    max_new_tokens: int | Sequence[int],
    batch_size: int = 4,
    image_longest_edge: int | None = None,
    progress: bool = True,
    desc: str = "generating",
    stop_loops: bool = False,
) -> list[Generation]:
    """Greedy answers for ``prompts``, in order, ``batch_size`` at a time (left-padded).

    ``max_new_tokens`` is one budget for all, or one per prompt: then prompts are batched by budget (largest
    first) and each answer is cut at its own budget, so an answer never depends on which prompts shared its
    batch. Images given as paths or bytes are decoded batch by batch; a prompt whose image cannot be read gets
    a :class:`Generation` with ``error`` set instead of failing the run. ``image_longest_edge`` overrides the
    processor's resize target, as ``dataset.<name>.image_longest_edge`` does in training. ``stop_loops`` stops an
    answer that loops (see the module docstring).

    9 parameters: the model, its processor and the prompts, then the generator's knobs (budget, batch size, resize
    target, progress bar and its label, loop stopping), each with a default but the budget.
    """
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or min(budgets, default=1) < 1:
        raise ValueError("max_new_tokens must be a positive int or one positive int per prompt")
    order = sorted(range(len(prompts)), key=lambda i: -budgets[i])  # stable: equal budgets keep their order
    tokenizer = processor.tokenizer
    results: list[Generation | None] = [None] * len(prompts)
    was_training = model.training
    padding_side = tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(order), batch_size):
            batch = []
            for index in order[start : start + batch_size]:
                try:
                    batch.append((index, [load_image(image) for image in prompts[index].images]))
                except ImageError as error:
                    results[index] = Generation(text="", stopped=False, new_tokens=0, error=str(error))
            if batch:
                items = [(prompts[i].question, images, budgets[i]) for i, images in batch]
                answers = _generate_batch(model, processor, items, image_longest_edge, stop_loops)
                for (index, _), answer in zip(batch, answers, strict=True):
                    results[index] = answer
            bar.update(len(order[start : start + batch_size]))
    finally:
        bar.close()
        tokenizer.padding_side = padding_side
        model.train(was_training)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


class LoopStopper(StoppingCriteria):
    """Finishes each row whose answer so far loops (:func:`~granite_docling.evaluation.loops.loops`), checked every
    ``every`` new tokens; ``stopped`` maps a row to (its new tokens then, the rule). Rows that already ended with
    eos are not read. docling's ``HFStoppingCriteriaWrapper`` does the same with one stopper per rule."""

    def __init__(self, tokenizer, prompt_length: int, eos_id: int, every: int = LOOP_CHECK_EVERY):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.eos_id = eos_id
        self.every = every
        self.stopped: dict[int, tuple[int, str]] = {}

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)  # (B,)
        new = input_ids.shape[1] - self.prompt_length
        if new % self.every:
            return done
        answers = input_ids[:, self.prompt_length :]  # (B, new)
        ended = (answers == self.eos_id).any(dim=1).tolist()
        for row, ids in enumerate(answers.tolist()):
            if row in self.stopped or ended[row]:
                continue
            rule = loops(self.tokenizer.decode(ids, skip_special_tokens=False))
            if rule is not None:
                self.stopped[row] = (new, rule)
                done[row] = True
        return done


def _generate_batch(model, processor, items, image_longest_edge: int | None, stop_loops: bool) -> list[Generation]:
    """One left-padded generate call for [(question, images, budget)]; each answer is cut at its own budget (and,
    with ``stop_loops``, where it loops)."""
    parameter = next(model.parameters())
    eos_id = processor.tokenizer.eos_token_id
    texts = [prompt_text(processor, question, len(images)) for question, images, _ in items]
    images = [images for _, images, _ in items]
    kwargs = {"size": {"longest_edge": image_longest_edge}} if image_longest_edge else {}
    has_images = any(images)
    if has_images and not all(images):
        raise ValueError("a batch mixes prompts with and without images; generate them in separate calls")
    inputs = processor(text=texts, images=images if has_images else None, padding=True, return_tensors="pt", **kwargs)
    inputs = {k: v.to(parameter.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(parameter.dtype)
    stopper = LoopStopper(processor.tokenizer, inputs["input_ids"].shape[1], eos_id) if stop_loops else None
    with torch.inference_mode():
        # generation_config.json of granite-docling sets use_cache=false (a training setting): pass it explicitly.
        output = model.generate(
            **inputs,
            max_new_tokens=max(budget for _, _, budget in items),
            do_sample=False,
            num_beams=1,
            use_cache=True,
            eos_token_id=eos_id,
            pad_token_id=eos_id,
            stopping_criteria=StoppingCriteriaList([stopper] if stopper else []),
        )
    new_tokens = output[:, inputs["input_ids"].shape[1] :].tolist()  # (B, new)
    answers = []
    for index, (row, (_, _, budget)) in enumerate(zip(new_tokens, items, strict=True)):
        length, rule = stopper.stopped.get(index, (budget + 1, None)) if stopper else (budget + 1, None)
        if length <= budget:  # finished by the loop check; the padding after it is eos, which is no stop
            kept = row[:length]
            text = processor.tokenizer.decode(kept, skip_special_tokens=False)
            answers.append(Generation(text=text, stopped=False, new_tokens=length, loop=rule))
            continue
        kept, stopped = cut_at_eos(row[:budget], eos_id)
        text = processor.tokenizer.decode(kept, skip_special_tokens=False)
        answers.append(Generation(text=text, stopped=stopped, new_tokens=len(kept) + int(stopped)))
    return answers


def answer_budget(reference_tokens: int, max_new_tokens: int, factor: float | None) -> int:
    """Tokens a sample may generate: ``factor`` x its reference's length + 32, at most ``max_new_tokens``.

    A right answer is never near the cap; a looping one is cut there instead of at max_new_tokens, which on
    a model that never stops is most of an evaluation's time. ``factor=None``: always max_new_tokens.
    """
    if factor is None:
        return max_new_tokens
    return max(1, min(max_new_tokens, math.ceil(factor * reference_tokens) + 32))


def reference_budgets(processor, references: Sequence[str], max_new_tokens: int, factor: float | None) -> list[int]:
    """:func:`answer_budget` of each reference answer (its tokens plus the closing eos)."""
    tokenizer = processor.tokenizer
    return [
        answer_budget(len(tokenizer.encode(r, add_special_tokens=False)) + 1, max_new_tokens, factor)
        for r in references
    ]


def load_image(image: Image.Image | ImageRef) -> Image.Image:
    """A prompt image, decoded where it is a path or encoded bytes; raises ImageError."""
    return image if isinstance(image, Image.Image) else decode_image(image)


def evaluate_generation(
    model: torch.nn.Module,
    processor,
    samples: Sequence[Sample],
    max_new_tokens: int,
    batch_size: int,
    image_longest_edge: Mapping[str, int | None] | None = None,
    reference_length_factor: float | None = 2.0,
) -> dict[str, float]:
    """Generate the first-turn answer of each sample and score it: ``{"gen/<metric>": mean, "gen/n": count}`` for
    the metrics of METRICS marked ``logged_in_training``.

    For the training loop, on a few validation samples: call it on the unwrapped model (not the DDP wrapper),
    on one process or on each process's own share. Metrics that apply to none of the samples (``teds`` without
    tables) are left out. ``image_longest_edge`` maps dataset names to their resize target, as in training;
    ``reference_length_factor`` caps each answer as ``eval.reference_length_factor`` does (see
    :func:`answer_budget`). The model's train/eval mode is restored afterwards.

    7 parameters: the model, its processor and the samples, then the knobs of :func:`generate` that training
    sets from its config (budget, batch size, resize targets, the reference-length cap).
    """
    edges = image_longest_edge or {}
    scores = []
    for dataset in dict.fromkeys(sample.dataset for sample in samples):  # one generate call per resize target
        group = [sample for sample in samples if sample.dataset == dataset]
        references = [sample.turns[0].assistant for sample in group]
        budgets = reference_budgets(processor, references, max_new_tokens, reference_length_factor)
        answers = generate(
            model,
            processor,
            [first_turn_prompt(s) for s in group],
            budgets,
            batch_size,
            image_longest_edge=edges.get(dataset),
            progress=False,
        )
        for reference, answer in zip(references, answers, strict=True):
            if answer.error is not None:
                continue
            try:
                scores.append(score_sample(answer.text, reference, stopped=answer.stopped))
            except ValueError as error:  # docling-core cannot read the reference
                log.warning("not scored: %s", error)
    names = [name for name, metric in METRICS.items() if metric.logged_in_training]
    summary = summarize(scores, names)
    metrics = {f"gen/{name}": summary[name]["mean"] for name in names if summary[name]["mean"] is not None}
    return {**metrics, "gen/n": float(len(scores))}
