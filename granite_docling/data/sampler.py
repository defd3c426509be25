"""The order of training: one global sample order per epoch, cut into optimizer steps, served to each process.

* :func:`epoch_order` is a pure function of (seed, epoch) over the concatenated sources, mixture weights
  included. It does not depend on the number of processes, the batch size or the accumulation.
* With length grouping (the default), :func:`grouped_order` reorders it so that runs of :data:`BLOCK` samples
  have similar (tokens, tiles): windows of :data:`WINDOW` samples are sorted by length, cut into blocks, and the
  blocks shuffled. Still a function of (seed, epoch) and the lengths only.
* Whenever the lengths are known, the epoch starts with its longest sample (:func:`longest_first`): the block
  that holds it leads, longest first (without grouping the sample swaps places with the first), so a run that
  cannot fit its longest sample fails at its first step, not hours in at the end of an epoch. Where another
  micro-batch ahead is heavier (a run resumed mid-epoch, a token budget), the loop's memory probe trains it
  before the first step (:meth:`GlobalBatchSampler.heaviest_batch`).
* :class:`GlobalBatchSampler` cuts the order into steps of ``batch_size x accumulation x processes`` samples (the
  global batch). A step's samples are sorted by length and cut into micro-batches: ``batch_size`` samples each,
  or, with a token budget (``data.batch_tokens``), as many consecutive samples as fit the budget in padded
  tokens (image tokens included; :func:`pack_by_tokens`), so that one micro-batch holds many formula crops or one
  long document. Micro-batch ``k`` goes to process ``k % processes`` as its micro-step ``k // processes``: at
  each micro-step the processes hold batches of similar length. Every process runs as many micro-steps as the
  process with the most; one whose micro-batch is missing gets an empty batch (the loop backpropagates a zero
  loss, keeping the processes in step). The epoch's last step may be smaller.

An optimizer step is always the global batch of samples, with or without a budget: the budget decides only how
a step's samples are cut into forward passes. The loss is normalised over the whole step's supervised tokens, so a
step's gradient is that of one batch of its samples, however they are cut and however many processes share them.

The position is the number of samples of the global order consumed in the epoch. A run resumed on another number
of processes continues the same order from there: with the same global batch, every step holds the same samples
as the uninterrupted run's (and so the same loss); with another, the steps are cut differently from the same
position, nothing repeated, nothing skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import Sampler

from granite_docling.data.split import seeded_rng

BLOCK = 64  # samples of similar length kept together; larger packs tighter, smaller varies batch company more
WINDOW = 64 * BLOCK  # samples sorted together


@dataclass(frozen=True)
class BatchPlan:
    """The five run values that cut the samples into optimizer steps and share them out: from ``training.*`` and
    the accelerator, given once to ``build_data`` and passed down to the sampler or the stream."""

    seed: int  # training.seed: draws the validation split and the order
    batch_size: int  # samples per micro-batch (training.batch_size)
    accumulation: int = 1  # micro-batches per optimizer step (training.gradient_accumulation_steps)
    rank: int = 0  # this process
    world_size: int = 1  # processes


def mixture_counts(sizes: Sequence[int], weights: Sequence[float | None]) -> list[int]:
    """Samples per epoch from each source. No weights: every sample once. With weights: an epoch keeps the total
    size and gives source i the share ``w_i / sum(w)``; sources without a weight count at their natural share."""
    total = sum(sizes)
    if all(w is None for w in weights) or total == 0:
        return list(sizes)
    shares = [w if w is not None else size / total for w, size in zip(weights, sizes, strict=True)]
    return [round(total * share / sum(shares)) if size else 0 for share, size in zip(shares, sizes, strict=True)]


def epoch_order(sizes: Sequence[int], weights: Sequence[float | None], seed: int, epoch: int) -> np.ndarray:
    """Indices into the concatenated sources for one epoch, shuffled; a pure function of (seed, epoch)."""
    rng = seeded_rng(seed, epoch, "order")
    parts = []
    offset = 0
    for size, count in zip(sizes, mixture_counts(sizes, weights), strict=True):
        cycles = [rng.permutation(size) + offset for _ in range(math.ceil(count / size))] if size else []
        parts.append(np.concatenate(cycles)[:count] if cycles else np.empty(0, dtype=np.int64))
        offset += size  # a source drawn more often than its size goes round again, reshuffled
    order = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    return order[rng.permutation(len(order))]


def pack_by_tokens(tokens: Sequence[int], budget: int) -> list[int]:
    """Sizes of consecutive micro-batches over samples of ``tokens`` (sorted by length): each as long as its
    padded size (samples x the longest) stays within ``budget``. A sample longer than the budget goes alone."""
    sizes: list[int] = []
    count = 0
    longest = 0
    for length in tokens:
        if count and max(longest, int(length)) * (count + 1) > budget:
            sizes.append(count)
            count = 0
            longest = 0
        count += 1
        longest = max(longest, int(length))
    if count:
        sizes.append(count)
    return sizes


def by_length(indices: np.ndarray, tokens: np.ndarray, tiles: np.ndarray) -> np.ndarray:
    """``indices`` sorted by (tokens, tiles); ties keep their order (a stable sort)."""
    return indices[np.lexsort((tiles[indices], tokens[indices]))]


def grouped_order(
    order: np.ndarray,
    tokens: np.ndarray,
    tiles: np.ndarray,
    seed: int,
    epoch: int,
    block: int = BLOCK,
    window: int = WINDOW,
) -> np.ndarray:
    """``order`` regrouped into blocks of ``block`` samples of similar length, in shuffled block order; the one
    short block an epoch may have comes last. 7 parameters: the algorithm's inputs (the order, the lengths it
    groups by, the (seed, epoch) that shuffles the blocks) and its two sizes, which tests shrink."""
    blocks = []
    for start in range(0, len(order), window):
        ranked = by_length(order[start : start + window], tokens, tiles)
        blocks += [ranked[i : i + block] for i in range(0, len(ranked), block)]
    full = [b for b in blocks if len(b) == block]
    short = [b for b in blocks if len(b) < block]
    shuffled = [full[i] for i in seeded_rng(seed, epoch, "blocks").permutation(len(full))]
    return np.concatenate(longest_first(shuffled + short, tokens, tiles)) if blocks else order


def longest(order: np.ndarray, tokens: np.ndarray, tiles: np.ndarray) -> int:
    """The sample of ``order`` with the most (tokens, tiles); of equals, the last (as :func:`by_length` ranks)."""
    return int(by_length(order, tokens, tiles)[-1])


def longest_first(blocks: list[np.ndarray], tokens: np.ndarray, tiles: np.ndarray) -> list[np.ndarray]:
    """``blocks`` with the one that holds the longest sample moved to the front, its samples longest first: the
    epoch's first step holds its longest sample and those nearest to it in length."""
    top = longest(np.concatenate(blocks), tokens, tiles)
    lead = next(i for i, b in enumerate(blocks) if top in b)
    return [blocks[lead][::-1], *blocks[:lead], *blocks[lead + 1 :]]


