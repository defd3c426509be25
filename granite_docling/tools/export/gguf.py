"""``granite-docling export gguf CHECKPOINT OUT``: the checkpoint as GGUF files, by llama.cpp's own converter.

    granite-docling export gguf outputs/run/final_model outputs/run/final_model-gguf
    granite-docling export gguf outputs/run/final_model out-q8 --type q8_0 --llama-cpp ~/llama.cpp

OUT gets ``model.gguf`` (the language model, ``--type``: f16 by default, or q8_0, bf16, f32) and ``mmproj.gguf``
(the vision encoder and projector, in f16, or f32 with ``--type f32``), written by llama.cpp's
``convert_hf_to_gguf.py`` run twice (the second time with ``--mmproj``), and ``export.json``. llama.cpp is a source
folder that holds ``convert_hf_to_gguf.py`` and ``gguf-py``: ``--llama-cpp PATH``, else ``.llama.cpp/src`` in the
current folder (``make llama.cpp`` unpacks the pinned release there and builds ``llama-server``). The converter
runs in a Python with torch, transformers, mistral-common and sentencepiece (it imports both whatever the model,
sentencepiece before it looks for a ``tokenizer.model``): ``--python PATH``, else this interpreter when it has
them, else ``.venv-gguf/bin/python`` (what ``make test-gguf`` builds).

The converter reads the copy that ``export mlx`` writes (:mod:`~granite_docling.tools.export.untied`; this converter
would take the tied checkpoint and ``rope_parameters`` as they are, the copy does no harm), whose tokenizer here
also leaves out the ids past the model's rows (:func:`drop_tokens_beyond_vocab`), which the converter refuses.
Serve the result with ``llama-server -m OUT/model.gguf --mmproj OUT/mmproj.gguf --special`` (OpenAI-compatible;
``evaluate.py eval.engine=server`` scores it; ``--special`` keeps the DocTags tags, which are special tokens, in
the answers: llama-server does not read ``skip_special_tokens``), or load both files in Ollama or LM Studio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from granite_docling.atomic_folders import publish
from granite_docling.tools import export as shared  # the steps every export shares
from granite_docling.tools.export.untied import write_untied_copy

TESTED_LLAMA_CPP = "llama-cpp-python 0.3.36's vendor/llama.cpp"  # what make llama.cpp unpacks and make test-gguf checks
DEFAULT_LLAMA_CPP = Path(".llama.cpp") / "src"
DEFAULT_PYTHON = Path(".venv-gguf") / "bin" / "python"
CONVERTER = "convert_hf_to_gguf.py"
TYPES = ("f16", "q8_0", "bf16", "f32")
MODEL_FILE = "model.gguf"
MMPROJ_FILE = "mmproj.gguf"
INSTALL_LLAMA_CPP = "run make llama.cpp (the pinned release, into .llama.cpp/) or pass --llama-cpp PATH/TO/llama.cpp"
INSTALL_PYTHON = (
    "install what llama.cpp's converter imports (pip install torch transformers mistral-common sentencepiece; "
    "make test-gguf builds .venv-gguf) and pass --python PATH/TO/bin/python"
)
# Run in the candidate Python: the modules convert_hf_to_gguf.py and its gguf-py import; exit 3 names the missing.
PROBE = (
    "import importlib.util as u\n"
    "names = ('torch', 'transformers', 'numpy', 'mistral_common', 'sentencepiece', 'yaml', 'tqdm')\n"
    "missing = [name for name in names if u.find_spec(name) is None]\n"
    "if missing: print(', '.join(missing)); raise SystemExit(3)\n"
    "import transformers\n"
    "print('transformers', transformers.__version__)\n"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--type", choices=TYPES, default="f16", help="the language model's weights (default f16; mmproj stays f16)"
    )
    parser.add_argument(
        "--llama-cpp",
        type=Path,
        help=f"llama.cpp source folder with {CONVERTER} and gguf-py (default: {DEFAULT_LLAMA_CPP}: make llama.cpp)",
    )
    parser.add_argument(
        "--python",
        type=Path,
        help=f"a Python with the converter's modules (default: this one if it has them, else {DEFAULT_PYTHON})",
    )


def export(checkpoint: Path, out: Path, args: argparse.Namespace) -> list[str]:
    """Convert ``checkpoint`` into ``out``; the lines that tell the user what was written and how to serve it."""
    converter = llama_cpp_converter(args.llama_cpp)
    python, found = shared.runtime_python(args.python, DEFAULT_PYTHON, probe, INSTALL_PYTHON)
    mmproj_type = "f32" if args.type == "f32" else "f16"
    with shared.staging_folder(out) as staging:
        copy = Path(staging) / "untied"
        converted = Path(staging) / "gguf"
        converted.mkdir()
        changes = write_untied_copy(checkpoint, copy)
        changes += drop_tokens_beyond_vocab(copy)
        base = [python, str(converter), str(copy), "--model-name", "granite-docling"]
        model_command = [*base, "--outtype", args.type, "--outfile", str(converted / MODEL_FILE)]
        shared.run_converter(model_command, "llama.cpp's converter")
        shared.run_converter(
            [*base, "--mmproj", "--outtype", mmproj_type, "--outfile", str(converted / MMPROJ_FILE)],
            "llama.cpp's converter (--mmproj)",
        )
        shared.write_export_info(
            converted,
            {
                "runtime": "gguf",
                "checkpoint": str(checkpoint.resolve()),
                "converter": f"{converter.resolve()} ({found})",
                "types": {MODEL_FILE: args.type, MMPROJ_FILE: mmproj_type},
                "changes_to_the_copy": changes,
            },
        )
        publish(converted, out)
    model, mmproj = out / MODEL_FILE, out / MMPROJ_FILE
    return [
        f"GGUF model ({args.type}, {shared.folder_size(out) / 1e6:.1f} MB): {model} "
        f"({model.stat().st_size / 1e6:.1f} MB), "
        f"{mmproj} ({mmproj_type}, {mmproj.stat().st_size / 1e6:.1f} MB)",
        f"serve it: llama-server --host 127.0.0.1 --port 8080 --special -m {model.resolve()} "
        f"--mmproj {mmproj.resolve()}",
    ]


def drop_tokens_beyond_vocab(folder: Path) -> list[str]:
    """Remove from the tokenizer files in ``folder`` the tokens whose id has no row in the model (ids at or past
    ``text_config.vocab_size``); the changes, in words. granite-docling's tokenizer adds ``<end_of_utterance>`` as
    id 100,352 to a model of 100,352 rows (the model never reads nor writes it), and llama.cpp's converter refuses
    a tokenizer with an id past the vocabulary (``assert max(tokenizer.vocab.values()) < vocab_size``)."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vocab_size = config.get("text_config", {}).get("vocab_size") or config["vocab_size"]
    tokenizer_file = folder / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    dropped = [token["content"] for token in tokenizer.get("added_tokens", []) if token["id"] >= vocab_size]
    if not dropped:
        return []
    tokenizer["added_tokens"] = [token for token in tokenizer["added_tokens"] if token["id"] < vocab_size]
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    settings_file = folder / "tokenizer_config.json"
    if settings_file.is_file():  # it lists them again, and transformers would add them back
        settings = json.loads(settings_file.read_text(encoding="utf-8"))
        for key in ("extra_special_tokens", "additional_special_tokens"):
            if isinstance(settings.get(key), list):
                settings[key] = [token for token in settings[key] if token not in dropped]
        if isinstance(settings.get("added_tokens_decoder"), dict):  # an empty one would drop every added token
            decoder = settings["added_tokens_decoder"]
            settings["added_tokens_decoder"] = {key: value for key, value in decoder.items() if int(key) < vocab_size}
        settings_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [f"tokenizer: {', '.join(dropped)} dropped (ids past the model's {vocab_size} rows)"]


def llama_cpp_converter(given: Path | None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py`` in ``given`` (or the default folder), beside its ``gguf-py``;
    :class:`ExportError` in one line saying what to install when it is not there."""
    folder = DEFAULT_LLAMA_CPP if given is None else given
    converter = folder / CONVERTER
    if not converter.is_file():
        where = f"--llama-cpp {given}" if given is not None else f"{DEFAULT_LLAMA_CPP} (the default)"
        raise shared.ExportError(f"llama.cpp's {CONVERTER} is not in {where}: {INSTALL_LLAMA_CPP}")
    if not (folder / "gguf-py" / "gguf").is_dir():
        raise shared.ExportError(f"{folder} has {CONVERTER} but no gguf-py/gguf beside it: {INSTALL_LLAMA_CPP}")
    return converter


def probe(python: str) -> tuple[str | None, str]:
    """(the converter's transformers version in ``python``, or None; what is missing when None)."""
    probed = shared.run_probe(python, PROBE)
    return probed.outcome(
        missing=f"{python} lacks what llama.cpp's converter imports ({probed.found})",
        broken=f"{python} cannot run llama.cpp's converter ({probed.last})",
    )
