"""``granite-docling export``: what needs no runtime installed. The untied copy the converters read is the same
model as the checkpoint, and the checkpoint is never changed; a folder that is not ours, a damaged one, a bad OUT
and a missing mlx-vlm each end the command in one ``error:`` line before anything is written.

The conversion itself and its answers through mlx-vlm's server are ``tests/evaluation/test_mlx_serving.py``
(``make test-mlx``).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import pytest
import torch
from conftest import compose_config
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from granite_docling.atomic_folders import file_records
from granite_docling.checkpoint import save_checkpoint
from granite_docling.cli import main
from granite_docling.model import load_model_and_processor
from granite_docling.tools.export.untied import LM_HEAD, untied_config, write_untied_copy

EMBEDDING = "model.text_model.embed_tokens.weight"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny model folder as train.py saves final_model: tied embeddings, transformers 5's config, a manifest."""
    model, processor = load_model_and_processor(compose_config("model=tiny").model)
    return save_checkpoint(tmp_path_factory.mktemp("run") / "final_model", model, processor)


def export(capsys, *args: str) -> tuple[int, str, str]:
    """``granite-docling export ...`` in this process: (exit code, stdout, stderr)."""
    code = main(["export", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_the_untied_copy_is_the_same_model_with_its_output_layer_written_out(checkpoint, tmp_path):
    before = file_records(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and LM_HEAD not in load_file(checkpoint / "model.safetensors")

    changes = write_untied_copy(checkpoint, tmp_path / "untied")

    assert file_records(checkpoint) == before  # not one byte of the checkpoint changed
    assert changes == [
        f"{LM_HEAD} written out (a copy of {EMBEDDING})",
        "tie_word_embeddings set to false (config.json and text_config)",
        "text_config.rope_theta = 100000.0 (from text_config.rope_parameters)",
    ]
    copied = json.loads((tmp_path / "untied" / "config.json").read_text())
    assert (copied["tie_word_embeddings"], copied["text_config"]["tie_word_embeddings"]) == (False, False)
    assert copied["text_config"]["rope_theta"] == 100000.0  # granite-docling's base; mlx-vlm's default is 1e6
    weights = load_file(tmp_path / "untied" / "model.safetensors")
    assert weights[LM_HEAD].shape == (100352, 64)
    assert torch.equal(weights[LM_HEAD], weights[EMBEDDING])
    names = {path.name for path in (tmp_path / "untied").iterdir()}
    assert "checkpoint.json" not in names  # the manifest lists the checkpoint's files, not the copy's
    assert {"tokenizer.json", "processor_config.json", "chat_template.jinja"} <= names

    original = AutoModelForImageTextToText.from_pretrained(checkpoint).eval()
    untied = AutoModelForImageTextToText.from_pretrained(tmp_path / "untied").eval()
    assert untied.lm_head.weight.data_ptr() != untied.get_input_embeddings().weight.data_ptr()
    ids = torch.tensor([[100264, 882, 100265, 5, 77, 1234, 100257]])
    with torch.no_grad():
        assert torch.equal(untied(input_ids=ids).logits, original(input_ids=ids).logits)


def test_a_sharded_checkpoint_becomes_one_untied_file(tmp_path):
    model, processor = load_model_and_processor(compose_config("model=tiny").model)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="5MB")
    processor.save_pretrained(tmp_path / "sharded")
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()

    write_untied_copy(tmp_path / "sharded", tmp_path / "untied")

    weights = load_file(tmp_path / "untied" / "model.safetensors")
    state = model.state_dict()
    assert set(weights) == set(state)  # the model's state names lm_head.weight too (the tied embedding)
    assert all(torch.equal(weights[name], state[name]) for name in weights)
    assert not (tmp_path / "untied" / "model.safetensors.index.json").exists()  # it would name the shards


def test_untied_config_on_literal_configs():
    tied = {"tie_word_embeddings": True, "text_config": {"rope_parameters": {"rope_theta": 100000.0}}}
    config, changes = untied_config(tied)
    assert config == {
        "tie_word_embeddings": False,
        "text_config": {"rope_parameters": {"rope_theta": 100000.0}, "tie_word_embeddings": False, "rope_theta": 1e5},
    }
    assert len(changes) == 2
    assert tied["tie_word_embeddings"] is True and "rope_theta" not in tied["text_config"]  # input untouched
    # IBM's original config (transformers 4): untied flags and rope_theta already where converters look
    ibm = {"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": False, "rope_theta": 100000.0}}
    assert untied_config(ibm) == (ibm, [])


def test_an_untied_config_without_an_output_layer_is_one_error_line(checkpoint, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "checkpoint.json").unlink()  # a model folder without manifest (someone else's save)
    config = json.loads((broken / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (broken / "config.json").write_text(json.dumps(config))
    code, _, err = export(capsys, "mlx", str(broken), str(tmp_path / "out"), "--python", sys.executable)
    if importlib.util.find_spec("mlx_vlm") is None:  # the runtime is checked first
        assert "mlx-vlm is not installed" in one_error_line(code, err)
        return
    assert f"has no {LM_HEAD} to export (tie_word_embeddings false)" in one_error_line(code, err)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp, ckpt: (tmp / "nothing", tmp / "out"), "nothing: no such folder; give a model folder saved by"),
        (lambda tmp, ckpt: (tmp, tmp / "out"), "is not a model folder (no config.json)"),
        (lambda tmp, ckpt: (ckpt, ckpt / "mlx"), "the export would write into the checkpoint"),
        (lambda tmp, ckpt: (ckpt, ckpt.parent), "the export would write into the checkpoint"),
        (lambda tmp, ckpt: (ckpt, ckpt / "config.json"), "the export would write into the checkpoint"),
    ],
    ids=["missing", "no config.json", "out inside", "out above", "out a file of it"],
)
def test_a_bad_checkpoint_or_out_is_one_error_line(checkpoint, tmp_path, capsys, make, expected):
    source, out = make(tmp_path, checkpoint)
    before = file_records(checkpoint)
    code, out_text, err = export(capsys, "mlx", str(source), str(out))
    assert expected in one_error_line(code, err)
    assert out_text == "" and file_records(checkpoint) == before