class GlobalBatchSampler(Sampler[list[int]]):
    """This process's micro-batches (lists of dataset indices), one optimizer step after another.

    ``set_epoch(epoch, start)`` starts at global sample ``start`` of the epoch's order (see the module docstring);
    every process yields the same number of micro-batches, so no process waits for a step that never comes.
    ``plan`` gives the seed, the micro-batch size, the accumulation and this process's place among the others.
    ``lengths`` (tokens, tiles) per sample puts the longest sample first and allows length grouping
    (``group_by_length``) and ``batch_tokens``, which packs micro-batches by padded tokens instead of
    ``batch_size`` samples.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float | None],
        plan: BatchPlan,
        lengths: tuple[np.ndarray, np.ndarray] | None = None,
        group_by_length: bool = True,
        batch_tokens: int | None = None,
    ):
        self.sizes = list(sizes)
        self.weights = list(weights)
        self.seed = plan.seed
        self.batch_size = plan.batch_size
        self.accumulation = plan.accumulation
        self.rank = plan.rank
        self.world_size = plan.world_size
        self.lengths = lengths
        self.group_by_length = group_by_length and lengths is not None
        self.batch_tokens = batch_tokens
        if lengths is not None:
            assert len(lengths[0]) == len(lengths[1]) == sum(sizes), "one (tokens, tiles) per sample"
        assert batch_tokens is None or lengths is not None, "a token budget needs the samples' lengths"
        self.epoch = 0
        self.start = 0
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accumulation * self.world_size

    @property
    def epoch_size(self) -> int:
        return sum(mixture_counts(self.sizes, self.weights))

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.epoch_size / self.global_batch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def advance(self, position: int) -> int:
        """The global position after one more step from ``position``."""
        return min(self.epoch_size, position + self.global_batch)

    def order(self) -> np.ndarray:
        """The epoch's global sample order (cached for the current epoch)."""
        if self._order is None or self._order[0] != self.epoch:
            order = epoch_order(self.sizes, self.weights, self.seed, self.epoch)
            if self.group_by_length:
                order = grouped_order(order, *self.lengths, self.seed, self.epoch)
            elif self.lengths is not None and len(order):  # plain random batches: the longest swaps with the first
                first = int(np.flatnonzero(order == longest(order, *self.lengths))[0])
                order[[0, first]] = order[[first, 0]]
            self._order = (self.epoch, order)
        return self._order[1]

    def micro_batches(self, step_samples: np.ndarray) -> list[np.ndarray]:
        """One step's micro-batches over all processes, shortest first (in the order drawn without grouping or a
        budget)."""
        if self.group_by_length or self.batch_tokens is not None:
            step_samples = by_length(step_samples, *self.lengths)
        if self.batch_tokens is None:
            b = self.batch_size
            return [step_samples[k * b : (k + 1) * b] for k in range(self.accumulation * self.world_size)]
        sizes = pack_by_tokens(self.lengths[0][step_samples], self.batch_tokens)
        return np.split(step_samples, np.cumsum(sizes)[:-1]) if sizes else []

    def step_batches(self, step_samples: np.ndarray) -> list[list[int]]:
        """This process's micro-batches of one step's samples (empty lists where it has none left)."""
        batches = self.micro_batches(step_samples)
        micro_steps = math.ceil(len(batches) / self.world_size)
        mine = range(self.rank, micro_steps * self.world_size, self.world_size)  # micro-batch k -> process k % W
        return [batches[k].tolist() if k < len(batches) else [] for k in mine]

    def micro_steps(self, position: int) -> int:
        """How many micro-batches every process runs for the step that starts at global sample ``position`` (0 at
        the end of the epoch with a budget)."""
        if self.batch_tokens is None:
            return self.accumulation
        return len(self.step_batches(self.order()[position : position + self.global_batch]))

    def heaviest_batch(self, start: int = 0) -> tuple[list[int], int]:
        """This process's micro-batch with the most padded tokens (its samples x the longest of them, image tokens
        included, as :func:`pack_by_tokens` counts), of equals the one with the longest sample, then the first,
        among the steps from global sample ``start`` to the end of the epoch; and the position of its step. The
        micro-batch a memory probe trains before a run's first step; ``([], start)`` when this process has none,
        or without lengths."""
        if self.lengths is None:
            return [], start
        tokens = self.lengths[0]
        order = self.order()
        heaviest: tuple[list[int], int] = ([], start)
        weight = (0, 0)  # (padded tokens, longest sample's tokens)
        for position in range(start, len(order), self.global_batch):
            for batch in self.step_batches(order[position : position + self.global_batch]):
                longest_tokens = max((int(tokens[i]) for i in batch), default=0)
                if (len(batch) * longest_tokens, longest_tokens) > weight:
                    heaviest = (batch, position)
                    weight = (len(batch) * longest_tokens, longest_tokens)
        return heaviest

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        for position in range(self.start, len(order), self.global_batch):
            yield from self.step_batches(order[position : position + self.global_batch])

    def __len__(self) -> int:
        if self.batch_tokens is None:
            return self.accumulation * math.ceil(max(0, self.epoch_size - self.start) / self.global_batch)
        return sum(self.micro_steps(p) for p in range(self.start, self.epoch_size, self.global_batch))
