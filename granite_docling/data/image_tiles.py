"""The fast image path: DataLoader workers ship uint8 pages, the training process makes the model's tiles.

The stock Idefics3 processor (PIL backend) resizes every page three times with Lanczos (to the longest edge, to
multiples of the tile size, and the whole page to one tile for the global image), splits it into tiles and hands
the loader float32 tiles: ~49 MB and ~0.3 s of CPU per 1224x1584 page. Here

* the worker decodes the image and only computes its :class:`Layout` (the sizes after the stock resizes and the
  tile grid: the same arithmetic as ``Idefics3ImageProcessorPil``, with its own helper functions); it ships the
  decoded uint8 pixels (~6 MB a page; a page larger than the stock's first resize makes it is shrunk by that
  resize first);
* :func:`batch_pixel_values`, run on the training device before the forward, resizes each image ONCE to its
  tiled size and once to one tile for the global image, with PIL's Lanczos filter (PIL itself on a CPU, the grey
  parts of a page as one channel; on an accelerator a torch version, separable, rounded and clipped to 0..255
  after each pass as PIL does for 8-bit images), splits the tiles, rescales, normalises and pads the batch.

Two direct resizes instead of the stock chain of three move pixel values by ~0.2 grey levels on average (99th
percentile 4 levels on the real-docs pages); token ids and the tile layout are identical, because the prompt is
expanded by the processor's own ``replace_image_token`` from the same rows and columns. Measured in
``benchmarks/image_path.py``; ``data.image_path=stock`` keeps the processor.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from transformers.models.idefics3.image_processing_pil_idefics3 import (
    MAX_IMAGE_SIZE,
    _resize_output_size_rescale_to_max_len,
    _resize_output_size_scale_below_upper_bound,
)

LANCZOS_SUPPORT = 3.0
BLOCK = 16  # output pixels per matrix product in the separable resize (see _lanczos_plan)


class Layout(NamedTuple):
    """Where one image goes: its size after the stock resizes (pixels) and its tile grid.

    ``rows == cols == 0`` means one tile and no global image (the image fits in a tile, or splitting is off).
    ``scaled_height`` / ``scaled_width``: the size after the stock's first resize (long edge to ``longest_edge``).
    """

    height: int
    width: int
    rows: int
    cols: int
    scaled_height: int
    scaled_width: int

    @property
    def tiles(self) -> int:
        return self.rows * self.cols + 1 if self.rows else 1


@dataclass(frozen=True)
class ImageSpec:
    """The image processor settings the fast path reproduces; one per dataset (``longest_edge`` may differ)."""

    longest_edge: int  # the long edge is resized to this (the processor's ``size.longest_edge``)
    tile: int  # tile side in pixels (``max_image_size.longest_edge``)
    split: bool  # ``do_image_splitting``
    rescale_factor: float  # 1/255
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_processor(cls, processor, longest_edge: int | None = None) -> ImageSpec:
        """Read the settings off an ``Idefics3Processor`` (or its image processor); ``longest_edge`` overrides."""
        ip = getattr(processor, "image_processor", processor)
        unsupported = [name for name in ("do_resize", "do_rescale", "do_normalize", "do_pad") if not getattr(ip, name)]
        if unsupported or ip.resample not in (Image.Resampling.LANCZOS, int(Image.Resampling.LANCZOS)):
            raise ValueError(
                f"the fast image path reproduces the stock Idefics3 settings (resize with Lanczos, rescale, normalise,"
                f" pad); this processor has {', '.join(unsupported) or 'resample'} changed: "
                "use data.image_path=stock"
            )
        size = ip.size if isinstance(ip.size, dict) else ip.size.__dict__
        return cls(
            longest_edge=longest_edge or size["longest_edge"],
            tile=ip.max_image_size["longest_edge"],
            split=bool(ip.do_image_splitting),
            rescale_factor=float(ip.rescale_factor),
            mean=_per_channel(ip.image_mean),
            std=_per_channel(ip.image_std),
        )

    def layout(self, height: int, width: int) -> Layout:
        """The stock processor's sizes for an image of ``height x width`` pixels, without touching a pixel."""
        height, width = _resize_output_size_rescale_to_max_len(height, width, max_len=self.longest_edge)
        height, width = _resize_output_size_scale_below_upper_bound(height, width, max_len=MAX_IMAGE_SIZE)
        scaled = (height, width)
        tile = self.tile
        if not self.split:
            return Layout(tile, tile, 0, 0, *scaled)
        # Idefics3ImageProcessorPil.resize_for_vision_encoder: the long side up to a multiple of the tile, the
        # short side from the aspect ratio, then up to a multiple too.
        aspect = width / height
        if width >= height:
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect) / tile) * tile
        if height > tile or width > tile:
            return Layout(height, width, height // tile, width // tile, *scaled)
        return Layout(height, width, 0, 0, *scaled)


def _per_channel(value: float | Sequence[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, Sequence) else (float(value),) * 3


def image_replacements(processor, layouts: Sequence[Layout]) -> list[str]:
    """The text each ``<image>`` placeholder expands to, from the processor's own ``replace_image_token``."""
    grid = {"rows": [[layout.rows for layout in layouts]], "cols": [[layout.cols for layout in layouts]]}
    return [processor.replace_image_token(grid, image_idx=i) for i in range(len(layouts))]


# ---------------------------------------------------------------------------------------------------------------
# In the DataLoader worker


def worker_pixels(image: Image.Image, layout: Layout) -> torch.Tensor:
    """(H, W, 3) uint8 pixels to ship through the loader: the image as decoded, or, when it is larger than the
    stock's first resize makes it, shrunk by that same resize (PIL Lanczos): fewer bytes to ship, and the detail
    lost is exactly what the stock processor loses."""
    size = (layout.scaled_width, layout.scaled_height)
    if image.width * image.height > size[0] * size[1]:
        image = image.resize(size, Image.Resampling.LANCZOS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only view: the loader copies it into shared memory
        return torch.from_numpy(np.asarray(image if image.mode == "RGB" else image.convert("RGB")))


# ---------------------------------------------------------------------------------------------------------------
# On the device


def _lanczos(x: np.ndarray) -> np.ndarray:
    """PIL's Lanczos-3 filter: sinc(x) sinc(x/3) on [-3, 3)."""
    return np.where((x >= -LANCZOS_SUPPORT) & (x < LANCZOS_SUPPORT), np.sinc(x) * np.sinc(x / LANCZOS_SUPPORT), 0.0)


def lanczos_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64 resampling weights, computed as PIL's ``precompute_coeffs`` computes them."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = LANCZOS_SUPPORT * filter_scale
    weights = np.zeros((out_size, in_size))
    for out in range(out_size):
        center = (out + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        w = _lanczos((np.arange(lo, hi) - center + 0.5) / filter_scale)
        weights[out, lo:hi] = w / w.sum() if w.sum() != 0 else w
    return weights


@functools.lru_cache(maxsize=64)
def _lanczos_plan(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The banded weight matrix cut into blocks of :data:`BLOCK` outputs, each with the input window it reads:
    ``index`` (n_blocks, window) input positions, ``weights`` (n_blocks, window, BLOCK). One batched matrix product
    then resamples an axis, with far fewer multiplications than the dense (out, in) product."""
    dense = lanczos_matrix(in_size, out_size)
    n_blocks = math.ceil(out_size / BLOCK)
    dense = np.pad(dense, ((0, n_blocks * BLOCK - out_size), (0, 0)))
    blocks = dense.reshape(n_blocks, BLOCK, in_size)
    used = blocks.any(axis=1)  # (n_blocks, in)
    first = used.argmax(axis=1)
    last = in_size - used[:, ::-1].argmax(axis=1)
    window = int((last - first).max())
    starts = np.minimum(first, in_size - window)
    index = starts[:, None] + np.arange(window)
    weights = np.take_along_axis(blocks, index[:, None, :], axis=2).transpose(0, 2, 1)  # (n_blocks, window, BLOCK)
    return (
        torch.from_numpy(index).to(device),
        torch.from_numpy(np.ascontiguousarray(weights)).to(device=device, dtype=torch.float32),
    )


def _round_to_levels(x: torch.Tensor) -> torch.Tensor:
    """Round and clip to 0..255, as PIL stores every pass of an 8-bit resize."""
    return x.add_(0.5).floor_().clamp_(0, 255)


def lanczos_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H, W, C) grey levels (any dtype, any device) -> (height, width, C) float32, PIL's 8-bit Lanczos resize to
    within a level or two in a few pixels: horizontal pass first, then vertical, each rounded and clipped as PIL
    does. (With TF32 matmuls enabled on a GPU the weights lose bits; that moves a few more pixels by one level.)"""
    x = image.float()
    if width != x.shape[1]:
        index, weights = _lanczos_plan(x.shape[1], width, x.device)
        x = torch.einsum("hnwc,nwb->hnbc", x[:, index], weights).flatten(1, 2)[:, :width]
        x = _round_to_levels(x)
    if height != x.shape[0]:
        index, weights = _lanczos_plan(x.shape[0], height, x.device)
        x = torch.einsum("nwxc,nwb->nbxc", x[index], weights).flatten(0, 1)[:height]
        x = _round_to_levels(x)
    return x


GREY_PIECES = 4  # the mostly-grey shortcut checks each tile for colour in GREY_PIECES x GREY_PIECES pieces


def _input_window(start: int, stop: int, in_size: int, out_size: int) -> slice:
    """The input positions PIL's Lanczos reads for outputs ``start..stop-1`` of one axis (a pixel wider each side)."""
    scale = in_size / out_size
    support = LANCZOS_SUPPORT * max(scale, 1.0)
    low = int((start + 0.5) * scale - support + 0.5) - 1
    high = int((stop - 0.5) * scale + support + 0.5) + 1
    return slice(max(low, 0), min(high, in_size))


def _piece_spans(size: int, tile: int) -> list[tuple[int, int]]:
    """(start, stop) of the pieces along one axis of ``size`` pixels: each tile cut in :data:`GREY_PIECES`."""
    step = max(tile // GREY_PIECES, 1)
    return [
        (start, min(start + step, first + tile))
        for first in range(0, size, tile)
        for start in range(first, first + tile, step)
    ]


def _write_pil_lanczos(tiles: torch.Tensor, pixels: np.ndarray, colour: np.ndarray) -> None:
    """Fill ``tiles`` (rows, cols, 3, tile, tile) float with PIL's 8-bit Lanczos resize of (H, W, 3) uint8
    ``pixels`` to (rows x tile, cols x tile), cut into tiles; cheaply for pages.

    PIL filters channels alike, so wherever an output pixel's input window is grey (R == G == B, ``~colour``)
    resizing one channel gives exactly its pixels, at a third of the cost. Most pages are grey but for a few
    coloured pixels (links, a logo, a figure): the grey channel is resized once, and each piece (a tile cut into
    :data:`GREY_PIECES` x :data:`GREY_PIECES`) whose input window holds colour is resized again in RGB through PIL's
    ``box`` (the same filter coefficients: exactly the full RGB resize's pixels there)."""
    rows, cols, _, tile, _ = tiles.shape
    height = rows * tile
    width = cols * tile
    if pixels.shape[:2] == (height, width):
        tiles.copy_(torch.from_numpy(pixels).view(rows, tile, cols, tile, 3).permute(0, 2, 4, 1, 3))
        return
    in_height, in_width = colour.shape
    pieces = [
        (top, left, bottom, right)
        for top, bottom in _piece_spans(height, tile)
        for left, right in _piece_spans(width, tile)
    ]
    coloured = [
        (top, left, bottom, right)
        for top, left, bottom, right in pieces
        if colour[_input_window(top, bottom, in_height, height), _input_window(left, right, in_width, width)].any()
    ]
    if len(coloured) > len(pieces) // 2:  # mostly colour: one RGB resize
        resized = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS))
        tiles.copy_(torch.from_numpy(resized).view(rows, tile, cols, tile, 3).permute(0, 2, 4, 1, 3))
        return
    grey_channel = Image.fromarray(np.ascontiguousarray(pixels[..., 0]))
    grey = torch.from_numpy(np.asarray(grey_channel.resize((width, height), Image.Resampling.LANCZOS)))
    tiles.copy_(grey.view(rows, tile, cols, tile).permute(0, 2, 1, 3).unsqueeze(2))  # the one channel thrice
    image = Image.fromarray(pixels)
    x_scale = in_width / width
    y_scale = in_height / height
    for top, left, bottom, right in coloured:
        box = (left * x_scale, top * y_scale, right * x_scale, bottom * y_scale)
        piece = image.resize((right - left, bottom - top), Image.Resampling.LANCZOS, box=box)
        row = top // tile
        y = top % tile
        col = left // tile
        x = left % tile
        tiles[row, col, :, y : y + bottom - top, x : x + right - left].copy_(
            torch.from_numpy(np.asarray(piece)).permute(2, 0, 1)
        )


def write_tiles(out: torch.Tensor, pixels: torch.Tensor, layout: Layout, pil: bool | None = None) -> None:
    """Fill ``out`` (layout.tiles, 3, tile, tile) float with one image's tiles in grey levels: the row-major tiles
    of the image resized to its layout, then the global image (the whole image resized to one tile), in the stock
    processor's order; each by one Lanczos resize of ``pixels``, (H, W, 3) uint8 on ``out``'s device. ``pil``:
    resize with PIL (8-bit fixed point; the default and the fastest on a CPU) or in torch (:func:`lanczos_resize`,
    for accelerators)."""
    tile = out.shape[-1]
    rows, cols = (layout.rows, layout.cols) if layout.rows else (1, 1)
    grid = out[: rows * cols].view(rows, cols, 3, tile, tile)
    if pixels.device.type == "cpu" if pil is None else pil:
        array = pixels.numpy()
        colour = (array[..., 0] != array[..., 1]) | (array[..., 1] != array[..., 2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays: only ever read
            _write_pil_lanczos(grid, array, colour)
            if layout.rows:
                _write_pil_lanczos(out[-1:].view(1, 1, 3, tile, tile), array, colour)
        return
    size = (rows * tile, cols * tile)
    resized = pixels if pixels.shape[:2] == size else lanczos_resize(pixels, *size)
    grid.copy_(resized.view(rows, tile, cols, tile, 3).permute(0, 2, 4, 1, 3))
    if layout.rows:
        out[-1].copy_(lanczos_resize(pixels, tile, tile).permute(2, 0, 1))


def batch_pixel_values(
    images: Sequence[Sequence[torch.Tensor]],
    layouts: Sequence[Sequence[Layout]],
    spec: ImageSpec,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """What the stock processor plus :func:`~granite_docling.data.encoding.collate` give the model, made on ``device``.

    images: per sample, its (H, W, 3) uint8 images; layouts: the matching :class:`Layout` s. Returns
    ``pixel_values`` (B, N_max, 3, tile, tile) float32 (rescaled and normalised; padding tiles all zero, which is
    how Idefics3 recognises them) and ``pixel_attention_mask`` (B, N_max, tile, tile) bool, or (None, None) when no
    sample has an image.
    """
    counts = [sum(layout.tiles for layout in sample) for sample in layouts]
    if not any(counts):
        return None, None
    tile = spec.tile
    device = torch.device(device)
    pixel_values = torch.empty(len(images), max(counts), 3, tile, tile, device=device)
    mask = torch.zeros(len(images), max(counts), tile, tile, dtype=torch.bool, device=device)
    # (x * rescale - mean) / std as one multiply and one add per channel
    scale = torch.tensor([spec.rescale_factor / s for s in spec.std], device=device).view(3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(spec.mean, spec.std, strict=True)], device=device).view(3, 1, 1)
    with torch.autocast(device.type, enabled=False):  # keep the resize exact under mixed precision
        for row, (sample_images, sample_layouts, count) in enumerate(zip(images, layouts, counts, strict=True)):
            start = 0
            for pixels, layout in zip(sample_images, sample_layouts, strict=True):
                write_tiles(
                    pixel_values[row, start : start + layout.tiles], pixels.to(device, non_blocking=True), layout
                )
                start += layout.tiles
            pixel_values[row, :count].mul_(scale).add_(shift)
            pixel_values[row, count:].zero_()
            mask[row, :count] = True
    return pixel_values, mask
