"""Loops (loops.py): docling's two rules on literal answers, looping and legitimate; the stopping criterion of
``stop_loops`` on a crafted looping model (tokens counted); a replayed looping prediction caught in metrics.json,
scores.jsonl, the terminal summary and report.html; the docling-eval export keeping the answer as generated."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import REPO
from eval_helpers import tiny_model_and_processor, write_eval_data
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from granite_docling.config import ConfigError
from granite_docling.data.answers import PAGE_PROMPT
from granite_docling.evaluation.config import EvalConfig, EvaluateConfig, register_eval_configs, validate_eval
from granite_docling.evaluation.docling_eval_export import prediction_row
from granite_docling.evaluation.generate import LoopStopper, Prompt, generate
from granite_docling.evaluation.loops import loops, strip_repeated_tail, without_loop
from granite_docling.evaluation.records import Record, read_predictions, write_predictions

register_eval_configs()


def compose_eval(*overrides: str) -> EvaluateConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="evaluate", overrides=list(overrides)))


def block(tag: str, box: tuple[int, int, int, int], text: str) -> str:
    return f"<{tag}>" + "".join(f"<loc_{v}>" for v in box) + f"{text}</{tag}>"


TITLE = block("section_header_level_1", (40, 20, 460, 35), "Results")
SAME_BOX = "<doctag>" + TITLE + block("text", (40, 50, 460, 70), "We measured it.") * 5
DOWN_THE_PAGE = (
    "<doctag>" + TITLE + "".join(block("text", (40, 50 + 25 * k, 460, 70 + 25 * k), "Total") for k in range(4))
)
ACROSS = "<doctag>" + "".join(block("picture", (30 + 110 * k, 300, 130 + 110 * k, 380), "") for k in range(3))
DISTINCT_ITEMS = "<doctag><unordered_list>" + "".join(
    block("list_item", (40, 50 + 25 * k, 460, 70 + 25 * k), f"• item {k}") for k in range(8)
)
IRREGULAR = "<doctag>" + "".join(block("text", (40, y, 460, y + 15), "Total") for y in (50, 75, 140, 150))
TWO_ONLY = "<doctag>" + TITLE + block("text", (40, 50, 460, 70), "Same") * 2
EQUAL_CELLS = "<doctag><otsl><loc_40><loc_50><loc_460><loc_300>" + "<fcel>0<fcel>0<fcel>0<nl>" * 12
QUADS = "x = 1" + " \\quad" * 16


@pytest.mark.parametrize(
    "answer, rule",
    [
        (SAME_BOX, "repeated_blocks"),  # one block over and over: the most reported granite-docling loop
        (DOWN_THE_PAGE, "repeated_blocks"),  # the same text moving down the page by 25 each time
        (ACROSS, "repeated_blocks"),  # and across it (same text: empty)
        (SAME_BOX + block("text", (40, 50, 460, 70), "We mea"), "repeated_blocks"),  # cut mid-block
        ("\\frac{a}{b} " + "\\quad " * 60, "repeated_tail"),  # 360 characters of one 6-character unit
        ("x = " + "\\\\ " * 120 + "\\", "repeated_tail"),  # ends mid-unit
        ("<doctag><otsl>" + "<fcel>0<nl>" * 30, "repeated_tail"),  # a table running on, row after row
        (DISTINCT_ITEMS, None),  # regular positions, different text
        (IRREGULAR, None),  # same text, irregular steps (65 vs 25: over docling's 20%)
        (TWO_ONLY, None),  # a run needs three
        (EQUAL_CELLS, None),  # 12 rows of equal cells, 300 characters: a 25-character unit needs 400
        (QUADS, None),  # 16 \quad, but 96 characters: under 320
        ("x" + "0123456789" * 3 + "abcdefghij" * 60, "repeated_tail"),  # unit 10 over 600 characters
        ("y" + ("a" * 65 + "b") * 20, None),  # a 66-character unit: longer than docling's 64
        (SAME_BOX + "</doctag>", None),  # closed: the <doctag> block holds it all (docling's expression)
        ("", None),
    ],
)
def test_docling_rules_on_literal_answers(answer, rule):
    assert loops(answer) == rule


def test_without_loop_keeps_what_came_before_the_loop():
    assert without_loop(SAME_BOX) == "<doctag>" + TITLE + block("text", (40, 50, 460, 70), "We measured it.")
    assert without_loop(DOWN_THE_PAGE) == "<doctag>" + TITLE + block("text", (40, 50, 460, 70), "Total")
    assert without_loop("a + b = c \\quad " + "\\quad " * 60) == "a + b = c"
    assert without_loop("x = " + "\\\\ " * 120 + "\\") == "x ="
    assert without_loop("a \\" + " \\quad" * 60) == "a"  # the lone backslash the cut leaves goes too
    assert without_loop(DISTINCT_ITEMS) == DISTINCT_ITEMS
    assert strip_repeated_tail("ab" + "xyz" * 10, 3) == "ab"


def test_the_stopping_criterion_flags_each_looping_row_once_at_its_check(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    eos = tokenizer.eos_token_id
    prompt = [7, 8, 9]

    def row(text: str, length: int, end: bool = False) -> list[int]:
        ids = (tokenizer.encode(text, add_special_tokens=False) * 50)[: length - int(end)]
        return prompt + ids + [eos] * int(end)

    stopper = LoopStopper(tokenizer, prompt_length=len(prompt), eos_id=eos, every=32)
    loop = block("text", (40, 50, 460, 70), "Same")
    batch = [row(loop, 64), row("<fcel>0<nl>", 64), row("plain words, one after another ", 64), row(loop, 64, True)]
    assert stopper(torch.tensor([r[:-1] for r in batch]), None).tolist() == [False] * 4  # 63 new: no check
    assert stopper(torch.tensor(batch), None).tolist() == [True, False, False, False]  # eos-ended row not read
    assert stopper.stopped == {0: (64, "repeated_blocks")}
    batch = [row(loop, 96), row("<fcel>0<nl>", 96), row("plain words, one after another ", 96), row(loop, 96, True)]
    assert stopper(torch.tensor(batch), None).tolist() == [False, True, False, False]  # 32 <fcel>0<nl>: 352 chars
    assert stopper.stopped == {0: (64, "repeated_blocks"), 1: (96, "repeated_tail")}


def looping_model(cycle: list[int]):
    """The tiny preset rewired so that greedy decoding answers the tokens ``cycle`` over and over, whatever it is
    shown: no attention or MLP output reaches the residual stream, so the last position holds the embedding of the
    last token alone; token ``cycle[i]`` is embedded as basis vector i and every other token as basis vector
    ``len(cycle)``, and an untied lm_head maps vector i to ``cycle[i + 1]`` and the other vector to ``cycle[0]``."""
    model, processor = tiny_model_and_processor()
    text = model.model.text_model
    hidden = text.config.hidden_size
    assert len(cycle) < hidden and len(set(cycle)) == len(cycle)
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding = torch.zeros_like(text.embed_tokens.weight)  # (V, H)
        embedding[:, len(cycle)] = 1.0
        head = torch.zeros_like(embedding)
        for i, token in enumerate(cycle):
            embedding[token] = 0.0
            embedding[token, i] = 1.0
            head[cycle[(i + 1) % len(cycle)], i] = 10.0
        head[cycle[0], len(cycle)] = 10.0
        text.embed_tokens.weight.copy_(embedding)
        model.lm_head.weight = torch.nn.Parameter(head)  # its own tensor: untied from the embedding
    model.config.tie_word_embeddings = False
    model.config.text_config.tie_word_embeddings = False  # saved with its own lm_head.weight, loaded untied
    return model.eval(), processor


@pytest.fixture(scope="module")
def looping():
    _, processor = tiny_model_and_processor()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps: 6x faster than two threads on a busy 2-core machine
    yield looping_model(processor.tokenizer.encode("<page_header></page_header>", add_special_tokens=False))
    torch.set_num_threads(threads)


def test_stop_loops_ends_a_looping_answer_at_the_first_check_that_sees_the_loop(looping):
    model, processor = looping
    prompts = [
        Prompt([Image.new("RGB", (60, 80), "red")], PAGE_PROMPT),
        Prompt([Image.new("RGB", (90, 30), "blue")], "<formula>"),
        Prompt([Image.new("RGB", (40, 40), "green")], PAGE_PROMPT),
    ]
    budgets = [80, 80, 20]
    plain = generate(model, processor, prompts, budgets, batch_size=3, progress=False)
    stopped = generate(model, processor, prompts, budgets, batch_size=3, progress=False, stop_loops=True)

    assert [a.text[:54] for a in plain] == ["<page_header></page_header>" * 2] * 3
    assert [a.new_tokens for a in plain] == [80, 80, 20] and not any(a.stopped or a.loop for a in plain)
    assert [loops(a.text) for a in plain] == ["repeated_tail", "repeated_tail", None]  # 20 tokens: 270 characters
    # A 27-character unit (2 tokens) needs 16 copies, 432 characters: 32 tokens, the first check.
    assert [a.new_tokens for a in stopped] == [32, 32, 20]
    assert [a.loop for a in stopped] == ["repeated_tail", "repeated_tail", None]
    assert not any(a.stopped for a in stopped)  # the eos padding after a loop stop is no eos stop
    assert all(p.text.startswith(s.text) for p, s in zip(plain, stopped, strict=True))
    assert stopped[2] == plain[2]  # the loop check never cut into an answer its rules do not fire on


@pytest.fixture(scope="module")
def looping_checkpoint(looping, tmp_path_factory):
    model, processor = looping
    folder = tmp_path_factory.mktemp("looping") / "final_model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_predict_stop_loops_keeps_each_page_up_to_its_loop(looping_checkpoint, tmp_path, caplog):
    from granite_docling.cli import main

    Image.new("RGB", (300, 400), "white").save(tmp_path / "scan.png")
    common = ["predict", str(looping_checkpoint), str(tmp_path / "scan.png"), "--max-new-tokens", "80"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "stopped"), "--stop-loops"]) == 0
    assert (tmp_path / "plain" / "scan" / "page_001.doctags").read_text() == "<page_header></page_header>" * 40
    assert (tmp_path / "stopped" / "scan" / "page_001.doctags").read_text() == "<page_header></page_header>" * 16
    assert "scan.png: page(s) [1] looped and were stopped early (--stop-loops)" in caplog.text


def test_evaluate_with_stop_loops_generates_fewer_tokens_and_reports_the_loops(looping_checkpoint, tmp_path):
    from granite_docling.evaluation.runner import evaluate

    data = write_eval_data(tmp_path / "data")
    runs = {}
    for stop in (False, True):
        cfg = compose_eval(f"checkpoint={looping_checkpoint}", "dataset=[sample]", f"dataset.sample.path={data}",
                           "eval.split=all", "eval.max_new_tokens=80", "eval.reference_length_factor=null",
                           f"eval.stop_loops={str(stop).lower()}", "eval.page_exports=false",
                           "eval.docling_eval_export=false", "eval.num_examples=0")  # fmt: skip
        validate_eval(cfg)
        evaluate(cfg, tmp_path / f"stop_{stop}")
        runs[stop] = read_predictions(tmp_path / f"stop_{stop}" / "predictions.jsonl")
    assert len(runs[True]) == len(runs[False]) == 4  # 2 documents (one of two pages) and 2 formula crops
    assert [r.new_tokens for r in runs[False]] == [80] * 4 and [r.new_tokens for r in runs[True]] == [32] * 4
    assert {r.loop_stopped for r in runs[True]} == {"repeated_tail"} and {r.loop_stopped for r in runs[False]} == {None}
    for stop in (False, True):
        metrics = json.loads((tmp_path / f"stop_{stop}" / "metrics.json").read_text())
        assert metrics["overall"]["loops"]["mean"] == 1.0 and metrics["overall"]["stopped_with_eos"]["mean"] == 0.0


def test_a_replayed_looping_prediction_is_caught_in_every_output(tmp_path):
    from granite_docling.evaluation.runner import evaluate

    page = "<doctag>" + TITLE + block("text", (40, 50, 460, 70), "We measured it.") + "</doctag>"
    formula = "\\frac { a } { b }"
    records = [
        Record("p1", "docs", "src", "", page, page, True, new_tokens=80, max_new_tokens=200),
        Record("p2", "docs", "src", "", SAME_BOX, page, False, new_tokens=200, max_new_tokens=200),
        Record("f1", "formulas", None, "", formula, formula, True),
        Record("f2", "formulas", None, "", formula + " \\quad" * 70, formula, False, loop_stopped="repeated_tail"),
    ]
    write_predictions(tmp_path / "predictions.jsonl", records)
    cfg = compose_eval(f"eval.predictions={tmp_path / 'predictions.jsonl'}", "eval.docling_eval_export=false")
    validate_eval(cfg)
    result = evaluate(cfg, tmp_path / "run")

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [metrics[group]["loops"]["mean"] for group in ("overall", "docs", "formulas")] == [0.5, 0.5, 0.5]
    assert metrics["docs"]["sources"]["src"]["loops"] == {"mean": 0.5, "median": 0.5, "n": 2}
    scores = [json.loads(line)["scores"] for line in (tmp_path / "run" / "scores.jsonl").read_text().splitlines()]
    assert [s["loop_rule"] for s in scores] == [None, "repeated_blocks", None, "repeated_tail"]

    summary = result.summary()
    assert "| loops ↓ | 0.5000 | 0.5000 | 0.5000 |" in summary  # overall, docs, formulas

    page_html = (tmp_path / "run" / "report.html").read_text()
    assert "2 of 4 answer(s) end in a loop" in page_html
    assert "<li>docs / p2: <span class=loop>repeated_blocks</span> (200 tokens of 200; cut at max_new_tokens)</li>" in (
        page_html
    )
    assert "<li>formulas / f2: <span class=loop>repeated_tail</span> (stopped early)</li>" in page_html
    assert page_html.count("<span class=loop>loops (") == 2  # the two looping samples are marked where shown
    assert "stopped early: it loops" in page_html


def test_the_docling_eval_export_keeps_the_answer_as_generated_unless_asked():
    reference = "<doctag>" + TITLE + block("text", (40, 50, 460, 70), "We measured it.") + "</doctag>"
    record = Record("p", "docs", None, "", SAME_BOX, reference, False)
    images = [Image.new("RGB", (500, 500), "white")]

    def texts(row: dict) -> list[str]:
        return [item["text"] for item in json.loads(row["PredictedDocument"])["texts"]]

    kept = prediction_row(record, images)
    stripped = prediction_row(record, images, strip_loops=True)
    assert kept["original_prediction"] == stripped["original_prediction"] == SAME_BOX
    assert texts(kept) == ["Results"] + ["We measured it."] * 5
    assert texts(stripped) == ["Results", "We measured it."]


def test_stop_loops_is_refused_for_the_server_engine_in_one_line():
    cfg = EvaluateConfig(checkpoint="m", eval=EvalConfig(engine="server", server_url="http://x", stop_loops=True))
    with pytest.raises(ConfigError, match="eval.stop_loops=true stops generation here"):
        validate_eval(cfg)
