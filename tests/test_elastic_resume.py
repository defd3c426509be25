"""Elastic resume: a run continued on another number of processes trains the same global sample order.

With the global batch kept (batch x accumulation x processes = 4), the per-step losses of 2 -> 1 and 1 -> 2
process runs equal the uninterrupted 1-process run's; torchrun on CPU (gloo). The index is built once: the log
says which process built it and that the other reused it.
"""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO, run_script
from fixture_data import good_dataset, to_hub_rows


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return good_dataset(tmp_path_factory.mktemp("elastic"), 24)  # 6 steps per epoch: resumes mid-epoch


def train(data, run_dir, processes: int, max_steps: int, *extra: str, accumulation: int | None = None):
    accumulation = accumulation or 4 // processes  # global batch 4 on either shape
    overrides = ["experiment=quick", f"dataset.sample.path={data}", f"training.max_steps={max_steps}",
                 "training.batch_size=1", f"training.gradient_accumulation_steps={accumulation}",
                 "data.val_ratio=0", "data.num_workers=0", "training.save_steps=4", "training.warmup_steps=0",
                 "training.min_lr=3e-3", "training.log_interval=1", f"hydra.run.dir={run_dir}", *extra]  # fmt: skip
    launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] if processes > 1 else []
    result = run_script(*launch, str(REPO / "train.py"), *overrides, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference")
    train(data, run_dir, 1, 8)
    return losses(run_dir)


# 2 -> 1 with a token budget in the default run; without one, and 1 -> 2 (same code path, the other way), with
# make test-slow, to keep make test short.
# With a token budget (data.batch_tokens) a step holds the same samples, cut into fewer micro-batches: the
# losses are those of the uninterrupted run without a budget.
@pytest.mark.parametrize(
    ("before", "after", "batch_tokens"),
    [
        pytest.param(2, 1, None, marks=pytest.mark.slow),  # the budgeted 2 -> 1 below takes the same resume path
        pytest.param(1, 2, None, marks=pytest.mark.slow),
        (2, 1, 200),
        pytest.param(1, 2, 200, marks=pytest.mark.slow),
    ],
)
def test_resume_on_another_number_of_processes_gives_the_same_losses(
    data, tmp_path, uninterrupted, before, after, batch_tokens
):
    budget = f"data.batch_tokens={batch_tokens or 'null'}"
    first = train(data, tmp_path / "first", before, 4, f"data.index_cache_dir={tmp_path / 'cache'}", budget)
    if before == 2:  # a fresh cache: one of the two processes builds the index, the other waits and maps it
        log = (tmp_path / "first" / "train.log").read_text() + (tmp_path / "first" / "train_rank1.log").read_text()
        built = re.findall(r"data index sample: rank (\d) built 24 records", log)
        reused = re.findall(r"data index sample: rank (\d) reused \S+ \(24 records, built by rank (\d)", log)
        assert len(built) == 1 and len(reused) == 1 and reused[0] == (str(1 - int(built[0])), built[0])
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint_step_4"
    resumed = train(data, tmp_path / "second", after, 8, f"training.resume={checkpoint}", budget)
    output = resumed.stdout + resumed.stderr
    assert "at step 4" in output and f"instead of {before} with the same global batch of 4" in output
    assert first.returncode == 0
    got = losses(tmp_path / "first") | losses(tmp_path / "second")
    assert sorted(got) == sorted(uninterrupted) == list(range(1, 9))
    for step, loss in uninterrupted.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), f"step {step}"


@pytest.mark.slow  # make test-slow: the default run stays under 10 minutes
def test_a_token_budget_resumes_exactly_on_the_same_processes(data, tmp_path, uninterrupted):
    budget = "data.batch_tokens=200"  # ~2 samples per micro-batch
    train(data, tmp_path / "first", 1, 4, budget)
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint_step_4"
    train(data, tmp_path / "second", 1, 8, f"training.resume={checkpoint}", budget)
    rows = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert {row["train/micro_batches"] for row in rows if "train/loss" in row} == {2}  # not 4: packed
    got = losses(tmp_path / "first") | losses(tmp_path / "second")
    assert sorted(got) == list(range(1, 9))
    for step, loss in uninterrupted.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


