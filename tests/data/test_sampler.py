"""The global sample order: pure, length-grouped with little padding, cut into steps that do not depend on the
number of processes (elastic resume), every process in step."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import torch
from conftest import compose_config, data_of
from fixture_data import good_dataset

from granite_docling.data.lengths import padding_fraction
from granite_docling.data.sampler import BatchPlan, GlobalBatchSampler, epoch_order, grouped_order, pack_by_tokens


def page_like_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A real-docs-like mix: 1,088 (16-tile pages) or 832 (12-tile) image tokens plus answers of 2 to 2,933 tokens,
    median ~760 (lognormal), plus a few formula-crop-like short samples."""
    rng = random.Random(seed)
    tokens, tiles = [], []
    for _ in range(n):
        if rng.random() < 0.1:
            tokens.append(rng.randint(300, 420))
            tiles.append(5)
        else:
            tile_count = rng.choice([17, 13])
            answer = min(2933, max(2, int(rng.lognormvariate(6.6, 0.8))))
            tokens.append(answer + 64 * (tile_count - 1) + 80)
            tiles.append(tile_count)
    return np.array(tokens), np.array(tiles)


def sampler(lengths, rank=0, world_size=1, batch_size=8, accumulation=1, sizes=None, weights=None, seed=0):
    sizes = sizes or [len(lengths[0])]
    plan = BatchPlan(seed, batch_size, accumulation, rank, world_size)
    return GlobalBatchSampler(sizes, weights or [None] * len(sizes), plan, lengths)


def steps(samplers: list[GlobalBatchSampler], epoch: int = 0, start: int = 0) -> list[Counter]:
    """Each step's samples over all processes (micro-batches of every process, as a multiset)."""
    per_rank = []
    for s in samplers:
        s.set_epoch(epoch, start)
        per_rank.append(list(s))
    assert len({len(batches) for batches in per_rank}) == 1, "every process yields as many micro-batches"
    accumulation = samplers[0].accumulation
    out = []
    for k in range(0, len(per_rank[0]), accumulation):
        out.append(Counter(i for batches in per_rank for batch in batches[k : k + accumulation] for i in batch))
    return out


def test_order_is_a_pure_function_of_seed_and_epoch():
    lengths = page_like_lengths(300)
    first, again = sampler(lengths), sampler(lengths)
    first.set_epoch(2)
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
    served = Counter(i for batch in grouped for i in batch)
    assert served == Counter(epoch_order([100, 50], [1.0, 1.0], seed=0, epoch=1).tolist())


def test_steps_are_the_same_whatever_the_number_of_processes_for_one_global_batch():
    lengths = page_like_lengths(203)  # not a multiple of the global batch: a short last step
    one = steps([sampler(lengths, batch_size=1, accumulation=4)])
    two = steps([sampler(lengths, rank=r, world_size=2, batch_size=1, accumulation=2) for r in range(2)])
    four = steps([sampler(lengths, rank=r, world_size=4, batch_size=1) for r in range(4)])
    two_wide = steps([sampler(lengths, rank=r, world_size=2, batch_size=2) for r in range(2)])
    assert one == two == four == two_wide
    assert len(one) == 51 and sum(one[-1].values()) == 3
    assert sum(sum(step.values()) for step in one) == 203


def test_resuming_at_a_position_continues_the_order_with_any_global_batch():
    lengths = page_like_lengths(200)
    full = steps([sampler(lengths, batch_size=2, accumulation=2)])  # global batch 4
    resumed = steps([sampler(lengths, rank=r, world_size=2, batch_size=2) for r in range(2)], start=40)
    assert resumed == full[10:]  # 2 processes, same global batch: the same steps
    wider = steps([sampler(lengths, rank=r, world_size=2, batch_size=3) for r in range(2)], start=40)
    seen_before = sum(full[:10], Counter())
    after = sum(wider, Counter())
    assert seen_before + after == Counter(range(200))  # another global batch: nothing repeated, nothing skipped


def test_at_each_micro_step_the_processes_hold_batches_of_similar_length():
    lengths = page_like_lengths(4096)
    ranks = [sampler(lengths, rank=r, world_size=4, batch_size=2) for r in range(4)]
    for s in ranks:
        s.set_epoch(0)
    spread = [np.ptp([lengths[0][i] for batch in micro for i in batch]) for micro in zip(*ranks, strict=True)]
    assert np.median(spread) < 0.1 * np.median(lengths[0])


