"""The loop's one data interface: steps of micro-batches with the position after each, whatever the data."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from granite_docling.data.loading import IndexedSteps, StreamedSteps
from granite_docling.data.sampler import BatchPlan, GlobalBatchSampler


def test_indexed_steps_follow_the_sampler_with_or_without_a_budget():
    tokens = np.array([300, 310, 320, 2000, 330, 340, 2100, 350, 360, 370])
    lengths = (tokens, np.full(10, 5))
    for batch_tokens in (None, 2100):
        sampler = GlobalBatchSampler([10], [None], BatchPlan(0, 1, 4), lengths=lengths, batch_tokens=batch_tokens)
        steps = IndexedSteps(SimpleNamespace(train_sampler=sampler), loader=sampler)  # the loader yields index lists
        assert steps.planned_steps(2) == [3, 3]
        epoch = list(steps.epoch(0, 0))
        assert [position for _, position in epoch] == [4, 8, 10]
        assert sorted(i for group, _ in epoch for batch in group for i in batch) == list(range(10))
        if batch_tokens is None:
            assert [len(group) for group, _ in epoch] == [4, 4, 4]  # the last step's missing samples: empty batches
        else:
            assert all(len(batch) * tokens[batch].max() <= batch_tokens for group, _ in epoch for batch in group)
        resumed = list(steps.epoch(0, 4))  # from a saved position: the same steps that were left
        assert [(g, p) for g, p in resumed] == epoch[1:]


def test_streamed_steps_end_the_epoch_where_any_process_runs_short():
    stream = SimpleNamespace(set_epoch=lambda epoch, start: None, steps_in_epoch=lambda epoch, accumulation: 2)
    loader = [{"id": k} for k in range(5)]  # 5 micro-batches: 2 full steps of 2, then one short
    seen = []

    def any_process(short: bool) -> bool:
        seen.append(short)
        return short or len(seen) == 2  # another process runs short at the second step

    steps = StreamedSteps(SimpleNamespace(train=stream), loader, 2, any_process)
    assert steps.planned_steps(3) == [2, 2, 2]
    assert list(steps.epoch(0, 0)) == [([{"id": 0}, {"id": 1}], 2)]  # every process stops at the same step
    assert seen == [False, False]
