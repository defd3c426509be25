"""Model FLOPs of training samples: the MFU in the training logs and in ``benchmarks/gpu_step.py``.

Model FLOPs are what the architecture needs, not what the hardware ran: our loss recomputes each chunk's logits in
backward, which is not counted, and neither is padding. Per sample:

* vision encoder: its parameters x patches (1,024 per 512 px tile; Idefics3 drops padding tiles), plus attention
  4 x layers x patches^2 x width per tile (QK^T and AV, 2 FLOPs per multiply-add); x 3 (forward 2, backward 4) when
  it trains, x 1 when frozen (nothing below it needs gradients);
* connector: its parameters x image tokens (64 per tile);
* text: its parameters without the embedding x the sample's tokens, plus attention 4 x layers x tokens^2 x width
  (the full square, the usual convention, though the mask is causal);
* output layer (tied to the embedding): vocabulary x hidden x supervised tokens, the only positions our loss
  projects.

Connector, text and output layer count x 3 whether or not they train: gradients flow back through them whenever
anything trains (with LoRA the frozen weights' own gradients are skipped, so there it reads a little high).
"""

from __future__ import annotations

import torch

from granite_docling.data.encoding import IGNORE_INDEX
from granite_docling.model import component_of, parameter_counts


class ModelFlops:
    """Training FLOPs of one sample from the model's parameter counts, the sample's tokens and its tiles."""

    def __init__(self, model: torch.nn.Module):
        counts = parameter_counts(model)
        config = model.config
        vision = config.vision_config
        text = config.text_config
        embedding = model.get_input_embeddings().weight.numel()
        self.vision_params = counts["vision"]
        self.connector_params = counts["connector"]
        self.text_params = counts["text"] - embedding  # the embedding is a lookup; as the output layer, counted apart
        self.head_params = embedding  # tied: vocabulary x hidden
        self.patches = (vision.image_size // vision.patch_size) ** 2
        self.tokens_per_tile = self.patches // config.scale_factor**2
        self.vision_attention = 4 * vision.num_hidden_layers * self.patches**2 * vision.hidden_size
        self.text_attention_per_token2 = 4 * text.num_hidden_layers * text.num_attention_heads * text.head_dim

    def sample(self, tokens: int, tiles: int, supervised: int, train_vision: bool) -> float:
        vision = tiles * (2 * self.vision_params * self.patches + self.vision_attention)
        connector = 2 * self.connector_params * tiles * self.tokens_per_tile
        text = 2 * self.text_params * tokens + self.text_attention_per_token2 * tokens**2
        head = 2 * self.head_params * supervised
        return vision * (3 if train_vision else 1) + 3 * (connector + text + head)


def vision_trains(model: torch.nn.Module) -> bool:
    return any(p.requires_grad for name, p in model.named_parameters() if component_of(name) == "vision")


def batch_shape(batch: dict) -> list[tuple[int, int, int]]:
    """(tokens, tiles, supervised tokens) of every sample of a collated batch, padding excluded."""
    if not batch["ids"]:  # every sample of the batch was bad: nothing ran
        return []
    tokens = batch["attention_mask"].sum(dim=1).tolist()
    supervised = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).tolist()
    if "image_layouts" in batch:  # the fast image path
        tiles = [sum(layout.tiles for layout in layouts) for layouts in batch["image_layouts"]]
    elif "pixel_attention_mask" in batch:  # the stock path: padding tiles are masked out entirely
        tiles = batch["pixel_attention_mask"].flatten(2).any(dim=-1).sum(dim=1).tolist()
    else:
        tiles = [0] * len(tokens)
    return list(zip(tokens, tiles, supervised, strict=True))


# Dense bf16 peak of common training GPUs, FLOP/s (no sparsity), for the MFU estimate.
PEAK_BF16_FLOPS = {
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
    "L4": 121e12,
}


def device_peak_flops(peak_tflops: float | None) -> float | None:
    """The device's peak FLOP/s: ``training.peak_tflops`` if set, else looked up by CUDA device name; None on CPU."""
    if peak_tflops:
        return peak_tflops * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
