"""A run that cannot fit, or that can read nothing, fails first: the first step holds the epoch's longest sample,
a memory probe trains the heaviest micro-batch ahead where the first step does not hold it (a resumed run) and
changes nothing, running out of memory is named in one line, and a run in which every sample was bad stops with
an error.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import compose_config, run_script
from fixture_data import good_dataset, write_annotation, write_image

from granite_docling import optimization, train_loop
from granite_docling.data.encoding import collate_skipping_problems
from granite_docling.data.indexed import ConversationDataset
from granite_docling.data.sources import DatasetNotFoundError, ReadOptions, read_dataset
from granite_docling.errors import user_error_message
from granite_docling.loss import TokenLoss
from granite_docling.model import load_model_and_processor
from granite_docling.optimization import OutOfMemoryError, make_optimizer, memory_probe, model_inputs


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def growing_answers(root, n: int):
    """``n`` samples on one page whose answers grow by a word each: sample ``k`` (``anns/train/{k:03d}.json``) is
    the ``k``-th shortest, so the longest are the last length group of the epoch."""
    write_image(root / "images" / "page.png")
    for k in range(n):
        turn = {"user": "Convert this page to docling.", "assistant": " ".join(["x"] * (k + 1))}
        write_annotation(root, f"{k:03d}.json", {"img_pth": "images/page.png", "anns": turn})
    return root


@pytest.fixture(scope="module")
def sixty_six(tmp_path_factory):
    return growing_answers(tmp_path_factory.mktemp("sixty_six"), 66)  # one full block of 64, then 2 longer


def config(data, *overrides: str):
    return compose_config("experiment=quick", f"dataset.sample.path={data}", "data.num_workers=0",
                          "training.batch_size=2", "data.val_ratio=0", "training.log_interval=1",
                          *overrides)  # fmt: skip


def recording(monkeypatch) -> dict[str, list]:
    """The ids of each micro-batch the memory probe and the steps train, as the loop runs them."""
    seen = {"probe": [], "steps": []}
    probe = train_loop.memory_probe
    step = train_loop.backward_step

    def recorded_probe(accelerator, loss_module, optimizer, batch, *args, **kwargs):
        seen["probe"].append(batch["ids"])
        return probe(accelerator, loss_module, optimizer, batch, *args, **kwargs)

    def recorded_step(accelerator, loss_module, group, *args, **kwargs):
        seen["steps"].append([b["ids"] for b in group])
        return step(accelerator, loss_module, group, *args, **kwargs)

    monkeypatch.setattr(train_loop, "memory_probe", recorded_probe)
    monkeypatch.setattr(train_loop, "backward_step", recorded_step)
    return seen


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["train/loss"] for row in rows if "train/loss" in row}


def test_the_first_step_holds_the_longest_sample_and_a_resumed_run_probes_the_longest_left(
    sixty_six, tmp_path, monkeypatch
):
    # The 66 samples sort into one block of the 64 shortest and a short block of the 2 longest, which came last
    # in the epoch (its last step) before: now it leads, longest first, and no probe is needed.
    seen = recording(monkeypatch)
    run = tmp_path / "run"
    cfg = config(sixty_six, "training.max_steps=3", "training.save_steps=2")
    assert train_loop.train(cfg, run).exit_code == 0
    assert seen["probe"] == []
    assert seen["steps"][0] == [["anns/train/064.json", "anns/train/065.json"]]
    assert seen["steps"][1:] == [[["anns/train/000.json", "anns/train/001.json"]],
                                 [["anns/train/002.json", "anns/train/003.json"]]]  # fmt: skip

    # Resumed after step 2, the longest are behind it: the probe takes the heaviest micro-batch left in the
    # epoch, the epoch's last step, and changes nothing: step 3 is the uninterrupted run's.
    seen["probe"].clear()
    seen["steps"].clear()
    resumed = tmp_path / "resumed"
    checkpoint = run / "checkpoints" / "checkpoint_step_2"
    cfg = config(sixty_six, "training.max_steps=3", f"training.resume={checkpoint}")
    assert train_loop.train(cfg, resumed).exit_code == 0
    assert seen["probe"] == [["anns/train/062.json", "anns/train/063.json"]]
    assert seen["steps"] == [[["anns/train/002.json", "anns/train/003.json"]]]
    assert losses(resumed) == {3: losses(run)[3]}


@pytest.fixture(scope="module")
def four_samples(tmp_path_factory):
    return good_dataset(tmp_path_factory.mktemp("four"), 4)


def test_the_memory_probe_changes_no_weight_gradient_optimizer_state_or_random_state(four_samples):
    class DrawingLoss(TokenLoss):  # a forward that draws random numbers, as dropout would
        def forward(self, **batch):
            torch.rand(3)
            random.random()
            np.random.random()
            return super().forward(**batch)

    cfg = compose_config("model=tiny")
    torch.manual_seed(0)
    model, processor = load_model_and_processor(cfg.model)
    optimizer, _ = make_optimizer(model, cfg.training, cfg.optimizer, total_steps=10)
    samples, _ = read_dataset(four_samples, "d", ReadOptions())
    dataset = ConversationDataset.from_samples({"d": samples}, processor, {})
    batch = collate_skipping_problems([dataset[0], dataset[1]], processor.tokenizer.pad_token_id)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}

    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    memory_probe(Accelerator(cpu=True), DrawingLoss(model), optimizer, batch)
    after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
    assert all(p.grad is None for p in model.parameters()) and not optimizer.state
    for name, p in model.named_parameters():
        assert torch.equal(p, weights[name]), name
    DrawingLoss(model)(**model_inputs(batch, torch.device("cpu")))  # the same forward outside a probe draws
    assert not torch.equal(torch.get_rng_state(), before[0])


def test_until_the_first_update_the_optimizers_state_is_held_in_zeros_of_its_size():
    cfg = compose_config("model=tiny")
    model, _ = load_model_and_processor(cfg.model)
    for name, p in model.named_parameters():
        p.requires_grad = "text_model" in name  # some frozen: they get no state
    optimizer, _ = make_optimizer(model, cfg.training, cfg.optimizer, total_steps=10)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with optimization.optimizer_state_held(optimizer) as moments:
        assert sum(m.numel() for m in moments) == 2 * 4 * trainable > 0  # AdamW's two fp32 moments, in bytes
    assert moments == []  # freed at the end
    for p in model.parameters():
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    optimizer.step()
    with optimization.optimizer_state_held(optimizer) as moments:
        assert moments == []  # the optimizer has its own now
    assert sum(t.numel() for state in optimizer.state.values() for t in state.values() if t.dim()) == 2 * trainable


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate "
            "21474836480 bytes. Error code 12 (Cannot allocate memory)"
        ),
    ],
)
def test_running_out_of_memory_names_the_samples_their_tokens_and_what_to_change(
    four_samples, tmp_path, monkeypatch, error
):
    calls = []

    class FullMemory(TokenLoss):
        def forward(self, **batch):
            calls.append(batch["input_ids"].shape)
            raise error

    monkeypatch.setattr(optimization, "TokenLoss", FullMemory)
    cfg = config(four_samples, "training.max_steps=2", "data.batch_tokens=4096", "data.max_length=4000",
                 "model.image_longest_edge=128")  # fmt: skip
    with pytest.raises(OutOfMemoryError) as raised:
        train_loop.train(cfg, tmp_path)
    line = user_error_message(raised.value)  # what train.py prints after "error: ", exit code 2
    assert line == str(raised.value) and "\n" not in line
    assert calls == [(2, 57)]  # the first step: it holds the heaviest micro-batch, so no probe ran before it
    assert line == (
        "out of memory on cpu training a micro-batch of 2 sample(s), 114 padded tokens: anns/train/001.json (57 "
        "tokens, 5 image tiles), anns/train/003.json (57 tokens, 5 image tiles). Change one of: "
        "training.gradient_checkpointing=true; a lower data.batch_tokens (now 4096); data.max_length below "
        "the sample's tokens (drops the longer samples, now 4000); a smaller model.image_longest_edge (now 128 px)"
    )


def test_another_runtime_error_keeps_its_traceback(four_samples, tmp_path, monkeypatch):
    class Broken(TokenLoss):
        def forward(self, **batch):
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(optimization, "TokenLoss", Broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as raised:
        train_loop.train(config(four_samples, "training.max_steps=1"), tmp_path)
    assert user_error_message(raised.value) is None


def unreadable_pages(root, n: int):
    """``n`` samples whose PNG is cut in half: the index reads its header, decoding it fails in training."""
    for k in range(n):
        page = root / "images" / f"{k}.png"
        write_image(page, "red", (300, 300))
        page.write_bytes(page.read_bytes()[:300])
        turn = {"user": "Convert this page to docling.", "assistant": "<doctag></doctag>"}
        write_annotation(root, f"{k}.json", {"img_pth": f"images/{k}.png", "anns": turn})
    return root


def test_a_run_that_can_read_no_sample_stops_with_one_line(tmp_path):
    data = unreadable_pages(tmp_path / "data", 6)
    result = run_script("train.py", "experiment=quick", f"dataset.sample.path={data}", "training.batch_size=2",
                        "data.val_ratio=0", "data.num_workers=0", f"hydra.run.dir={tmp_path / 'run'}",
                        timeout=300)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        "error: no training sample could be read: 3 step(s) trained nothing, every sample they met was bad (each "
        f"is listed in {tmp_path / 'run' / 'bad_samples.jsonl'} with the reason); fix or remove them "
        "(granite-docling validate lists them too) and train again"
    )  # at the end of the first epoch (3 steps of 2), not after experiment=quick's 30 epochs
    listed = (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["reason"] for line in listed) == ["unreadable_image"] * 6
    assert not (tmp_path / "run" / "final_model").exists()


def test_a_run_shorter_than_an_epoch_that_read_nothing_stops_too(tmp_path):
    data = unreadable_pages(tmp_path / "data", 6)
    with pytest.raises(DatasetNotFoundError, match="^no training sample could be read: 2 step"):
        train_loop.train(config(data, "training.max_steps=2"), tmp_path / "run")
    assert not (tmp_path / "run" / "final_model").exists()
