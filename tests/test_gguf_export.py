"""``granite-docling export gguf``: what needs no llama.cpp. A missing llama.cpp folder, one without gguf-py, or a
Python without the converter's modules each end the command in one ``error:`` line that says what to install,
before anything is written and without touching the checkpoint; the command's own options are checked.

The conversion itself and its answers through llama-server are ``tests/evaluation/test_gguf_serving.py``
(``make test-gguf``).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys

import pytest
from conftest import compose_config
from test_model_export import export, one_error_line

from granite_docling.atomic_folders import file_records
from granite_docling.checkpoint import save_checkpoint
from granite_docling.model import load_model_and_processor
from granite_docling.tools.export.gguf import CONVERTER, drop_tokens_beyond_vocab


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model, processor = load_model_and_processor(compose_config("model=tiny").model)
    return save_checkpoint(tmp_path_factory.mktemp("run") / "final_model", model, processor)


def nothing_written(tmp_path, checkpoint, before) -> bool:
    return (
        not (tmp_path / "out").exists()
        and not list(tmp_path.glob(".out.export-*"))
        and (file_records(checkpoint) == before)
    )


def test_a_missing_llama_cpp_is_one_line_that_says_what_to_install(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no .llama.cpp/ here
    before = file_records(checkpoint)
    code, out, err = export(capsys, "gguf", str(checkpoint), str(tmp_path / "out"))
    line = one_error_line(code, err)
    assert line == (
        f"error: llama.cpp's {CONVERTER} is not in .llama.cpp/src (the default): run make llama.cpp (the pinned "
        "release, into .llama.cpp/) or pass --llama-cpp PATH/TO/llama.cpp"
    )
    assert out == "" and nothing_written(tmp_path, checkpoint, before)

    code, _, err = export(capsys, "gguf", str(checkpoint), str(tmp_path / "out"), "--llama-cpp", str(tmp_path))
    assert f"is not in --llama-cpp {tmp_path}: run make llama.cpp" in one_error_line(code, err)


def test_a_llama_cpp_folder_without_gguf_py_is_one_line(checkpoint, tmp_path, capsys):
    llama_cpp = tmp_path / "llama.cpp"
    llama_cpp.mkdir()
    (llama_cpp / CONVERTER).write_text("")
    code, _, err = export(capsys, "gguf", str(checkpoint), str(tmp_path / "out"), "--llama-cpp", str(llama_cpp))
    assert f"{llama_cpp} has {CONVERTER} but no gguf-py/gguf beside it" in one_error_line(code, err)


def test_a_python_without_the_converters_modules_is_one_line(checkpoint, tmp_path, capsys):
    missing = [name for name in ("mistral_common", "sentencepiece") if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("this Python has mistral-common and sentencepiece (the .venv-gguf of make test-gguf)")
    llama_cpp = tmp_path / "llama.cpp"
    (llama_cpp / "gguf-py" / "gguf").mkdir(parents=True)
    (llama_cpp / CONVERTER).write_text("")  # a folder of the right shape: the Python is checked before it runs
    before = file_records(checkpoint)
    code, _, err = export(
        capsys, "gguf", str(checkpoint), str(tmp_path / "out"), "--llama-cpp", str(llama_cpp), "--python",
        sys.executable,
    )  # fmt: skip
    line = one_error_line(code, err)
    assert line.startswith(f"error: {sys.executable} lacks what llama.cpp's converter imports ({', '.join(missing)})")
    assert "pip install torch transformers mistral-common sentencepiece" in line
    assert line.endswith("--python PATH/TO/bin/python")
    assert nothing_written(tmp_path, checkpoint, before)


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--type", "q4_0"], "argument --type: invalid choice: 'q4_0'"),
        (["--quantize", "8"], "unrecognized arguments: --quantize 8"),  # mlx's option, not gguf's
    ],
)
def test_the_commands_options_are_checked(checkpoint, tmp_path, capsys, options, expected):
    with pytest.raises(SystemExit) as stop:
        export(capsys, "gguf", str(checkpoint), str(tmp_path / "out"), *options)
    assert stop.value.code == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_copys_tokenizer_loses_only_the_id_past_the_models_rows(checkpoint, tmp_path):
    from transformers import AutoTokenizer

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(checkpoint / name, tmp_path / name)
    before = AutoTokenizer.from_pretrained(checkpoint)
    assert len(before) == 100353 and before.convert_ids_to_tokens(100352) == "<end_of_utterance>"

    changes = drop_tokens_beyond_vocab(tmp_path)

    assert changes == ["tokenizer: <end_of_utterance> dropped (ids past the model's 100352 rows)"]
    after = AutoTokenizer.from_pretrained(tmp_path)
    assert len(after) == 100352 and len(after.get_added_vocab()) == len(before.get_added_vocab()) - 1
    # the other added tokens stay whole tokens (an emptied added_tokens_decoder dropped them all: <|end_of_role|>
    # became 9 pieces and the served answers nonsense)
    prompt = "<|start_of_role|>user<|end_of_role|><formula><|end_of_text|>"
    assert after(prompt)["input_ids"] == before(prompt)["input_ids"] == [100264, 882, 100265, 100275, 100257]
    assert drop_tokens_beyond_vocab(tmp_path) == []  # nothing left to drop
