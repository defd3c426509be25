"""benchmarks/metric_speed.py in its smallest mode: on a long real page the library-backed metrics give the
scores of the hand-written ones they replaced, and apted gives our TEDS."""

import json
import subprocess

import pytest

from tests.conftest import REPO, run_script


def test_long_page_scores_are_unchanged_by_the_metric_libraries():
    baseline = "73cd0e3bf81b2062faa0e887797e824df939b486"
    if subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", baseline], capture_output=True).returncode != 0:
        pytest.skip("the benchmark's baseline commit is not in this checkout's git history")
    quickest = ("--repeats", "1", "--min-seconds", "0", "--table-copies", "1", "--no-tokens")
    done = run_script("benchmarks/metric_speed.py", "--json", *quickest)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["markdown_words"] > 1500 and result["boxes"] > 20 and len(result["table_cells"]) == 2
    assert set(result["metrics"]) == {"edit_distance", "bleu", "text_metrics", "teds", "map"}
    for name, row in result["metrics"].items():
        assert row["max_difference"] < 1e-12, name
        assert row["ratio"] > 0
    teds = result["metrics"]["teds"]
    assert teds["new_value"] == pytest.approx(teds["apted_value"], abs=1e-12)
    assert 0 < teds["new_value"][0] < 1  # the perturbed tables do not score perfectly
