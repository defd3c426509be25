"""Every optimizer and schedule of conf/optimizer and conf/scheduler (and a class named by ``_target_`` alone)
trains, saves and resumes exactly. In the default run: the tiny model's text path stepped in-process, its state
through the checkpoint's own files; under -m slow: train.py from the command line, a SIGTERM then a resume, an
elastic 2 -> 1 resume, the six-job sweep and an Optuna search over ``optimizer``."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
from conftest import REPO, compose_config, run_script
from fixture_data import good_dataset
from omegaconf import OmegaConf

from granite_docling import optimizers
from granite_docling.checkpoint import load_training_state, training_state, write_training_state
from granite_docling.config import ConfigError
from granite_docling.model import load_model_and_processor
from granite_docling.optimization import make_optimizer, optimizer_state_held
from granite_docling.optimizers import MuonWithAdamW, evaluation_weights
from granite_docling.run_control import EXIT_INTERRUPTED
from granite_docling.training_run import LoopState

PRESETS = ["adamw", "adafactor", "muon", "sgd", "schedule_free", "adamw_8bit"]
SCHEDULES = ["cosine", "linear", "constant", "wsd"]


def test_schedules_on_literal_steps():
    # warmup 2 of 10 steps, floor 0.1: warmup is shared, the rest differs
    assert [optimizers.cosine(s, 2, 10, 0.1) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1, 1, 0.55, 0.1])
    assert [optimizers.linear(s, 2, 10, 0.1) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1, 1, 0.55, 0.1])
    assert [optimizers.constant(s, 2, 10, 0.1) for s in (0, 1, 2, 6, 10)] == [0.5, 1, 1, 1, 1]
    assert optimizers.linear(4, 2, 10, 0.1) == pytest.approx(1 - 0.9 * 2 / 8)
    assert optimizers.cosine(4, 2, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    # wsd: stable until the last 20% (steps 8..10), then linear to the floor
    assert [optimizers.wsd(s, 2, 10, 0.1) for s in (0, 1, 2, 7, 8, 9, 10)] == pytest.approx(
        [0.5, 1, 1, 1, 1, 0.55, 0.1]
    )
    assert optimizers.wsd(75, 0, 100, 0.0, decay_fraction=0.5) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="decay_fraction=1.5"):
        optimizers.wsd(0, 0, 10, 0.0, decay_fraction=1.5)


@pytest.fixture(scope="module")
def text_batch():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 12), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


@pytest.fixture(scope="module")
def tiny_model():
    """The tiny model (seed 0) and its first weights, loaded once: each run starts from them."""
    torch.manual_seed(0)
    model, _ = load_model_and_processor(compose_config("model=tiny").model)
    return model, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def tiny_run(tiny_model, *overrides: str):
    """The tiny model at its first weights, and the optimizer and schedule of the composed overrides."""
    cfg = compose_config("model=tiny", "dataset=[sample]", "training.warmup_steps=1", *overrides)
    model, first = tiny_model
    model.load_state_dict(first)
    model.train()
    optimizer, scheduler = make_optimizer(model, cfg.training, cfg.optimizer, 6, cfg.scheduler)
    if hasattr(optimizer, "train"):
        optimizer.train()
    return model, optimizer, scheduler


def take_steps(model, optimizer, scheduler, batch, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        with optimizer_state_held(optimizer):
            loss = model(**batch).loss
            loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# muon, schedule_free and adafactor in the default run; the rest (the same code path) under -m slow
OPTIONS = [
    pytest.param(["optimizer=muon", "scheduler=wsd"], id="muon-wsd"),
    pytest.param(["optimizer=schedule_free", "scheduler=constant"], id="schedule_free-constant"),
    pytest.param(["optimizer=adafactor", "scheduler=cosine"], id="adafactor-cosine"),
    *[pytest.param([f"optimizer={name}", "scheduler=linear"], id=name, marks=pytest.mark.slow)
      for name in ("adamw", "sgd", "adamw_8bit")],
    pytest.param(["optimizer._target_=torch.optim.RAdam"], id="RAdam", marks=pytest.mark.slow),  # no preset
    pytest.param(["optimizer=sgd", "+optimizer.dampening=0.0"], id="sgd-keyword", marks=pytest.mark.slow),
]  # fmt: skip


@pytest.mark.parametrize("overrides", OPTIONS)
def test_each_optimizer_trains_saves_and_resumes_exactly(tiny_model, overrides, text_batch, tmp_path):
    model, optimizer, scheduler = tiny_run(tiny_model, *overrides)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_steps(model, optimizer, scheduler, text_batch, 2)
    with evaluation_weights(optimizer):  # as Checkpoints.save: a schedule-free optimizer saves its average
        weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
        write_training_state(tmp_path, training_state(optimizer, scheduler, asdict(LoopState(step=2)), [], ""))
    reference = take_steps(model, optimizer, scheduler, text_batch, 2)
    assert all(math.isfinite(loss) for loss in reference)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [n for n in before if "text_model" in n]  # what a text-only batch trains, all of it
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    rates = [g["lr"] for g in optimizer.param_groups]

    model, optimizer, scheduler = tiny_run(tiny_model, *overrides)  # a new run: first weights, no state
    model.load_state_dict(weights)
    saved = load_training_state(tmp_path)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    if hasattr(optimizer, "train"):
        optimizer.train()
    assert take_steps(model, optimizer, scheduler, text_batch, 2) == pytest.approx(reference, abs=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, after[name], atol=1e-5, rtol=0, msg=name)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(rates)


def test_muon_takes_the_block_matrices_and_adamw_the_rest(tiny_model, text_batch):
    model, optimizer, scheduler = tiny_run(tiny_model, "optimizer=muon")
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = [names[id(p)] for g in optimizer.param_groups if g["muon"] for p in g["params"]]
    rest = [names[id(p)] for g in optimizer.param_groups if not g["muon"] for p in g["params"]]
    assert muon and all(".layers." in n and n.endswith(".weight") and "norm" not in n for n in muon)
    for expected in ("embed_tokens", "connector", "patch_embedding", "norm", "bias"):
        assert any(expected in n for n in rest), expected
    assert not any("embed" in n or "connector" in n for n in muon)
    assert {g["name"] for g in optimizer.param_groups} >= {"text_muon", "vision_muon", "text", "connector"}
    take_steps(model, optimizer, scheduler, text_batch, 1)
    kinds = {key for g in optimizer.param_groups if g["muon"] for p in g["params"] for key in optimizer.state[p]}
    assert kinds == {"momentum_buffer"}  # Muon's; AdamW's moments on the rest
    (text,) = [g for g in optimizer.param_groups if g["name"] == "text"]  # text's 2-D weights outside the blocks
    assert {k for p in text["params"] for k in optimizer.state[p]} == {"step", "exp_avg", "exp_avg_sq"}


def test_the_state_held_before_the_first_update_is_the_chosen_optimizers(tiny_model):
    measured = {}
    for name in ("adamw", "adafactor", "sgd", "muon"):
        model, optimizer, _ = tiny_run(tiny_model, f"optimizer={name}")
        with optimizer_state_held(optimizer) as held:
            measured[name] = sum(t.numel() for t in held)  # bytes
        for p in model.parameters():  # a step with images: every parameter has a gradient
            p.grad = torch.full_like(p, 1e-3)
        optimizer.step()
        real = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if v.dim())
        assert measured[name] == real, name
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert measured["adamw"] == 8 * trainable and measured["sgd"] == 4 * trainable
    assert measured["adafactor"] < measured["adamw"] / 50  # factored second moments only


def test_what_cannot_be_built_is_one_line(tiny_model):
    cases = {
        ("optimizer=sgd", "+optimizer.betas=[0.9,0.99]"): r"optimizer: SGD takes no betas \(it takes lr, momentum,",
        ("optimizer._target_=torch.optim.Nadamm",): "optimizer._target_=torch.optim.Nadamm cannot be found",
        ("optimizer._target_=nowhere.Optimizer",): r"nowhere.Optimizer cannot be found \(No module named 'nowhere'\)",
        ("scheduler=wsd", "+scheduler.warmup=3"): "scheduler: wsd takes no warmup",
        ("optimizer=muon", "+optimizer.muon.betas=[0.9,0.99]"): "cannot be built",
    }
    for overrides, message in cases.items():
        with pytest.raises(ConfigError, match=message) as raised:
            tiny_run(tiny_model, *overrides)
        assert "\n" not in str(raised.value)
    removal = pytest.raises(ConfigError, tiny_run, tiny_model, "optimizer=sgd", "+optimizer.betas=[1,2]").value
    assert str(removal).endswith("remove with ~optimizer.betas")
    sys.modules["schedulefree"] = None  # as if it were not installed
    try:
        with pytest.raises(ConfigError, match=r"not installed: pip install schedulefree \(or pip install 'granite"):
            optimizers.locate({"_target_": "schedulefree.AdamWScheduleFree"}, "optimizer")
    finally:
        del sys.modules["schedulefree"]


def test_cfg_job_shows_the_composed_optimizer_and_scheduler():
    result = run_script("train.py", "optimizer=muon", "scheduler=wsd", "--cfg", "job")
    assert result.returncode == 0, result.stderr[-2000:]
    job = OmegaConf.create(result.stdout)
    assert job.optimizer._target_ == "granite_docling.optimizers.MuonWithAdamW"
    assert job.optimizer.muon.adjust_lr_fn == "match_rms_adamw"
    assert job.scheduler == {"_target_": "granite_docling.optimizers.wsd", "_partial_": True, "decay_fraction": 0.2}


# ---------------------------------------------------------------------------------------------------------------
# Through train.py (make test-slow)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return good_dataset(tmp_path_factory.mktemp("optimizers"), 16)


def args(data, run_dir, *extra) -> list[str]:
    return ["train.py", "experiment=quick", f"dataset.sample.path={data}", "training.batch_size=2",
            "data.val_ratio=0", "data.num_workers=0", "training.warmup_steps=1", "training.log_interval=1",
            f"hydra.run.dir={run_dir}", *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice", [f"optimizer={name}" for name in PRESETS] + [f"scheduler={name}" for name in SCHEDULES]
)
def test_each_option_trains_three_steps_from_the_command_line(data, tmp_path, choice):
    result = run_script(*args(data, tmp_path, "training.max_steps=3", choice), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "final_model" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "choice",
    ["optimizer=muon", "optimizer=schedule_free", "optimizer=adafactor", "optimizer._target_=torch.optim.RAdam"],
)
def test_sigterm_then_resume_equals_an_uninterrupted_run(data, tmp_path, choice):
    run = ["training.max_steps=8", "scheduler=wsd", choice]
    reference = run_script(*args(data, tmp_path / "reference", *run), timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    stopped = tmp_path / "stopped"
    process = subprocess.Popen([sys.executable, *args(data, stopped, *run)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 200
    while not ((stopped / "metrics.jsonl").is_file() and len(losses(stopped)) >= 2):
        assert process.poll() is None and time.time() < deadline, "no second step before the signal"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, stderr[-3000:]
    stopped_at = max(losses(stopped))
    assert stopped_at < 8

    resumed = run_script(*args(data, stopped, *run, "training.resume=auto"), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(tmp_path / "reference"), losses(stopped)
    assert sorted(got) == list(range(1, 9))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), f"step {step} (stopped at {stopped_at})"


@pytest.mark.slow
def test_schedule_free_resumes_on_one_process_from_two(data, tmp_path):
    # Not Muon: its Newton-Schulz iteration runs in bfloat16, where the two-process gradient's other summation
    # order (~1e-7) grows to 2.5e-5 in the next step's loss (measured), past this test's 1e-5.
    def train(run_dir, processes: int, max_steps: int, *extra: str):
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        launch = launch if processes > 1 else []
        # a constant rate: the first run's 3 steps follow the schedule of the 6 the others run
        overrides = args(data, run_dir, "training.batch_size=1", "optimizer=schedule_free", "training.save_steps=3",
                         "scheduler=constant", "training.warmup_steps=0",
                         f"training.gradient_accumulation_steps={4 // processes}", f"training.max_steps={max_steps}",
                         *extra)  # fmt: skip
        result = run_script(*launch, str(REPO / overrides[0]), *overrides[1:], timeout=400)
        assert result.returncode == 0, result.stderr[-3000:]

    train(tmp_path / "reference", 1, 6)
    train(tmp_path / "elastic", 2, 3)
    train(tmp_path / "elastic", 1, 6, "training.resume=auto")
    expected, got = losses(tmp_path / "reference"), losses(tmp_path / "elastic")
    assert sorted(got) == list(range(1, 7))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), f"step {step}"


@pytest.mark.slow
def test_the_six_job_sweep_gives_one_run_folder_each(data, tmp_path):
    result = run_script("train.py", "-m", *args(data, tmp_path / "unused", "training.max_steps=2")[1:],
                        "optimizer=adamw,adafactor,muon", "scheduler=cosine,wsd",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=590)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    composed = set()
    for job in range(6):
        folder = tmp_path / "sweep" / str(job)
        assert sorted(losses(folder)) == [1, 2] and (folder / "final_model" / "model.safetensors").is_file()
        cfg = OmegaConf.load(folder / ".hydra" / "config.yaml")
        composed.add((cfg.optimizer._target_.split(".")[-1], cfg.scheduler._target_.split(".")[-1]))
    assert composed == {(o, s) for o in ("AdamW", "Adafactor", "MuonWithAdamW") for s in ("cosine", "wsd")}


@pytest.mark.slow
def test_optuna_searches_the_optimizer_as_a_choice(data, tmp_path):
    result = run_script("train.py", "-m", *args(data, tmp_path / "unused", "training.max_steps=2")[1:],
                        "hydra/sweeper=optuna",
                        "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.seed=0",
                        "optimizer=choice(adamw,sgd,adafactor)",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=590)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best.best_params.optimizer in ("adamw", "sgd", "adafactor")


def test_recipe_an_optimizer_is_one_yaml_file_or_one_override(tiny_model, text_batch, tmp_path):
    """ARCHITECTURE.md's recipe: a preset is one file in conf/optimizer/ (here in a copy of conf/); a class
    needs no file at all. Either way the per-module learning rates and weight-decay groups are the run's."""
    import shutil

    from granite_docling.launch import compose_config as compose_from

    conf = shutil.copytree(REPO / "conf", tmp_path / "conf")
    (conf / "optimizer" / "radam.yaml").write_text(
        "_target_: torch.optim.RAdam\n_partial_: true\ndecoupled_weight_decay: true\n"
    )
    preset = compose_from(conf, "model=tiny", "dataset=[sample]", "optimizer=radam").optimizer
    override = compose_config("optimizer._target_=torch.optim.RAdam", "+optimizer.decoupled_weight_decay=true")
    assert preset == {"_target_": "torch.optim.RAdam", "_partial_": True, "decoupled_weight_decay": True}
    assert override.optimizer == {**compose_config().optimizer, **preset}  # the default's keywords kept (betas, eps)

    model, optimizer, scheduler = tiny_run(tiny_model, "optimizer._target_=torch.optim.RAdam",
                                           "+optimizer.decoupled_weight_decay=true")  # fmt: skip
    adamw_model, adamw, _ = tiny_run(tiny_model)
    assert isinstance(optimizer, torch.optim.RAdam) and optimizer.defaults["decoupled_weight_decay"]
    groups = [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
    assert groups == [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in adamw.param_groups]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(math.isfinite(loss) for loss in take_steps(model, optimizer, scheduler, text_batch, 2))
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
