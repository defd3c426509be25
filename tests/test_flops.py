"""Model FLOPs for the MFU: every parameter counted once, vision per patch, the same tiles on both image paths."""

from __future__ import annotations

import torch
from PIL import Image

from granite_docling.data.encoding import collate, encode_conversation, encode_conversation_fast
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.sample import Turn
from granite_docling.flops import ModelFlops, batch_shape, vision_trains
from granite_docling.model import freeze, load_model_and_processor


def test_every_parameter_is_counted_once_and_vision_per_patch(tiny_config):
    model, _ = load_model_and_processor(tiny_config.model)
    flops = ModelFlops(model)
    parts = flops.vision_params + flops.connector_params + flops.text_params + flops.head_params
    assert parts == sum(p.numel() for p in model.parameters())
    # No tokens and no tiles: no work. One supervised token: the output layer's 6 x vocab x hidden.
    assert flops.sample(0, 0, 0, train_vision=True) == 0
    assert flops.sample(0, 0, 1, train_vision=True) == 6 * flops.head_params
    # One tile, no text: the vision encoder per patch (x3 trained, x1 frozen) plus the connector per image token.
    vision = 2 * flops.vision_params * flops.patches + flops.vision_attention
    connector = 6 * flops.connector_params * flops.tokens_per_tile
    assert flops.sample(0, 1, 0, train_vision=True) == 3 * vision + connector
    assert flops.sample(0, 1, 0, train_vision=False) == vision + connector
    assert vision_trains(model)
    freeze(model, vision=True)
    assert not vision_trains(model)


def test_both_image_paths_give_the_same_batch_shape(tiny_config):
    """Tokens, real tiles (padding tiles excluded) and supervised tokens, read off a stock and a fast batch."""
    _, processor = load_model_and_processor(tiny_config.model)
    turns = (Turn("Convert this page to docling.", "<doctag><text>page</text></doctag>"),)
    pages = [[Image.new("RGB", (300, 400), "white")], [Image.new("RGB", (60, 10), "white")]]  # 5 tiles and 3
    pad_id = processor.tokenizer.pad_token_id
    stock = collate([encode_conversation(processor, turns, images) for images in pages], pad_id)
    spec = ImageSpec.from_processor(processor)
    fast = collate([encode_conversation_fast(processor, turns, images, spec) for images in pages], pad_id)
    stock["ids"] = fast["ids"] = [0, 1]
    shape = batch_shape(stock)
    assert shape == batch_shape(fast)
    assert [tiles for _, tiles, _ in shape] == [5, 3]
    assert [tokens for tokens, _, _ in shape] == stock["attention_mask"].sum(dim=1).tolist()
    assert [supervised for *_, supervised in shape] == [int((stock["labels"][0] != -100).sum())] * 2
    assert batch_shape({"ids": []}) == []
    assert torch.equal(stock["input_ids"], fast["input_ids"])
