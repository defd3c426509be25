"""The fast image path against the stock processor: identical ids and tile layout, pixels within tolerance.

Tolerance (grey levels, 0..255): mean |difference| <= 0.5 and 99th percentile <= 8, on the real-docs pages rendered
as training renders them, and on edge cases cut from those pages (text, not noise: one Lanczos resize instead of
the stock chain of three differs most on pure noise, which no document is).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pypdfium2 as pdfium
import pytest
import torch
from conftest import compose_config, data_of
from PIL import Image
from transformers import AutoProcessor

from granite_docling.data.encoding import collate, encode_conversation, encode_conversation_fast
from granite_docling.data.image_tiles import ImageSpec, batch_pixel_values, lanczos_resize
from granite_docling.data.lengths import LengthCounter
from granite_docling.data.sample import Sample, Turn
from granite_docling.model import ASSETS_DIR, load_model_config, load_processor

REAL_DOCS = Path(__file__).resolve().parents[1] / "fixtures" / "real_docs"
TURNS = (Turn("Convert this page to docling.", "<doctag><text>page</text></doctag>"), Turn("Title?", "A page"))
MEAN_LEVELS, P99_LEVELS = 0.5, 8.0


@pytest.fixture(scope="module")
def real_processor():
    return AutoProcessor.from_pretrained(ASSETS_DIR)


@pytest.fixture(scope="module")
def pages() -> list[Image.Image]:
    """The first page of every fixture PDF at scale 2 (three page sizes, grey and colour)."""
    rendered = []
    for pdf_path in sorted(REAL_DOCS.glob("*.pdf")):
        pdf = pdfium.PdfDocument(pdf_path)
        rendered.append(pdf[0].render(scale=2).to_pil().convert("RGB"))
        pdf.close()
    return rendered


def crop(page: Image.Image, width: int, height: int) -> Image.Image:
    """A ``width x height`` piece of page text (from the top-left text block; scaled when the page is smaller)."""
    if width + 100 > page.width or height + 150 > page.height:
        return page.resize((width, height), Image.Resampling.LANCZOS)
    return page.crop((100, 150, 100 + width, 150 + height))


def levels(pixel_values: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    return pixel_values * spec.std[0] / spec.rescale_factor


def assert_same_as_stock(processor, images: list[Image.Image], edge: int | None = None) -> tuple[float, float]:
    """Fast == stock in ids, labels, tile layout and mask; returns the pixel difference (mean, p99) in levels."""
    stock = encode_conversation(processor, TURNS, images, edge)
    spec = ImageSpec.from_processor(processor, edge)
    fast = encode_conversation_fast(processor, TURNS, images, spec)
    assert torch.equal(fast["input_ids"], stock["input_ids"])  # row / column tokens included: same layout
    assert torch.equal(fast["labels"], stock["labels"])
    pixel_values, mask = batch_pixel_values([fast["images"]], [fast["image_layouts"]], spec, "cpu")
    assert pixel_values.shape[1:] == stock["pixel_values"].shape
    assert torch.equal(mask[0], stock["pixel_attention_mask"])
    difference = (levels(pixel_values[0], spec) - levels(stock["pixel_values"], spec)).abs().flatten()
    mean, p99 = float(difference.mean()), float(torch.quantile(difference[:16_000_000], 0.99))
    assert mean <= MEAN_LEVELS and p99 <= P99_LEVELS, (mean, p99)
    return mean, p99


def test_real_pages_match_the_stock_processor(real_processor, pages):
    for page in pages:
        assert_same_as_stock(real_processor, [page])


@pytest.mark.parametrize(
    ("sizes", "edge"),
    [
        ([(8, 8)], None),  # far smaller than one tile: upscaled to 2048 like a page
        ([(1000, 60)], None),  # wide strip: 1 x 4 tiles
        ([(60, 1000)], None),  # tall strip
        ([(300, 200), (612, 792)], None),  # two images in one sample
        ([(612, 792)], 384),  # per-dataset override below one tile: no split, no global image
        ([(1100, 1400)], 900),  # override shrinking the page first (in the worker)
        ([(700, 500)], 1536),  # override that is not a power of two
    ],
)
def test_edge_cases_match_the_stock_processor(real_processor, pages, sizes, edge):
    assert_same_as_stock(real_processor, [crop(pages[0], *size) for size in sizes], edge)


@pytest.mark.parametrize("split", [True, False])
def test_tiny_processor_and_no_split_match_the_stock_processor(pages, split):
    cfg = compose_config("model=tiny").model
    processor = load_processor(cfg, load_model_config(cfg))
    processor.image_processor.do_image_splitting = split
    for sizes in ([(1, 1)], [(96, 128)], [(1200, 160), (160, 1200)], [(61, 17)]):
        assert_same_as_stock(processor, [crop(pages[1], *size) for size in sizes])


def test_torch_lanczos_equals_pils_to_a_level_or_two(pages):
    """The accelerator path (torch, float weights) against PIL's 8-bit Lanczos (22-bit fixed-point weights), here
    on the CPU: a rounding step apart in a few pixels, which the second pass can stretch to two."""
    page = pages[1].crop((0, 0, 600, 700))
    pixels = torch.from_numpy(np.array(page))
    for height, width in ((1024, 900), (300, 257), (700, 100), (64, 64)):
        expected = torch.from_numpy(np.array(page.resize((width, height), Image.Resampling.LANCZOS))).float()
        difference = (lanczos_resize(pixels, height, width) - expected).abs()
        assert difference.max() <= 2 and difference.mean() < 0.01, (height, width, difference.max(), difference.mean())


def full_rgb_tiles(pixels: np.ndarray, layout, tile: int) -> torch.Tensor:
    """The tiles by the plain route: PIL's RGB Lanczos resize of the whole image, cut up, then the global image."""
    image = Image.fromarray(pixels)
    resized = np.asarray(image.resize((layout.width, layout.height), Image.Resampling.LANCZOS))
    tiles = [
        resized[y : y + tile, x : x + tile] for y in range(0, layout.height, tile) for x in range(0, layout.width, tile)
    ]
    if layout.rows:
        tiles.append(np.asarray(image.resize((tile, tile), Image.Resampling.LANCZOS)))
    return torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).float()


