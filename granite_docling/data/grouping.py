"""Length-aware batching: every sample's exact (tokens, tiles), known before training, and the batches of similar
length that :class:`~granite_docling.data.loading.LengthGroupedSampler` serves, so that little of a batch is padding.

A page is 1.1k-4k tokens (1,088 of them image tokens); random batches of 8 pad every sample to the longest.
:func:`sample_lengths` counts tokens and tiles from the text and the image HEADERS only (``PIL.Image.open(f).size``
decodes no pixel), through the same layout and prompt expansion as the fast image path, and caches them on disk.
:func:`grouped_batches` cuts a shuffled epoch into batches of similar length, shuffled so that lengths do not
trend; the sampler keeps ``EpochSampler``'s contract (pure order, equal shards, exact resume).
Measured in ``benchmarks/padding.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from granite_docling.data.encoding import build_messages
from granite_docling.data.image_tiles import ImageSpec, Layout, image_replacements
from granite_docling.data.sample import ImageRef, Sample

log = logging.getLogger(__name__)

WINDOW_BATCHES = 64  # global batches sorted together; larger packs tighter, smaller varies batch company more
MIN_CACHED_SAMPLES = 1000  # smaller sources are counted in about a second: no cache file for them


# ---------------------------------------------------------------------------------------------------------------
# Lengths, up front


def image_size(ref: ImageRef) -> tuple[int, int] | None:
    """(width, height) from the image header, or None when it cannot be read (the worker will report why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # decode_image applies our own limit
            with Image.open(ref if isinstance(ref, Path) else io.BytesIO(ref)) as image:
                return image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None


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


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "granite_docling" / "lengths"


def _fingerprint(samples: Sequence[Sample], spec: ImageSpec, processor) -> str:
    """Everything the lengths depend on: tokenizer, tokens per tile, image settings, and each sample's id, text and
    image references (paths, or the size and ends of encoded bytes). A stale entry would only batch less tightly:
    the workers encode the real sample."""
    digest = hashlib.sha256()
    tokenizer = processor.tokenizer
    digest.update(repr((tokenizer.name_or_path, len(tokenizer), processor.image_seq_len, spec)).encode())
    for sample in samples:
        refs = [str(r) if isinstance(r, Path) else (len(r), r[:64], r[-64:]) for r in sample.images]
        digest.update(repr((sample.id, sample.turns, refs)).encode())
    return digest.hexdigest()[:32]


def sample_lengths(
    processor, samples: Sequence[Sample], spec: ImageSpec, cache_dir: str | Path | None = None,
    min_cached: int = MIN_CACHED_SAMPLES,
) -> list[tuple[int, int]]:  # fmt: skip
    """(tokens, tiles) of every sample of one source, read from ``cache_dir`` when counted before (sources of at
    least ``min_cached`` samples)."""
    if len(samples) < min_cached:
        return LengthCounter(processor).count(samples, spec)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = cache / f"{_fingerprint(samples, spec, processor)}.json"
    if path.is_file():
        try:
            lengths = [tuple(pair) for pair in json.loads(path.read_text())]
            if len(lengths) == len(samples):
                return lengths
        except (OSError, ValueError):
            pass  # unreadable cache: count again
    log.info("counting tokens and tiles of %d samples for length grouping (cached in %s)", len(samples), cache)
    lengths = LengthCounter(processor).count(samples, spec)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(lengths))
        temporary.replace(path)  # atomic: processes counting at once never read half a file
    except OSError as error:
        log.warning("could not cache sample lengths in %s: %s", cache, error)
    return lengths


# ---------------------------------------------------------------------------------------------------------------
# The sampler


def grouped_batches(
    order: Sequence[int], lengths: Sequence[tuple[int, int]], batch_size: int, world_size: int, seed: int, epoch: int,
    window_batches: int = WINDOW_BATCHES,
) -> list[list[list[int]]]:  # fmt: skip
    """One epoch's global batches, each a list of ``world_size`` per-process batches of similar length.

    ``order`` (a shuffled epoch, length a multiple of ``world_size``) is cut into windows of ``window_batches``
    global batches; each window is sorted by (tokens, tiles) (ties keep the shuffled order) and cut into global
    batches of ``batch_size x world_size``, whose consecutive slices go to the processes. The full global batches
    are shuffled; the one short batch an epoch may have (its samples split evenly over the processes) comes last.
    """
    assert len(order) % world_size == 0
    per_global = batch_size * world_size
    window = window_batches * per_global
    chunks = []
    for start in range(0, len(order), window):
        ranked = sorted(order[start : start + window], key=lambda i: lengths[i])
        chunks += [ranked[i : i + per_global] for i in range(0, len(ranked), per_global)]
    full = [chunk for chunk in chunks if len(chunk) == per_global]
    short = [chunk for chunk in chunks if len(chunk) < per_global]
    random.Random(f"{seed}/{epoch}/batches").shuffle(full)
    result = []
    for chunk in full + short:
        k = len(chunk) // world_size
        result.append([chunk[r * k : (r + 1) * k] for r in range(world_size)])
    return result


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of the padded (B, T_max) token grid of ``batches`` that is padding."""
    grid = sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / grid if grid else 0.0
