"""The copy of a checkpoint that other runtimes' converters read: ``lm_head.weight`` written out, and the config
keys those converters look for.

A granite-docling checkpoint keeps the model's tied embeddings: ``tie_word_embeddings: true`` (at the top of
``config.json`` and in ``text_config``) and no ``lm_head.weight`` in the safetensors, the output layer being the
token embedding. mlx-vlm's converter builds its own output layer and refuses such a folder
(``Missing 1 parameters: language_model.lm_head.weight``). transformers 5 also writes the RoPE base as
``text_config.rope_parameters.rope_theta``, where IBM's original config (written by transformers 4) has
``text_config.rope_theta``; mlx-vlm 0.7.10 reads only the latter and otherwise takes 1,000,000 instead of
granite-docling's 100,000, which changes every answer past a few dozen tokens (see README, "Export").

:func:`write_untied_copy` writes that copy into a new folder and only reads the checkpoint::

    changes = write_untied_copy(Path("outputs/run/final_model"), Path("/tmp/untied"))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from granite_docling.checkpoint_manifest import MANIFEST_FILE
from granite_docling.user_error import UserError

LM_HEAD = "lm_head.weight"
EMBEDDING_SUFFIX = "text_model.embed_tokens.weight"  # model.text_model.embed_tokens.weight in Idefics3
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# The files a converter reads besides the weights and config.json: tokenizer, processor, chat template, generation
# defaults. Not the manifest (it lists the checkpoint's files, not the copy's), not the training state, not pickles.
SIDE_FILE_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model")
LEFT_OUT = {MANIFEST_FILE, WEIGHTS_INDEX, "config.json"}


class UntiedCopyError(UserError):
    """The checkpoint's weights or config cannot be made into an untied copy; says which file and why."""


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files of a model folder: the shards its index names, or ``model.safetensors``."""
    index = checkpoint / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [checkpoint / shard for shard in shards]
    if (checkpoint / WEIGHTS_FILE).is_file():
        return [checkpoint / WEIGHTS_FILE]
    raise UntiedCopyError(f"{checkpoint} holds no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX}): no weights to export")


def untied_config(config: dict) -> tuple[dict, list[str]]:
    """``config.json`` of the copy, and what was changed: both tie flags false, ``text_config.rope_theta`` from
    ``rope_parameters`` where only that holds it. The input is not modified."""
    config = json.loads(json.dumps(config))
    text = config.setdefault("text_config", {})
    changes = []
    if config.get("tie_word_embeddings", True) or text.get("tie_word_embeddings", True):
        changes.append("tie_word_embeddings set to false (config.json and text_config)")
    config["tie_word_embeddings"] = False
    text["tie_word_embeddings"] = False
    rope_theta = (text.get("rope_parameters") or {}).get("rope_theta")
    if rope_theta is not None and text.get("rope_theta") != rope_theta:
        text["rope_theta"] = rope_theta
        changes.append(f"text_config.rope_theta = {rope_theta} (from text_config.rope_parameters)")
    return config, changes


def write_untied_copy(checkpoint: Path, folder: Path) -> list[str]:
    """Write the untied copy of ``checkpoint`` into ``folder`` (created; it must not exist). Returns the changes
    made, in words. A checkpoint whose config says untied and whose weights hold no ``lm_head.weight`` is
    refused."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    checkpoint = Path(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    tied = bool(config.get("tie_word_embeddings", True) or config.get("text_config", {}).get("tie_word_embeddings"))
    weights: dict[str, torch.Tensor] = {}
    for file in weight_files(checkpoint):
        try:
            weights |= load_file(file)
        except (SafetensorError, OSError) as error:
            raise UntiedCopyError(f"{file} cannot be read ({str(error).strip().splitlines()[0]})") from error
    new_config, changes = untied_config(config)
    if LM_HEAD not in weights:
        embeddings = [name for name in weights if name.endswith(EMBEDDING_SUFFIX)]
        if not tied or len(embeddings) != 1:
            found = f"{len(embeddings)} '*{EMBEDDING_SUFFIX}' tensors" if tied else "tie_word_embeddings false"
            raise UntiedCopyError(f"{checkpoint} has no {LM_HEAD} to export ({found})")
        weights[LM_HEAD] = weights[embeddings[0]].clone()  # (vocab, hidden): the tied output layer
        changes.insert(0, f"{LM_HEAD} written out (a copy of {embeddings[0]})")

    folder.mkdir(parents=True)
    for pattern in SIDE_FILE_PATTERNS:
        for file in sorted(checkpoint.glob(pattern)):
            if file.is_file() and file.name not in LEFT_OUT:
                shutil.copyfile(file, folder / file.name)
    (folder / "config.json").write_text(json.dumps(new_config, indent=2) + "\n", encoding="utf-8")
    save_file(weights, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    return changes