def cpu_tiles(pixels: np.ndarray, layout, tile: int) -> torch.Tensor:
    from granite_docling.data.image_tiles import write_tiles

    out = torch.full((layout.tiles, 3, tile, tile), -1.0)
    write_tiles(out, torch.from_numpy(pixels), layout, pil=True)
    return out


def test_mostly_grey_pages_resize_exactly_like_the_full_rgb_resize(real_processor, pages):
    """The CPU path resizes grey parts as one channel and re-resizes only coloured pieces in RGB: pixel for pixel
    the plain RGB resize, on the real pages (grey, a few coloured links, a colour figure) and on a grey page with
    colour patches on piece and tile borders, at tile sizes that GREY_PIECES does and does not divide."""
    spec = ImageSpec.from_processor(real_processor)
    for page in pages:
        pixels = np.array(page)
        layout = spec.layout(*pixels.shape[:2])
        assert torch.equal(cpu_tiles(pixels, layout, spec.tile), full_rgb_tiles(pixels, layout, spec.tile))
    grey = np.array(pages[1].crop((0, 0, 400, 500)).convert("L").convert("RGB"))
    patched = grey.copy()
    patched[0:3, 0:3] = (255, 0, 0)
    patched[247:252, 198:203] = (0, 0, 255)  # the middle: a tile corner for 2 x 2 tiles
    patched[490:500, 100:110] = (0, 200, 0)
    for tile, longest_edge in ((256, 512), (64, 256), (30, 100), (128, 128)):
        spec = ImageSpec(longest_edge, tile, split=True, rescale_factor=1 / 255, mean=(0.5,) * 3, std=(0.5,) * 3)
        layout = spec.layout(*grey.shape[:2])
        for pixels in (grey, patched):
            assert torch.equal(cpu_tiles(pixels, layout, tile), full_rgb_tiles(pixels, layout, tile)), (tile, layout)


def test_batch_pads_like_the_stock_collate(real_processor, pages):
    """Two samples with 17 and 5 tiles: padding tiles all zero, masks False there, as collate does for stock."""
    images = [[pages[0]], [crop(pages[0], 1000, 60)]]
    spec = ImageSpec.from_processor(real_processor)
    stock = collate([encode_conversation(real_processor, TURNS, i) for i in images], pad_id=0)
    fast = collate([encode_conversation_fast(real_processor, TURNS, i, spec) for i in images], pad_id=0)
    pixel_values, mask = batch_pixel_values(fast["images"], fast["image_layouts"], fast["image_spec"], "cpu")
    assert pixel_values.shape == stock["pixel_values"].shape == (2, 17, 3, 512, 512)
    assert torch.equal(mask, stock["pixel_attention_mask"])
    assert not pixel_values[1, 5:].any() and pixel_values[1, :5].abs().sum(dim=(1, 2, 3)).all()
    assert torch.equal(fast["input_ids"], stock["input_ids"])