def test_padding_is_under_ten_percent_at_batch_8_and_random_batching_pads_far_more():
    lengths = page_like_lengths(2000)
    tokens = lengths[0].tolist()
    grouped, plain = sampler(lengths), GlobalBatchSampler([2000], [None], BatchPlan(0, 8))
    grouped_padding, random_padding = [], []
    for epoch in range(3):
        grouped.set_epoch(epoch)
        plain.set_epoch(epoch)
        grouped_padding.append(padding_fraction(list(grouped), tokens))
        random_padding.append(padding_fraction(list(plain), tokens))
    assert max(grouped_padding) < 0.10
    assert min(random_padding) > 3 * max(grouped_padding)


def test_batch_lengths_do_not_trend_through_the_epoch():
    lengths = page_like_lengths(2000)
    grouped = sampler(lengths)
    grouped.set_epoch(0)
    longest = torch.tensor([max(lengths[0][i] for i in batch) for batch in grouped], dtype=torch.float)
    position = torch.arange(len(longest), dtype=torch.float)
    correlation = torch.corrcoef(torch.stack([position, longest]))[0, 1]
    assert abs(correlation) < 0.2
    first_half, second_half = longest[: len(longest) // 2].mean(), longest[len(longest) // 2 :].mean()
    assert abs(first_half - second_half) < 0.15 * longest.mean()


def test_grouped_order_puts_similar_lengths_into_blocks():
    order = np.random.default_rng(0).permutation(64)
    tokens, tiles = np.arange(64) * 10, np.ones(64, dtype=int)
    grouped = grouped_order(order, tokens, tiles, seed=0, epoch=0, block=8, window=64)
    assert sorted(grouped.tolist()) == list(range(64))
    for start in range(0, 64, 8):  # one window holds everything: consecutive lengths in every block
        block = grouped[start : start + 8]
        assert block.max() - block.min() == 7


def test_build_data_groups_by_default_and_the_switch_restores_plain_batches(tmp_path, tiny_processor):
    path = good_dataset(tmp_path / "data", 12)
    overrides = ["model=tiny", "dataset=[folder]", f"dataset.folder.path={path}", "training.batch_size=4"]
    grouped = data_of(compose_config(*overrides), tiny_processor)
    assert grouped.train_sampler.lengths is not None and grouped.train.encoder.image_path == "fast"
    plain = data_of(compose_config(*overrides, "data.length_grouping=false", "data.image_path=stock"),
                       tiny_processor)  # fmt: skip
    assert not plain.train_sampler.group_by_length and plain.train.encoder.image_path == "stock"
    grouped.train_sampler.set_epoch(0)
    plain.train_sampler.set_epoch(0)
    assert sorted(i for b in grouped.train_sampler for i in b) == sorted(i for b in plain.train_sampler for i in b)


def test_pack_by_tokens_fills_each_micro_batch_up_to_the_budget_in_padded_tokens():
    assert pack_by_tokens([100, 100, 150, 200, 900, 2000], budget=600) == [3, 1, 1, 1]  # 3 x 150, 200, 900, 2000
    assert pack_by_tokens([300] * 7, budget=2100) == [7]
    assert pack_by_tokens([300] * 7, budget=2099) == [6, 1]
    assert pack_by_tokens([5000], budget=4000) == [1]  # longer than the budget: alone
    assert pack_by_tokens([], budget=10) == []


def seed_like_mix(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mostly formula crops (300-420 tokens, 5 tiles) with real-docs-like pages among them, as in the seed's mix."""
    rng = np.random.default_rng(seed)
    tokens, tiles = page_like_lengths(n, seed)
    crops = rng.random(n) < 0.8
    tokens[crops] = rng.integers(300, 421, crops.sum())
    tiles[crops] = 5
    return tokens, tiles


def budget_sampler(lengths, rank=0, world_size=1, batch_tokens=None, accumulation=8):
    plan = BatchPlan(0, 1, accumulation // world_size, rank, world_size)
    return GlobalBatchSampler([len(lengths[0])], [None], plan, lengths, batch_tokens=batch_tokens)


def budget_steps(budgeted: GlobalBatchSampler) -> list[Counter]:
    """Each step's samples, cut where :meth:`micro_steps` says (as the loop does)."""
    budgeted.set_epoch(0)
    batches, out = iter(budgeted), []
    for position in range(0, budgeted.epoch_size, budgeted.global_batch):
        step = [next(batches) for _ in range(budgeted.micro_steps(position))]
        out.append(Counter(i for batch in step for i in batch))
    assert next(batches, None) is None
    return out


def test_a_token_budget_cuts_the_same_steps_into_fewer_micro_batches_within_the_budget():
    lengths = seed_like_mix(800)
    budget = int(lengths[0].max())  # the longest sample's padded length
    plain, packed = budget_sampler(lengths), budget_sampler(lengths, batch_tokens=budget)
    assert budget_steps(packed) == steps([plain])  # a step is the same samples: only the cut differs
    batches = list(packed)
    assert all(len(b) * lengths[0][b].max() <= budget for b in batches if b)
    assert len(batches) * 4 <= len(list(plain))  # at least 4x fewer forward / backward passes than batch 1
    assert len(packed) == len(batches)


def test_a_budgeted_step_holds_the_same_micro_batches_on_any_number_of_processes():
    lengths = seed_like_mix(400)

    def micro_batches(world_size: int) -> list[set]:
        samplers = [budget_sampler(lengths, r, world_size, batch_tokens=2500) for r in range(world_size)]
        per_rank = []
        for s in samplers:
            s.set_epoch(1, 24)  # resumed mid-epoch
            per_rank.append(list(s))
        assert len({len(batches) for batches in per_rank}) == 1, "every process yields as many micro-batches"
        return [{tuple(b) for batches in per_rank for b in batches if b}]

    assert micro_batches(1) == micro_batches(2) == micro_batches(4)
    one = budget_sampler(lengths, batch_tokens=2500)
    one.set_epoch(1, 24)
    two = budget_sampler(lengths, 1, 2, batch_tokens=2500)
    two.set_epoch(1, 24)
    assert [one.micro_steps(p) for p in (24, 32)] == [len(one.step_batches(one.order()[p : p + 8])) for p in (24, 32)]
    assert two.micro_steps(len(lengths[0])) == 0  # the end of the epoch


def test_every_epoch_starts_with_its_longest_sample_though_it_sorts_into_the_last_length_group():
    tokens = np.array([100 + i for i in range(70)])  # 70 samples: a full block of the 64 shortest, then 6 longer
    tiles = np.full(70, 5)
    tokens[[13, 40]] = [900, 900]  # two of 900 tokens: the one with more image tiles leads
    tiles[40] = 6
    for epoch in range(3):
        grouped = sampler((tokens, tiles), batch_size=2, accumulation=2)
        grouped.set_epoch(epoch)
        order = grouped.order()
        assert order[0] == 40 and sorted(order.tolist()) == list(range(70))
        assert set(order[:6].tolist()) == {40, 13, 69, 68, 67, 66}  # its block of the longest, longest first
        assert tokens[order[:6]].tolist() == [900, 900, 169, 168, 167, 166]
        plain = GlobalBatchSampler([70], [None], BatchPlan(0, 2, 2), lengths=(tokens, tiles), group_by_length=False)
        plain.set_epoch(epoch)
        drawn = epoch_order([70], [None], seed=0, epoch=epoch)
        where = int(np.flatnonzero(drawn == 40)[0])
        drawn[[0, where]] = drawn[[where, 0]]  # without grouping: the longest swaps places with the first
        assert plain.order().tolist() == drawn.tolist()
        assert next(iter(plain)) == drawn[:2].tolist()  # its batches keep the drawn order


def test_the_heaviest_batch_is_the_most_padded_tokens_from_a_position_on_every_process():
    lengths = seed_like_mix(400)
    for batch_tokens, world_size in ((None, 1), (2500, 1), (2500, 2), (None, 4)):
        samplers = [budget_sampler(lengths, r, world_size, batch_tokens=batch_tokens) for r in range(world_size)]
        for start in (0, 24, 392):
            for s in samplers:
                s.set_epoch(1, start)
                batches = [b for b in s if b]
                weights = [(len(b) * int(lengths[0][b].max()), int(lengths[0][b].max())) for b in batches]
                heaviest, position = s.heaviest_batch(start)
                assert heaviest == batches[weights.index(max(weights))]  # of equals, the first
                assert heaviest in s.step_batches(s.order()[position : position + s.global_batch])
    crops_and_a_page = (np.array([400] * 20 + [3000]), np.array([5] * 20 + [17]))
    packed = GlobalBatchSampler([21], [None], BatchPlan(0, 1, 21), lengths=crops_and_a_page, batch_tokens=8000)
    packed.set_epoch(0)
    assert len(packed.heaviest_batch()[0]) == 20  # 20 crops are 8,000 padded tokens, the page alone 3,000
    assert packed.heaviest_batch(21) == ([], 21)  # nothing left in the epoch
