"""The validation split: a pure function of (seed, source name, number of records).

The same records are held out on every run and every process, and by ``evaluate.py eval.split=val``, which
calls the same function on the same index. Positions are record numbers of the source's index, kept in order.
Training scores at most ``data.val_max_samples`` of each source's held-out records (:func:`scored_validation`);
the rest stay held out, never trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def seeded_rng(*parts: object) -> np.random.Generator:
    """A numpy generator seeded by any printable parts (no global state touched)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def split_positions(size: int, val_ratio: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) record positions: a seeded random ``val_ratio`` share held out, at least one when > 0."""
    everything = np.arange(size, dtype=np.int64)
    if val_ratio <= 0 or size < 2:
        return everything, np.empty(0, dtype=np.int64)
    n_val = min(size - 1, max(1, round(size * val_ratio)))
    held_out = np.zeros(size, dtype=bool)
    held_out[seeded_rng(seed, name, "validation").permutation(size)[:n_val]] = True
    return everything[~held_out], everything[held_out]


def scored_validation(val: np.ndarray, cap: int | None, seed: int, name: str) -> np.ndarray:
    """The held-out positions a validation scores: all of ``val``, or a seeded ``cap`` of them (in order), so a
    validation costs the same however large the dataset. A pure function of (seed, name, val): the same samples
    on every run and every process."""
    if cap is None or len(val) <= cap:
        return val
    chosen = seeded_rng(seed, name, "scored validation").permutation(len(val))[:cap]
    return val[np.sort(chosen)]


def split_validation(samples: Sequence, val_ratio: float, seed: int, name: str) -> tuple[list, list]:
    """:func:`split_positions` applied to a list (small in-memory sources, tests)."""
    train, val = split_positions(len(samples), val_ratio, seed, name)
    return [samples[i] for i in train], [samples[i] for i in val]