def test_no_images_no_pixel_values(real_processor):
    spec = ImageSpec.from_processor(real_processor)
    example = encode_conversation_fast(real_processor, TURNS, [], spec)
    assert "images" not in example and torch.equal(
        example["input_ids"], encode_conversation(real_processor, TURNS, [])["input_ids"]
    )
    assert batch_pixel_values([[]], [[]], spec, "cpu") == (None, None)


@pytest.mark.parametrize("edge", [None, 700])
def test_lengths_from_headers_equal_the_encoded_lengths(real_processor, pages, tmp_path, edge):
    """(tokens, tiles) counted up front from image sizes equal what the encoders produce. With a 700 px long edge,
    a 700 x 500 image is where transformers' own ``get_number_of_image_patches`` (and so ``count_tokens``) says
    1 x 2 tiles while the processor makes 2 x 2."""
    cases = [[(1224, 1584)], [(8, 8)], [(1000, 60), (612, 792)], [(700, 500)], []]
    samples, expected = [], []
    for n, sizes in enumerate(cases):
        paths = []
        for k, size in enumerate(sizes):
            paths.append(tmp_path / f"{n}_{k}.png")
            crop(pages[0], *size).save(paths[-1])
        samples.append(Sample(id=str(n), dataset="d", images=tuple(paths), turns=TURNS))
        encoded = encode_conversation(real_processor, TURNS, [Image.open(p).convert("RGB") for p in paths], edge)
        tiles = encoded["pixel_values"].shape[0] if sizes else 0
        expected.append((len(encoded["input_ids"]), tiles))
    assert LengthCounter(real_processor).count(samples, ImageSpec.from_processor(real_processor, edge)) == expected


def test_unsupported_processor_settings_point_to_the_stock_path(real_processor):
    image_processor = real_processor.image_processor
    image_processor.do_normalize = False
    try:
        with pytest.raises(ValueError, match="image_path=stock"):
            ImageSpec.from_processor(real_processor)
    finally:
        image_processor.do_normalize = True


def test_fast_batches_through_worker_processes_give_the_stock_loss(tmp_path):
    """build_data's defaults (fast path, length grouping) through a real worker process, then ``model_inputs``
    tiling on the device: the tiny model's loss equals the stock path's (solid-colour pages resize exactly)."""
    from fixture_data import good_dataset

    from granite_docling.data.loading import make_loader
    from granite_docling.loss import TokenLoss
    from granite_docling.model import load_model_and_processor
    from granite_docling.optimization import model_inputs

    path = good_dataset(tmp_path / "data", 4)
    overrides = ["model=tiny", "dataset=[folder]", f"dataset.folder.path={path}", "data.val_ratio=0",
                 "training.batch_size=4", "training.gradient_accumulation_steps=1"]  # fmt: skip
    torch.manual_seed(0)
    model, processor = load_model_and_processor(compose_config(*overrides).model)
    loss_module = TokenLoss(model).eval()
    losses = {}
    for image_path in ("fast", "stock"):
        data = data_of(compose_config(*overrides, f"data.image_path={image_path}"), processor)
        data.train_sampler.set_epoch(0)
        loader = make_loader(data.train, data.train_sampler, 4, num_workers=1, pad_id=processor.tokenizer.pad_token_id)
        (batch,) = list(loader)
        assert ("images" in batch) == (image_path == "fast")
        with torch.no_grad():
            losses[image_path] = loss_module(**model_inputs(batch, torch.device("cpu")))
    assert losses["fast"][1] == losses["stock"][1]
    torch.testing.assert_close(losses["fast"][0], losses["stock"][0], rtol=1e-5, atol=1e-4)


def test_the_accelerator_path_makes_the_same_tiles_as_the_cpu_path(real_processor, pages):
    """write_tiles with torch's Lanczos (what runs on a GPU), here on the CPU, against the PIL path."""
    from granite_docling.data.image_tiles import write_tiles

    spec = ImageSpec.from_processor(real_processor)
    for page in (pages[0], crop(pages[0], 1000, 60)):
        layout = spec.layout(page.height, page.width)
        pixels = torch.from_numpy(np.array(page))
        by_pil, by_torch = (torch.empty(layout.tiles, 3, spec.tile, spec.tile) for _ in range(2))
        write_tiles(by_pil, pixels, layout, pil=True)
        write_tiles(by_torch, pixels, layout, pil=False)
        difference = (by_pil - by_torch).abs()
        assert difference.max() <= 2 and difference.mean() < 0.01
