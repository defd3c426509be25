"""One sample -> one encoded example, the same for indexed and streamed data; examples -> one padded batch.

:class:`ExampleEncoder` decodes a sample's images and encodes its conversation (``data.image_path=fast``
ships uint8 pages, tiled later on the device; ``stock`` runs the processor). A sample that cannot be used
becomes a :class:`Problem` that travels in the batch, or stops the run with ``on_bad_sample=error``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from granite_docling.data.encoding import collate, encode_conversation, encode_conversation_fast
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.images import ImageError, decode_image
from granite_docling.data.sample import BadSampleError, Problem, Sample

IMAGE_PATHS = ("fast", "stock")


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


def collate_skipping_problems(items: Sequence[dict | Problem], pad_id: int) -> dict:
    """:func:`collate` over the good examples; the bad ones travel along as ``batch['problems']``."""
    examples = [item for item in items if not isinstance(item, Problem)]
    batch = collate(examples, pad_id) if examples else {}
    batch["problems"] = [item for item in items if isinstance(item, Problem)]
    batch["ids"] = [e["id"] for e in examples]
    batch["datasets"] = [e["dataset"] for e in examples]
    return batch
