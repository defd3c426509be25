"""Loss masks and padding on literal token ids, then through the real processor."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from granite_docling.data.encoding import (
    IGNORE_INDEX,
    assistant_mask,
    build_messages,
    collate,
    encode_conversation,
    header_ids,
    masked_labels,
)
from granite_docling.data.sample import Turn

SOR, EOR, EOS, NEWLINE = 100264, 100265, 100257, 198  # <|start_of_role|>, <|end_of_role|>, <|end_of_text|>, "\n"
USER, ASSISTANT, IMAGE = 882, 78191, 100270  # "user", "assistant", <image>
HEADER = [SOR, ASSISTANT, EOR]


def turn(role: int, *content: int) -> list[int]:
    return [SOR, role, EOR, *content, EOS, NEWLINE]


def test_header_ids_are_the_real_tokenizers(tiny_processor):
    assert header_ids(tiny_processor.tokenizer) == HEADER
    assert tiny_processor.tokenizer.eos_token_id == tiny_processor.tokenizer.pad_token_id == EOS


def test_single_turn_supervises_answer_and_its_eos_only():
    ids = turn(USER, IMAGE, IMAGE, 5, 6) + turn(ASSISTANT, 11, 12)
    mask = assistant_mask(ids, HEADER, EOS)
    supervised = [t for t, m in zip(ids, mask, strict=True) if m]
    assert supervised == [11, 12, EOS]
    # the user's eos, the role header and the trailing newline are not supervised
    assert mask == [False] * 9 + [False, False, False, True, True, True, False]


def test_multi_turn_supervises_every_answer():
    ids = turn(USER, IMAGE, 5) + turn(ASSISTANT, 11, 12) + turn(USER, 7) + turn(ASSISTANT, 13)
    labels = masked_labels(ids, assistant_mask(ids, HEADER, EOS))
    assert [t for t in labels if t != IGNORE_INDEX] == [11, 12, EOS, 13, EOS]
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t in (IMAGE, SOR, EOR, USER, ASSISTANT, NEWLINE))


def test_answer_that_contains_pad_equal_eos_ids_elsewhere_is_masked_by_position():
    # pad == eos: right padding with EOS after the sequence must stay unsupervised
    ids = turn(USER, 5) + turn(ASSISTANT, 11) + [EOS, EOS, EOS]
    mask = assistant_mask(ids, HEADER, EOS)
    assert [t for t, m in zip(ids, mask, strict=True) if m] == [11, EOS]
    assert mask[-3:] == [False, False, False]


def test_empty_answer_supervises_only_the_eos():
    ids = turn(USER, 5) + turn(ASSISTANT)
    assert [t for t, m in zip(ids, assistant_mask(ids, HEADER, EOS), strict=True) if m] == [EOS]


def test_collate_right_pads_with_eos_and_ignores_padding_in_labels():
    a = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([-100, 2, EOS])}
    b = {"input_ids": torch.tensor([4]), "labels": torch.tensor([-100])}
    batch = collate([a, b], pad_id=EOS)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, EOS, EOS]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, EOS], [-100, -100, -100]]
    assert "pixel_values" not in batch


def test_collate_zero_pads_missing_tiles():
    a = {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "pixel_values": torch.ones(3, 3, 4, 4),
         "pixel_attention_mask": torch.ones(3, 4, 4, dtype=torch.bool)}  # fmt: skip
    b = {"input_ids": torch.tensor([1]), "labels": torch.tensor([1]), "pixel_values": torch.ones(1, 3, 4, 4),
         "pixel_attention_mask": torch.ones(1, 4, 4, dtype=torch.bool)}  # fmt: skip
    batch = collate([a, b], pad_id=EOS)
    assert batch["pixel_values"].shape == (2, 3, 3, 4, 4)
    assert batch["pixel_values"][1, 1:].abs().sum() == 0  # all-zero tiles are Idefics3's padding
    assert batch["pixel_attention_mask"][1].sum() == 16


def test_messages_put_all_images_in_the_first_user_turn():
    messages = build_messages([Turn("q1", "a1"), Turn("q2", "a2")], num_images=2)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q1"}]
    assert messages[2]["content"] == [{"type": "text", "text": "q2"}]


@pytest.mark.parametrize("num_images", [0, 1, 2])
def test_real_processor_supervises_exactly_the_answers(tiny_processor, num_images):
    images = [Image.new("RGB", (100 + 50 * i, 130), "white") for i in range(num_images)]
    turns = [Turn("Convert this page to docling.", "<doctag><text>one</text></doctag>"), Turn("And?", "two")]
    example = encode_conversation(tiny_processor, turns, images)
    ids, labels = example["input_ids"], example["labels"]
    tokenizer = tiny_processor.tokenizer
    supervised = tokenizer.decode(ids[labels != IGNORE_INDEX], skip_special_tokens=False)
    assert supervised == "<doctag><text>one</text></doctag><|end_of_text|>two<|end_of_text|>"
    assert not (labels == IMAGE).any()
    assert (ids == IMAGE).sum() == sum(tiny_processor.image_seq_len * tiles for tiles in example_tiles(example))
    assert ids[-1] == NEWLINE and labels[-1] == IGNORE_INDEX  # the template's final newline is not trained


def example_tiles(example) -> list[int]:
    return [example["pixel_values"].shape[0]] if "pixel_values" in example else []
