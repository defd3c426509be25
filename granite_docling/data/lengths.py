"""Exact (tokens, tiles) of a sample from its text and its image HEADERS, before any pixel is decoded.

A page is 1.1k-4k tokens (1,088 of them image tokens at the real settings); the index stores every record's
length so that batches of similar length can be formed up front (:mod:`granite_docling.data.sampler`) and
over-long samples dropped before training. ``PIL.Image.open(f).size`` reads the header only; the layout and the
prompt expansion are the fast image path's own (:mod:`granite_docling.data.image_tiles`), so the counts are the
ones the workers' encoding gives, token for token (tested against the stock processor).
"""

from __future__ import annotations

from collections.abc import Sequence

from granite_docling.data.encoding import build_messages
from granite_docling.data.image_tiles import ImageSpec, Layout, image_replacements
from granite_docling.data.images import image_size
from granite_docling.data.sample import Sample


class LengthCounter:
    """Exact (tokens, tiles) of samples as :func:`~granite_docling.data.encoding.encode_conversation_fast` (and the
    stock processor) would encode them, from image sizes and text; image-token counts cached per tile grid."""

    def __init__(self, processor):
        self.processor = processor
        self._image_tokens: dict[tuple[int, int], int] = {}

    def image_tokens(self, layout: Layout) -> int:
        grid = (layout.rows, layout.cols)
        if grid not in self._image_tokens:
            (replacement,) = image_replacements(self.processor, [layout])
            self._image_tokens[grid] = len(self.processor.tokenizer(replacement, add_special_tokens=False)["input_ids"])
        return self._image_tokens[grid]

    def count(self, samples: Sequence[Sample], spec: ImageSpec) -> list[tuple[int, int]]:
        """(tokens, tiles) per sample; an unreadable image counts as no image."""
        sizes = [[size for size in map(image_size, sample.images) if size is not None] for sample in samples]
        template = self.processor.apply_chat_template
        texts = [template(build_messages(s.turns, len(found))) for s, found in zip(samples, sizes, strict=True)]
        token_ids = self.processor.tokenizer(texts)["input_ids"] if texts else []
        return [
            self._total(ids, [spec.layout(h, w) for w, h in found]) for ids, found in zip(token_ids, sizes, strict=True)
        ]

    def count_one(self, sample: Sample, image_sizes: Sequence[tuple[int, int]], spec: ImageSpec) -> tuple[int, int]:
        """(tokens, tiles) of one sample whose images have these (width, height) sizes."""
        text = self.processor.apply_chat_template(build_messages(sample.turns, len(image_sizes)))
        ids = self.processor.tokenizer(text)["input_ids"]
        return self._total(ids, [spec.layout(h, w) for w, h in image_sizes])

    def _total(self, ids: list[int], layouts: Sequence[Layout]) -> tuple[int, int]:
        """Text tokens without the <image> placeholders, plus each image's expansion; and the tiles."""
        image_tokens = sum(self.image_tokens(layout) for layout in layouts)
        return len(ids) - ids.count(self.processor.image_token_id) + image_tokens, sum(
            layout.tiles for layout in layouts
        )


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded (B, T_max) token grid of ``batches`` that is padding."""
    grid = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / grid if grid else 0.0
