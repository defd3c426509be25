"""Length-grouped batching: EpochSampler's contract (pure order, equal shards, exact resume) and little padding."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from conftest import compose_config
from fixture_data import good_dataset
from torch.utils.data import DataLoader

from granite_docling.data.grouping import grouped_batches, padding_fraction, sample_lengths
from granite_docling.data.image_tiles import ImageSpec
from granite_docling.data.loading import EpochSampler, LengthGroupedSampler, build_data, epoch_order
from granite_docling.data.readers import ReadOptions, read_dataset


def page_like_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """A real-docs-like mix: 1,088 (16-tile pages) or 832 (12-tile) image tokens plus answers of 2 to 2,933 tokens,
    median ~760 (lognormal), plus a few formula-crop-like short samples."""
    rng = random.Random(seed)
    lengths = []
    for _ in range(n):
        if rng.random() < 0.1:
            lengths.append((rng.randint(300, 420), 5))
        else:
            tiles = rng.choice([17, 13])
            answer = min(2933, max(2, int(rng.lognormvariate(6.6, 0.8))))
            lengths.append((answer + 64 * (tiles - 1) + 80, tiles))
    return lengths


def sampler(lengths, rank=0, world_size=1, batch_size=8, sizes=None, weights=None, seed=0):
    sizes = sizes or [len(lengths)]
    return LengthGroupedSampler(lengths, sizes, weights or [None] * len(sizes), seed, batch_size, rank, world_size)


def test_order_is_a_pure_function_of_seed_and_epoch():
    lengths = page_like_lengths(300)
    first = sampler(lengths)
    first.set_epoch(2)
    again = sampler(lengths)
    again.set_epoch(2)
    assert list(first) == list(again)
    again.set_epoch(3)
    assert list(again) != list(first)
    other_seed = sampler(lengths, seed=1)
    other_seed.set_epoch(2)
    assert list(other_seed) != list(first)


def test_an_epoch_holds_the_same_samples_as_epoch_order_with_a_mixture():
    lengths = page_like_lengths(150)
    grouped = sampler(lengths, sizes=[100, 50], weights=[1.0, 1.0])
    grouped.set_epoch(1)
    assert Counter(grouped) == Counter(epoch_order([100, 50], [1.0, 1.0], seed=0, epoch=1))


@pytest.mark.parametrize(("n", "world_size", "batch_size"), [(203, 2, 8), (203, 3, 4), (37, 2, 8), (64, 4, 2)])
def test_shards_are_disjoint_with_equal_batches_and_cover_the_epoch(n, world_size, batch_size):
    lengths = page_like_lengths(n)
    shards = [sampler(lengths, r, world_size, batch_size) for r in range(world_size)]
    batches = [s.batches() for s in shards]
    sizes = [[len(b) for b in rank_batches] for rank_batches in batches]
    assert all(s == sizes[0] for s in sizes)  # same number of batches, same sizes: no process waits for another
    assert all(size == batch_size for size in sizes[0][:-1])  # only the epoch's last batch may be short
    flat = [i for rank_batches in batches for batch in rank_batches for i in batch]
    assert len(flat) == len(set(flat)) == n - n % world_size
    assert all(len(s) == (n - n % world_size) // world_size for s in shards)  # EpochSampler's __len__
    assert set(flat) <= set(epoch_order([n], [None], 0, 0))


def test_resume_at_a_batch_gives_the_rest_of_the_epoch():
    lengths = page_like_lengths(100)
    full = sampler(lengths, batch_size=8)
    full.set_epoch(4)
    order = list(full)
    resumed = sampler(lengths, batch_size=8)
    resumed.set_epoch(4, start=3 * 8)  # after three batches
    assert list(resumed) == order[24:] and len(resumed) == len(order) - 24
    resumed.set_epoch(4, start=len(order))  # a checkpoint written after the epoch's short last batch
    assert list(resumed) == []
    with pytest.raises(ValueError, match="batch boundary"):
        resumed.set_epoch(4, start=5)


def test_the_dataloader_batches_are_the_grouped_batches():
    lengths = page_like_lengths(61)
    grouped = sampler(lengths, batch_size=8)
    grouped.set_epoch(0)
    loader = DataLoader(list(range(61)), batch_size=8, sampler=grouped, collate_fn=list)
    assert list(loader) == grouped.batches()


def test_padding_is_under_ten_percent_at_batch_8_and_random_batching_pads_far_more():
    lengths = page_like_lengths(2000)
    tokens = [t for t, _ in lengths]
    grouped = sampler(lengths)
    plain = EpochSampler([len(lengths)], [None], seed=0)
    grouped_padding, random_padding = [], []
    for epoch in range(3):
        grouped.set_epoch(epoch)
        plain.set_epoch(epoch)
        shard = plain.shard()
        grouped_padding.append(padding_fraction(grouped.batches(), tokens))
        random_padding.append(padding_fraction([shard[i : i + 8] for i in range(0, len(shard), 8)], tokens))
    assert max(grouped_padding) < 0.10
    assert min(random_padding) > 3 * max(grouped_padding)


def test_batch_lengths_do_not_trend_through_the_epoch():
    lengths = page_like_lengths(2000)
    grouped = sampler(lengths)
    grouped.set_epoch(0)
    longest = torch.tensor([max(lengths[i][0] for i in batch) for batch in grouped.batches()], dtype=torch.float)
    position = torch.arange(len(longest), dtype=torch.float)
    correlation = torch.corrcoef(torch.stack([position, longest]))[0, 1]
    assert abs(correlation) < 0.2
    first_half, second_half = longest[: len(longest) // 2].mean(), longest[len(longest) // 2 :].mean()
    assert abs(first_half - second_half) < 0.15 * longest.mean()


def test_grouped_batches_put_similar_lengths_together_per_process():
    order = list(range(64))
    random.Random(0).shuffle(order)
    lengths = [(i * 10, 1) for i in range(64)]
    batches = grouped_batches(order, lengths, batch_size=4, world_size=2, seed=0, epoch=0, window_batches=8)
    for global_batch in batches:
        for batch in global_batch:  # one window holds everything: consecutive lengths in every batch
            assert max(batch) - min(batch) == 3


def test_sample_lengths_are_cached(tmp_path, tiny_processor):
    samples, _ = read_dataset(good_dataset(tmp_path / "data", 6), "d", ReadOptions())
    spec = ImageSpec.from_processor(tiny_processor)
    cache = tmp_path / "cache"
    counted = sample_lengths(tiny_processor, samples, spec, cache, min_cached=1)
    (entry,) = cache.iterdir()
    entry.write_text("[[1, 2]" + ", [1, 2]" * 5 + "]")  # a cached entry is read, not recounted
    assert sample_lengths(tiny_processor, samples, spec, cache, min_cached=1) == [(1, 2)] * 6
    other_spec = ImageSpec.from_processor(tiny_processor, 64)  # different settings: a different entry
    assert sample_lengths(tiny_processor, samples, other_spec, cache, min_cached=1) != counted
    assert len(list(cache.iterdir())) == 2


def test_build_data_groups_by_default_and_the_switch_restores_the_plain_sampler(tmp_path, tiny_processor):
    path = good_dataset(tmp_path / "data", 12)
    overrides = ["model=tiny", "dataset=[folder]", f"dataset.folder.path={path}", "training.batch_size=4"]
    grouped = build_data(compose_config(*overrides), tiny_processor)
    assert isinstance(grouped.train_sampler, LengthGroupedSampler)
    assert grouped.train.image_path == "fast"
    plain = build_data(compose_config(*overrides, "training.length_grouping=false", "training.image_path=stock"),
                       tiny_processor)  # fmt: skip
    assert type(plain.train_sampler) is EpochSampler and plain.train.image_path == "stock"
    grouped.train_sampler.set_epoch(0)
    plain.train_sampler.set_epoch(0)
    assert sorted(grouped.train_sampler) == sorted(plain.train_sampler)