@pytest.mark.slow  # make test-slow: the default run stays under 10 minutes
def test_a_changed_global_batch_is_logged_and_continues_from_the_global_position(data, tmp_path):
    train(data, tmp_path / "first", 1, 4)
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint_step_4"
    resumed = train(data, tmp_path / "second", 1, 6, f"training.resume={checkpoint}", accumulation=2)
    assert "global batch changed from 4 to 2 samples" in resumed.stdout + resumed.stderr
    assert "from global sample 16 of epoch 0" in resumed.stdout + resumed.stderr


def test_a_streaming_run_resumes_exactly_through_train_py(data, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from granite_docling.data.sources import ReadOptions, read_dataset

    rows = to_hub_rows(read_dataset(data, "d", ReadOptions())[0])
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):  # 3 files x 2 row groups: units for 2 workers
        pq.write_table(pa.Table.from_pylist(rows[i * 8 : (i + 1) * 8]), shards / f"train-{i:05d}-of-00003.parquet",
                       row_group_size=4)  # fmt: skip
    stream = [f"dataset.sample.path={shards}", "dataset.sample.streaming=true", "data.num_workers=2"]
    train(data, tmp_path / "whole", 1, 5, *stream)  # saves at step 4 (save_steps=4) with the workers mid-stream
    checkpoint = tmp_path / "whole" / "checkpoints" / "checkpoint_step_4"
    resumed = train(data, tmp_path / "second", 1, 5, *stream, f"training.resume={checkpoint}")
    assert "at step 4" in resumed.stdout + resumed.stderr
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "second")
    assert sorted(got) == [5]
    assert got[5] == pytest.approx(expected[5], abs=1e-5)


@pytest.mark.slow  # make test-slow: the same index, sampler and position as the folder above, another source
def test_a_docling_eval_dataset_resumes_on_another_number_of_processes(tmp_path):
    from fixture_data import docling_eval_rows, write_docling_eval

    root = write_docling_eval(tmp_path / "eval", docling_eval_rows(["multi_page", "code_and_formula"] * 3))  # 21
    source = ["dataset.sample.split=test"]
    train(root, tmp_path / "whole", 1, 8, *source)
    train(root, tmp_path / "first", 2, 4, *source)
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint_step_4"
    resumed = train(root, tmp_path / "second", 1, 8, *source, f"training.resume={checkpoint}")
    assert "instead of 2 with the same global batch of 4" in resumed.stdout + resumed.stderr
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "first") | losses(tmp_path / "second")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-4), f"step {step}"


@pytest.mark.slow  # make test-slow: ~45 s of three runs, one of them on two processes
def test_a_resume_on_two_processes_probes_the_heaviest_micro_batch_left_on_each_and_changes_no_loss(tmp_path):
    from test_fail_fast import growing_answers

    # 66 samples: the 2 longest lead the epoch; resumed after 4 steps (16 samples), the heaviest micro-batches
    # left are the last step's, one on each process: both probe theirs (each probe all-reduces), then train.
    data = growing_answers(tmp_path / "growing", 66)
    train(data, tmp_path / "whole", 1, 8)
    train(data, tmp_path / "first", 1, 4)
    checkpoint = tmp_path / "first" / "checkpoints" / "checkpoint_step_4"
    train(data, tmp_path / "second", 2, 8, f"training.resume={checkpoint}")
    probes = [re.search(r"memory probe: .*?: (\S+) \(", (tmp_path / "second" / log).read_text())
              for log in ("train.log", "train_rank1.log")]  # fmt: skip
    assert [found.group(1) if found else None for found in probes] == ["anns/train/062.json", "anns/train/063.json"]
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "first") | losses(tmp_path / "second")
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
