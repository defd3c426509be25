"""Bad samples, reported once: a summary line for the log and one JSON line each in the run's bad_samples.jsonl.

Records found bad while indexing are reported at the start; images that fail to decode come out of the workers
as :class:`Problem` entries in the batch, for the loop to list here once (a resumed run lists none twice).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from granite_docling.data.sample import REASONS, Problem


def summarise(problems: Iterable[Problem]) -> str:
    """'3 bad samples skipped: 2 missing_image, 1 invalid_json' (empty when there are none)."""
    counts = Counter(p.reason for p in problems)
    if not counts:
        return ""
    parts = ", ".join(f"{n} {reason}" for reason, n in counts.most_common())
    return f"{sum(counts.values())} bad sample(s) skipped: {parts}"


def append_problems(path: Path, problems: Iterable[Problem], seen: set[tuple[str, str]] | None = None) -> int:
    """Append one JSON line per problem to ``path`` (the run's bad_samples.jsonl), skipping those in ``seen``
    (which it updates): each bad sample is listed once. Returns how many were new."""
    new = []
    for problem in problems:
        key = (problem.dataset, problem.file)
        if seen is None or key not in seen:
            new.append(problem)
            if seen is not None:
                seen.add(key)
    if new:
        with path.open("a", encoding="utf-8") as f:
            for problem in new:
                f.write(json.dumps({**problem.to_dict(), "meaning": REASONS.get(problem.reason, "")}) + "\n")
    return len(new)


def listed_problems(path: Path) -> set[tuple[str, str]]:
    """(dataset, file) of every problem already in ``path`` (a resumed run lists none twice)."""
    if not path.is_file():
        return set()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(row["dataset"], row["file"]) for row in rows}
