"""One sample -> one encoded example -> one padded batch, the same for indexed and streamed data. The parts that
must be exactly right (token ids, loss labels, padding) are pure functions, tested on literal ids.

:class:`ExampleEncoder` decodes a sample's images and encodes its conversation (``data.image_path=fast``
ships uint8 pages, tiled later on the device; ``stock`` runs the processor). A sample that cannot be used
becomes a :class:`Problem` that travels in the batch, or stops the run with ``on_bad_sample=error``;
:func:`collate_skipping_problems` pads the good examples into a batch and carries the problems along.

The chat template renders every turn as ``<|start_of_role|>ROLE<|end_of_role|>CONTENT<|end_of_text|>\\n``;
all images go into the first user turn, before its text, exactly as the model card's inference recipe puts
the one page image. Supervised positions are the assistant content plus its closing ``<|end_of_text|>``;
everything else (role headers, user text, image tokens, the newline after eos, padding) is ignored.

pad == eos (``<|end_of_text|>``, 100257) in this tokenizer, so masks come from positions, never from pad ids.
Labels are NOT shifted here: the loss shifts them once (``granite_docling.train_loop``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from granite_docling.data.image_tiles import ImageSpec, image_replacements, worker_pixels
from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.sample import BadSampleError, Problem, Sample, Turn

IGNORE_INDEX = -100
ASSISTANT_HEADER = "<|start_of_role|>assistant<|end_of_role|>"
IMAGE_PATHS = ("fast", "stock")


def build_messages(turns: Sequence[Turn], num_images: int) -> list[dict]:
    """Chat messages for the processor's template: images first in the first user turn, then its text."""
    messages = []
    for i, turn in enumerate(turns):
        images = [{"type": "image"}] * num_images if i == 0 else []
        messages.append({"role": "user", "content": [*images, {"type": "text", "text": turn.user}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": turn.assistant}]})
    return messages


def assistant_mask(input_ids: Sequence[int], header_ids: Sequence[int], eos_id: int) -> list[bool]:
    """True at every assistant content token and its closing eos; False everywhere else.

    A span starts right after each occurrence of ``header_ids`` (the assistant role header) and runs up to and
    including the next ``eos_id``.
    """
    ids = list(input_ids)
    header = list(header_ids)
    n = len(input_ids)
    mask = [False] * n
    i = 0
    while i < n:
        if ids[i : i + len(header)] != header:
            i += 1
            continue
        j = i + len(header)
        while j < n and ids[j] != eos_id:
            mask[j] = True
            j += 1
        if j < n:
            mask[j] = True  # the closing eos: the model must learn to stop
        i = j + 1
    return mask


def masked_labels(input_ids: Sequence[int], mask: Sequence[bool]) -> list[int]:
    """``input_ids`` where supervised, :data:`IGNORE_INDEX` elsewhere (unshifted)."""
    return [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]


def supervision_problems(
    input_ids: Sequence[int], labels: Sequence[int], header: Sequence[int], eos_id: int, image_token_id: int
) -> list[str]:
    """Invariants of correct labels, as messages (empty when all hold). Used by tests and ``validate``.

    Labels must be unshifted (``labels[t]`` is ``input_ids[t]`` or ignored), supervise exactly the assistant spans
    of :func:`assistant_mask`, which end in eos, and never supervise image tokens or role headers.
    """
    problems = []
    expected = assistant_mask(input_ids, header, eos_id)
    supervised = [label != IGNORE_INDEX for label in labels]
    if any(label not in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels, strict=True)):
        problems.append("labels are shifted: a supervised label differs from the input token at its position")
    if any(s and token == image_token_id for token, s in zip(input_ids, supervised, strict=True)):
        problems.append("image tokens are supervised")
    if any(s and not e for s, e in zip(supervised, expected, strict=True)):
        problems.append("tokens outside the assistant answers are supervised")
    missing = [t for t, (s, e) in enumerate(zip(supervised, expected, strict=True)) if e and not s]
    if any(input_ids[t] == eos_id for t in missing):
        problems.append("an answer's closing eos is not supervised: the model would never learn to stop")
    if any(input_ids[t] != eos_id for t in missing):
        problems.append("assistant answer tokens are not supervised")
    return problems


def header_ids(tokenizer) -> list[int]:
    return tokenizer.encode(ASSISTANT_HEADER, add_special_tokens=False)


def encode_conversation(processor, turns: Sequence[Turn], images: list, image_longest_edge: int | None = None) -> dict:
    """One sample -> ``input_ids`` / ``labels`` (T,), ``pixel_values`` (N, 3, H, W), ``pixel_attention_mask``.

    Text and images go through the stock processor, so the prompt is token-for-token what inference sees.
    """
    text = processor.apply_chat_template(build_messages(turns, len(images)))
    kwargs = {"size": {"longest_edge": image_longest_edge}} if image_longest_edge else {}
    encoded = processor(text=text, images=images or None, return_tensors="pt", **kwargs)
    example = _with_labels(processor.tokenizer, encoded["input_ids"][0])
    if images:
        example["pixel_values"] = encoded["pixel_values"][0]
        example["pixel_attention_mask"] = encoded["pixel_attention_mask"][0].bool()
    return example


def encode_conversation_fast(processor, turns: Sequence[Turn], images: list, spec: ImageSpec) -> dict:
    """:func:`encode_conversation`'s ``input_ids`` and ``labels``, token for token, with the images left as uint8.

    The tile layout of every image comes from its size alone (:meth:`ImageSpec.layout`) and the ``<image>``
    placeholders are expanded by the processor's own ``replace_image_token``; ``images`` holds the (H, W, 3) uint8
    pixels and ``image_layouts`` their layouts, for :func:`~granite_docling.data.image_tiles.batch_pixel_values`
    to make ``pixel_values`` on the training device.
    """
    text = processor.apply_chat_template(build_messages(turns, len(images)))
    layouts = [spec.layout(image.height, image.width) for image in images]
    if images:
        replacements = image_replacements(processor, layouts)
        (text,), _ = processor.get_text_with_replacements([text], images_replacements=replacements)
    example = _with_labels(processor.tokenizer, torch.tensor(processor.tokenizer(text)["input_ids"]))
    if images:
        example["images"] = [worker_pixels(image, layout) for image, layout in zip(images, layouts, strict=True)]
        example["image_layouts"] = layouts
        example["image_spec"] = spec
    return example


def _with_labels(tokenizer, input_ids: torch.Tensor) -> dict:
    mask = assistant_mask(input_ids.tolist(), header_ids(tokenizer), tokenizer.eos_token_id)
    return {"input_ids": input_ids, "labels": torch.tensor(masked_labels(input_ids.tolist(), mask))}


class ExampleEncoder:
    """``encoder(sample)``: the encoded example dict, or a :class:`Problem` when an image fails or it is too long."""

    def __init__(
        self,
        processor,
        image_longest_edge: Mapping[str, int | None],
        max_length: int | None = None,
        on_bad_sample: str = "skip",
        image_path: str = "stock",
    ):
        if image_path not in IMAGE_PATHS:
            raise ValueError(f"data.image_path={image_path!r} is not one of {', '.join(IMAGE_PATHS)}")
        self.processor = processor
        self.image_longest_edge = dict(image_longest_edge)
        self.max_length = max_length
        self.on_bad_sample = on_bad_sample
        self.image_path = image_path
        self._image_specs: dict[str, ImageSpec] = {}

    def image_spec(self, dataset: str) -> ImageSpec:
        """The fast path's image settings for one source (its ``image_longest_edge`` applied)."""
        if dataset not in self._image_specs:
            edge = self.image_longest_edge.get(dataset)
            self._image_specs[dataset] = ImageSpec.from_processor(self.processor, edge)
        return self._image_specs[dataset]

    def __call__(self, sample: Sample) -> dict | Problem:
        try:
            images = [decode_image(ref) for ref in sample.images]
        except ImageError as error:
            return self.bad(Problem(sample.dataset, sample.id, error.reason, error.detail))
        if self.image_path == "fast":
            example = encode_conversation_fast(self.processor, sample.turns, images, self.image_spec(sample.dataset))
        else:
            edge = self.image_longest_edge.get(sample.dataset)
            example = encode_conversation(self.processor, sample.turns, images, edge)
        length = len(example["input_ids"])
        if self.max_length is not None and length > self.max_length:
            return self.bad(Problem(sample.dataset, sample.id, "too_long", f"{length} > {self.max_length} tokens"))
        example["id"] = sample.id
        example["dataset"] = sample.dataset
        return example

    def bad(self, problem: Problem) -> Problem:
        """The problem, to travel in the batch; raised instead under ``on_bad_sample=error``."""
        if self.on_bad_sample == "error":
            raise BadSampleError(problem)
        return problem


def pad_images(tiles: Sequence[torch.Tensor | None], fill: float | bool = 0) -> torch.Tensor | None:
    """Stack per-sample tile tensors (N_i, ...) into (B, N_max, ...), zero-filled.

    All-zero tiles are how Idefics3 recognises padding tiles, so samples with fewer tiles (or none) are padded
    with zeros. H and W are padded too, in case sources were resized to different tile sizes.
    """
    present = [t for t in tiles if t is not None]
    if not present:
        return None
    first = present[0]
    max_tiles = max(t.shape[0] for t in present)
    spatial = [max(t.shape[d] for t in present) for d in range(1, first.ndim)]
    out = torch.full((len(tiles), max_tiles, *spatial), fill, dtype=first.dtype)
    for row, t in enumerate(tiles):
        if t is not None:
            out[(row, slice(0, t.shape[0]), *(slice(0, s) for s in t.shape[1:]))] = t
    return out


def collate(examples: Sequence[dict], pad_id: int) -> dict:
    """Right-padded batch: ``input_ids`` padded with ``pad_id``, ``attention_mask``, ``labels`` padded with -100.

    Stock examples' tiles are stacked into ``pixel_values``; fast examples' uint8 images travel as per-sample lists
    (``images``, ``image_layouts``, ``image_spec``) for the device to tile.
    """
    input_ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=pad_id),
        "attention_mask": pad_sequence([torch.ones_like(ids) for ids in input_ids], batch_first=True),
        "labels": pad_sequence([e["labels"] for e in examples], batch_first=True, padding_value=IGNORE_INDEX),
    }
    pixel_values = pad_images([e.get("pixel_values") for e in examples])
    if pixel_values is not None:
        batch["pixel_values"] = pixel_values
        batch["pixel_attention_mask"] = pad_images([e.get("pixel_attention_mask") for e in examples], False)
    if any("images" in e for e in examples):  # the fast image path: uint8 pages, tiled on the device
        batch["images"] = [e.get("images", []) for e in examples]
        batch["image_layouts"] = [e.get("image_layouts", []) for e in examples]
        batch["image_spec"] = next(e["image_spec"] for e in examples if "image_spec" in e)
    return batch


def collate_skipping_problems(items: Sequence[dict | Problem], pad_id: int) -> dict:
    """:func:`collate` over the good examples; the bad ones travel along as ``batch['problems']``."""
    examples = [item for item in items if not isinstance(item, Problem)]
    batch = collate(examples, pad_id) if examples else {}
    batch["problems"] = [item for item in items if isinstance(item, Problem)]
    batch["ids"] = [e["id"] for e in examples]
    batch["datasets"] = [e["dataset"] for e in examples]
    return batch
