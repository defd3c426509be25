"""Builders shared by the evaluation tests: a saved tiny checkpoint, a tiny model whose greedy answers vary,
and a small synthetic dataset with page conversions (one of them two pages long) and formulas."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import compose_config

from granite_docling.model import load_model_and_processor
from granite_docling.tools.sample_data import write_sample_data


def tiny_model_and_processor(noise_std: float | None = None, seed: int = 0):
    """The tiny preset. With ``noise_std``, every matrix is redrawn from N(0, std^2): at the preset's own
    initialisation greedy decoding repeats one token for every input, which would hide padding bugs."""
    torch.manual_seed(seed)
    model, processor = load_model_and_processor(compose_config("model=tiny").model)
    if noise_std is not None:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.ndim >= 2:
                    parameter.normal_(0.0, noise_std)
    return model.eval(), processor


def save_tiny_checkpoint(folder: Path, noise_std: float | None = 0.5, seed: int = 0) -> Path:
    """A stock-loadable model folder (config, safetensors, processor files), as training saves one."""
    model, processor = tiny_model_and_processor(noise_std, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_eval_data(folder: Path) -> Path:
    """2 documents (3 pages: one document has two) and 2 formula crops, in the Docling folder format."""
    write_sample_data(folder, pages=3, formulas=2, seed=3, qa_turns=1)
    return folder
