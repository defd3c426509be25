"""Generation: the model card's prompt, left-padded batches equal to one-at-a-time, eos handling, the loop hook."""

from __future__ import annotations

import pytest
from eval_helpers import tiny_model_and_processor
from PIL import Image

from granite_docling.data.answers import PAGE_PROMPT
from granite_docling.data.encoding import build_messages
from granite_docling.data.sample import Sample, Turn
from granite_docling.evaluation.generate import (
    Prompt,
    answer_budget,
    cut_at_eos,
    evaluate_generation,
    generate,
    prompt_text,
)
from granite_docling.evaluation.metrics import METRICS

MODEL_CARD_PROMPT = (
    "<|start_of_role|>user<|end_of_role|><image>Convert this page to docling.<|end_of_text|>\n"
    "<|start_of_role|>assistant<|end_of_role|>"
)


@pytest.fixture(scope="module")
def noisy():
    return tiny_model_and_processor(noise_std=0.5)


def test_the_prompt_is_the_model_cards(tiny_processor):
    assert prompt_text(tiny_processor, PAGE_PROMPT, 1) == MODEL_CARD_PROMPT


def test_the_prompt_is_how_training_renders_the_same_turn(tiny_processor):
    turns = [Turn("<formula>", "x ^ { 2 }"), Turn("And the next?", "y")]
    training_text = tiny_processor.apply_chat_template(build_messages(turns, 2))
    prompt = prompt_text(tiny_processor, "<formula>", 2)
    assert training_text.startswith(prompt)
    assert training_text[len(prompt) :].startswith("x ^ { 2 }<|end_of_text|>")


def test_cut_at_eos_keeps_what_comes_before_the_first_eos():
    assert cut_at_eos([5, 6, 0, 7, 0], eos_id=0) == ([5, 6], True)
    assert cut_at_eos([5, 6, 7], eos_id=0) == ([5, 6, 7], False)
    assert cut_at_eos([0, 0, 0], eos_id=0) == ([], True)


def _prompts():
    # Different question lengths and image counts / shapes: the batch needs padding in text and in tiles.
    return [
        Prompt([Image.new("RGB", (600, 800), "red")], PAGE_PROMPT),
        Prompt([Image.new("RGB", (300, 100), "blue"), Image.new("RGB", (90, 90), "green")], "<formula>"),
        Prompt([Image.new("RGB", (50, 400), "yellow")], "What is the title of this rather long document, please?"),
    ]


def test_left_padded_batches_answer_exactly_as_one_prompt_at_a_time(noisy):
    model, processor = noisy
    budgets = [8, 3, 5]  # one batch generates 8 tokens for all; each answer must still end at its own budget
    pairs = zip(_prompts(), budgets, strict=True)
    alone = [generate(model, processor, [p], max_new_tokens=n, progress=False)[0] for p, n in pairs]
    batched = generate(model, processor, _prompts(), max_new_tokens=budgets, batch_size=3, progress=False)
    assert len({a.text for a in alone}) == 3, "the answers must differ, or padding bugs could hide"
    assert batched == alone
    assert [a.new_tokens for a in alone] == budgets and not any(a.stopped for a in alone)


def test_answer_budgets_follow_the_reference_length():
    assert answer_budget(100, max_new_tokens=4096, factor=2.0) == 232
    assert answer_budget(5000, max_new_tokens=4096, factor=2.0) == 4096
    assert answer_budget(100, max_new_tokens=4096, factor=None) == 4096


def test_generate_restores_padding_side_and_train_mode(noisy):
    model, processor = noisy
    processor.tokenizer.padding_side = "right"
    model.train()
    try:
        generate(model, processor, _prompts()[:1], max_new_tokens=2, progress=False)
        assert processor.tokenizer.padding_side == "right"
        assert model.training
    finally:
        processor.tokenizer.padding_side = "left"
        model.eval()


def test_an_unreadable_image_gives_an_error_entry_not_a_crash(noisy, tmp_path):
    model, processor = noisy
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    answers = generate(model, processor, [Prompt([broken], PAGE_PROMPT), *_prompts()[:1]], max_new_tokens=3,
                       batch_size=2, progress=False)  # fmt: skip
    assert answers[0].error is not None and "unreadable_image" in answers[0].error
    assert answers[1].error is None and answers[1].text


def test_evaluate_generation_reports_gen_means_for_the_training_loop(noisy):
    model, processor = noisy
    page = (Turn(PAGE_PROMPT, "<doctag><text>hi</text></doctag>"),)
    samples = [
        Sample("a", "pages", (Image.new("RGB", (60, 80), "red"),), page),
        Sample("b", "formulas", (Image.new("RGB", (90, 30), "blue"),), (Turn("<formula>", "x ^ { 2 }"),)),
    ]
    model.train()
    metrics = evaluate_generation(model, processor, samples, max_new_tokens=6, batch_size=2)
    assert model.training, "the model's mode is restored"
    assert metrics["gen/n"] == 2.0
    assert set(metrics) <= {f"gen/{name}" for name, metric in METRICS.items() if metric.logged_in_training} | {"gen/n"}
    assert {"gen/edit_distance", "gen/f1", "gen/exact_match", "gen/doctags_valid"} <= set(metrics)
    assert all(0.0 <= value <= 1.0 for key, value in metrics.items() if key != "gen/n")
    assert metrics["gen/stopped_with_eos"] == 0.0  # 6 tokens of a random model: cut by the budget
    model.eval()