def test_a_model_of_another_architecture_is_refused(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
    code, _, err = export(capsys, "mlx", str(tmp_path / "llama"), str(tmp_path / "out"))
    line = one_error_line(code, err)
    assert "holds a 'llama' model, not granite-docling's architecture (model_type 'idefics3')" in line
    assert line.endswith("give a model folder saved by train.py (e.g. outputs/<run>/final_model)")
    assert not (tmp_path / "out").exists()


def test_a_damaged_checkpoint_is_refused(checkpoint, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint, damaged)
    with open(damaged / "model.safetensors", "r+b") as weights:
        weights.seek(-8, 2)
        weights.write(b"\0" * 8)  # same size, other bytes
    code, _, err = export(capsys, "mlx", str(damaged), str(tmp_path / "out"))
    assert "is damaged: model.safetensors" in one_error_line(code, err)


def test_an_out_folder_with_files_needs_overwrite(checkpoint, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, _, err = export(capsys, "mlx", str(checkpoint), str(tmp_path / "out"))
    assert "already holds files; choose another folder or pass --overwrite" in one_error_line(code, err)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_missing_mlx_vlm_is_one_line_that_says_what_to_install(checkpoint, tmp_path, capsys):
    if importlib.util.find_spec("mlx_vlm") is not None:
        pytest.skip("this Python has mlx-vlm (the .venv-mlx of make test-mlx)")
    before = file_records(checkpoint)
    code, _, err = export(capsys, "mlx", str(checkpoint), str(tmp_path / "out"), "--python", sys.executable)
    line = one_error_line(code, err)
    assert line.startswith(f"error: mlx-vlm is not installed for {sys.executable}: install it")
    assert 'pip install "mlx[cpu]" mlx-vlm' in line and "--python" in line
    assert not (tmp_path / "out").exists() and file_records(checkpoint) == before
    assert not list(tmp_path.glob(".out.export-*"))  # no temporary folder left


def test_a_python_that_does_not_exist_is_one_line(checkpoint, tmp_path, capsys):
    code, _, err = export(capsys, "mlx", str(checkpoint), str(tmp_path / "out"), "--python", str(tmp_path / "py"))
    assert f"--python {tmp_path / 'py'}: no such file" in one_error_line(code, err)
