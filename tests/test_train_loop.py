"""The training loop: gradient equivalences, autocast, loss, schedule, LoRA, bad samples, NaN, hub, sweeps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import REPO, compose_config, run_script
from fixture_data import BAD_FILES, dataset_with_bad_samples, good_dataset
from omegaconf import OmegaConf
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from granite_docling import optimization, progress, train_loop
from granite_docling.checkpoint import push_to_hub
from granite_docling.data.encoding import collate_skipping_problems
from granite_docling.data.indexed import ConversationDataset
from granite_docling.data.sources import ReadOptions, read_dataset
from granite_docling.loss import TokenLoss, row_cross_entropy, shift_labels, supervised_cross_entropy
from granite_docling.model import load_model_and_processor
from granite_docling.optimization import StepLoss, backward_step, make_optimizer, model_inputs
from granite_docling.optimizers import cosine as lr_lambda
from granite_docling.training_run import LoopState


def tiny_loss_module(seed: int = 0):
    torch.manual_seed(seed)
    model, processor = load_model_and_processor(compose_config("model=tiny").model)
    return TokenLoss(model), processor


def example_batches(dataset_path, processor) -> list[dict]:
    """One single-sample micro-batch per sample of the dataset (samples of unequal length)."""
    samples, _ = read_dataset(dataset_path, "d", ReadOptions())
    dataset = ConversationDataset.from_samples({"d": samples}, processor, {})
    pad_id = processor.tokenizer.pad_token_id
    return [collate_skipping_problems([dataset[i]], pad_id) for i in range(len(dataset))]


def one_batch(batches: list[dict], processor) -> dict:
    """The same samples as a single right-padded micro-batch."""
    samples = []
    for i, b in enumerate(batches):
        real = b["attention_mask"][0].bool()  # drop the padding of the single-sample batch
        samples.append(
            {
                "input_ids": b["input_ids"][0][real],
                "labels": b["labels"][0][real],
                "id": i,
                "dataset": "d",
                "pixel_values": b["pixel_values"][0],
                "pixel_attention_mask": b["pixel_attention_mask"][0],
            }
        )
    return collate_skipping_problems(samples, processor.tokenizer.pad_token_id)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def four_samples(tmp_path_factory):
    return good_dataset(tmp_path_factory.mktemp("four"), 4)


def gradients(loss_module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in loss_module.named_parameters() if p.grad is not None}


def assert_same_gradients(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


def test_accumulation_2x2_equals_batch_4_with_unequal_lengths(four_samples):
    accelerator = Accelerator(cpu=True)
    loss_module, processor = tiny_loss_module()
    batches = example_batches(four_samples, processor)
    lengths = {int(b["attention_mask"].sum()) for b in batches}
    assert len(lengths) > 1  # the test means something only with unequal lengths

    # two short samples in one micro-batch, two long ones in the other: a per-micro-batch mean would differ
    pairs = [one_batch(batches[0::2], processor), one_batch(batches[1::2], processor)]
    assert pairs[0]["attention_mask"].sum() != pairs[1]["attention_mask"].sum()
    loss_a, tokens_a, _ = backward_step(accelerator, loss_module, pairs)
    accumulated = gradients(loss_module)
    loss_module.zero_grad()
    loss_b, tokens_b, _ = backward_step(accelerator, loss_module, [one_batch(batches[0::2] + batches[1::2], processor)])
    assert tokens_a == tokens_b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert_same_gradients(accumulated, gradients(loss_module))


def test_step_loss_of_each_dataset_is_the_token_mean_over_its_own_samples(four_samples):
    accelerator = Accelerator(cpu=True)
    loss_module, processor = tiny_loss_module()
    batches = example_batches(four_samples, processor)
    mixed = one_batch(batches, processor)
    mixed["datasets"] = ["a", "b", "a", "b"]  # rows 0 and 2 from one dataset, 1 and 3 from another
    step = backward_step(accelerator, loss_module, [mixed], datasets=["a", "b", "c"])  # c: not in this step
    alone = {name: backward_step(accelerator, loss_module, [one_batch(batches[i::2], processor)])
             for i, name in enumerate("ab")}  # fmt: skip
    assert list(step.by_dataset) == ["a", "b"]
    for name in "ab":
        assert step.by_dataset[name] == pytest.approx(alone[name].loss, rel=1e-5)
    assert alone["a"].loss != pytest.approx(alone["b"].loss, rel=1e-3)  # else the split would prove nothing
    assert step.tokens == alone["a"].tokens + alone["b"].tokens
    weighted = sum(alone[name].loss * alone[name].tokens for name in "ab") / step.tokens
    assert step.loss == pytest.approx(weighted, rel=1e-5)


def test_row_sums_of_the_loss_are_each_samples_own_summed_loss(four_samples):
    loss_module, processor = tiny_loss_module()
    batches = example_batches(four_samples, processor)
    with torch.no_grad():
        row_sums, tokens = loss_module(**model_inputs(one_batch(batches, processor), torch.device("cpu")))
        for row, single in zip(row_sums, batches, strict=True):
            own, _ = loss_module(**model_inputs(single, torch.device("cpu")))
            torch.testing.assert_close(row, own[0], rtol=1e-4, atol=1e-4)
    assert tokens == sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


@pytest.mark.slow  # make test-slow: test_elastic_resume's 2-process steps equal the 1-process run's in the default run
def test_two_processes_equal_one_process_with_twice_the_batch(four_samples, tmp_path):
    out = tmp_path / "ddp.pt"
    script = REPO / "tests" / "scripts" / "ddp_gradients.py"
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                        str(four_samples), str(out), timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(out)

    accelerator = Accelerator(cpu=True)
    loss_module, processor = tiny_loss_module()
    loss, tokens, _ = backward_step(
        accelerator, loss_module, [one_batch(example_batches(four_samples, processor), processor)]
    )
    assert ddp["tokens"] == tokens
    assert ddp["loss"] == pytest.approx(loss, rel=1e-5)
    single = {name.removeprefix("module."): g for name, g in gradients(loss_module).items()}
    assert_same_gradients({name.removeprefix("module."): g for name, g in ddp["grads"].items()}, single)


def test_bf16_mixed_precision_really_autocasts(four_samples):
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    loss_module, processor = tiny_loss_module()
    seen = []
    layer = loss_module.model.model.text_model.layers[0].mlp.up_proj
    layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    loss_module = accelerator.prepare(loss_module)
    backward_step(accelerator, loss_module, example_batches(four_samples, processor)[:1])
    assert seen == [torch.bfloat16]
    assert layer.weight.dtype == torch.float32  # master weights stay float32


def test_our_loss_matches_transformers_mean_loss_and_chunking_changes_nothing(four_samples):
    loss_module, processor = tiny_loss_module()
    batch = one_batch(example_batches(four_samples, processor), processor)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")}
    reference = loss_module.model(**inputs, labels=batch["labels"]).loss
    hidden = loss_module.model.model(**inputs).last_hidden_state
    weight = loss_module.model.lm_head.weight
    for chunk_size in (1, 7, 4096):
        total, n = supervised_cross_entropy(hidden, batch["labels"], weight, chunk_size)
        assert n == int((batch["labels"][:, 1:] != -100).sum())
        torch.testing.assert_close(total / n, reference, rtol=1e-5, atol=1e-5)


def test_storing_the_logits_gives_the_loss_and_gradients_of_recomputing_them():
    torch.manual_seed(0)
    labels = torch.full((3, 9), -100)
    labels[:, 4:] = torch.randint(0, 50, (3, 5))
    results = []
    for recompute in (True, False):
        torch.manual_seed(1)
        hidden = torch.randn(3, 9, 16, requires_grad=True)
        weight = torch.randn(50, 16, requires_grad=True)
        rows, n = row_cross_entropy(hidden, labels, weight, chunk_size=4, recompute=recompute)
        rows.sum().backward()
        results.append((rows.detach(), n, hidden.grad, weight.grad))
    (rows_a, n_a, hidden_a, weight_a), (rows_b, n_b, hidden_b, weight_b) = results
    assert n_a == n_b == 15 and rows_a.abs().min() > 0
    for a, b in ((rows_a, rows_b), (hidden_a, hidden_b), (weight_a, weight_b)):
        torch.testing.assert_close(a, b)


def test_shift_labels_shifts_once():
    labels = torch.tensor([[-100, 5, 6, 7]])
    assert shift_labels(labels).tolist() == [[5, 6, 7, -100]]


def test_learning_rate_warms_up_then_decays_to_the_floor():
    ratios = [lr_lambda(s, warmup_steps=2, total_steps=10, min_ratio=0.1) for s in range(11)]
    assert ratios[0] == 0.5 and ratios[1] == 1.0 and ratios[2] == 1.0
    assert all(a >= b for a, b in zip(ratios[2:], ratios[3:], strict=False))
    assert ratios[10] == pytest.approx(0.1)
    assert lr_lambda(5, 0, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


# ---------------------------------------------------------------------------------------------------------------
# Whole runs, in-process


def demo_config(data, *overrides: str):
    return compose_config("experiment=quick", f"dataset.sample.path={data}", "data.num_workers=0",
                          "training.batch_size=2", "data.val_ratio=0", *overrides)  # fmt: skip


def test_smoke_run_changes_every_trainable_parameter_and_saves_a_stock_model(four_samples, tmp_path):
    cfg = demo_config(four_samples, "training.max_steps=3")
    assert train_loop.train(cfg, tmp_path).exit_code == 0
    torch.manual_seed(cfg.training.seed)
    from accelerate.utils import set_seed

    set_seed(cfg.training.seed)
    initial, _ = load_model_and_processor(cfg.model)
    final = load_file(tmp_path / "final_model" / "model.safetensors")
    unchanged = [n for n, p in initial.named_parameters() if n in final and torch.equal(final[n], p.detach())]
    assert unchanged == []
    assert set(final) >= {n for n, _ in initial.named_parameters()}

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "final_model")
    processor = AutoProcessor.from_pretrained(tmp_path / "final_model")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all("train/loss" in r and "train/lr" in r for r in rows)
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    assert processor.image_seq_len == 4 and model.config.vision_config.image_size == 64


def test_a_mix_of_datasets_logs_each_datasets_loss(four_samples, tmp_path):
    other = good_dataset(tmp_path / "other", 4)
    cfg = demo_config(four_samples, "dataset=[sample,folder]", f"dataset.folder.path={other}", "training.max_steps=4")
    assert train_loop.train(cfg, tmp_path / "run").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    seen = {key.removeprefix("train/loss/") for row in rows for key in row if key.startswith("train/loss/")}
    assert seen == {"sample", "folder"}
    for row in rows:  # the step's loss is the token-weighted mean of its datasets': it lies between them
        parts = [value for key, value in row.items() if key.startswith("train/loss/")]
        assert min(parts) - 1e-6 <= row["train/loss"] <= max(parts) + 1e-6

    single = demo_config(four_samples, "training.max_steps=1")
    assert train_loop.train(single, tmp_path / "single").exit_code == 0
    (row,) = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert not any(key.startswith("train/loss/") for key in row)  # one dataset: the overall loss says it all


def test_lora_final_model_is_merged_and_loads_without_peft(four_samples, tmp_path):
    cfg = demo_config(four_samples, "training.max_steps=2", "model.lora.enabled=true", "model.lora.rank=4",
                      "training.lr_text=0.05", "training.lr_connector=0.05")  # fmt: skip
    assert train_loop.train(cfg, tmp_path).exit_code == 0
    final = load_file(tmp_path / "final_model" / "model.safetensors")
    assert not any("lora" in name for name in final)
    assert (tmp_path / "final_model" / "adapter" / "adapter_model.safetensors").is_file()

    from accelerate.utils import set_seed
    from peft import PeftModel

    set_seed(cfg.training.seed)
    base, processor = load_model_and_processor(cfg.model)
    base_q = base.model.text_model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert not torch.equal(final["model.text_model.layers.0.self_attn.q_proj.weight"], base_q)  # adapter merged in
    torch.testing.assert_close(final["model.vision_model.encoder.layers.0.mlp.fc1.weight"],
                               base.model.vision_model.encoder.layers[0].mlp.fc1.weight.detach())  # fmt: skip
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "final_model" / "adapter").eval()
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "final_model").eval()
    ids = torch.tensor([[100264, 882, 100265, 40, 1093, 100257, 198, 100264, 78191, 100265]])
    torch.testing.assert_close(merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_nonfinite_losses_skip_steps_then_stop_with_advice(four_samples, tmp_path, monkeypatch, caplog):
    class NaNLoss(TokenLoss):
        def forward(self, **batch):
            total, n = super().forward(**batch)
            return total * float("nan"), n

    monkeypatch.setattr(optimization, "TokenLoss", NaNLoss)  # what token_loss wraps the model in
    cfg = demo_config(four_samples, "training.max_steps=5", "training.max_nonfinite_steps=2")
    assert train_loop.train(cfg, tmp_path).exit_code == 1
    assert "2 non-finite losses in a row" in caplog.text and "lower learning rate" in caplog.text
    assert not (tmp_path / "final_model").exists()


def test_push_to_hub_creates_the_repo_and_uploads_the_final_model(tmp_path, monkeypatch):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload_folder", folder_path, repo_id))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    push_to_hub(tmp_path / "final_model", "me/docs", private=True)
    assert calls == [
        ("create_repo", "me/docs", True, True),
        ("upload_folder", str(tmp_path / "final_model"), "me/docs"),
    ]


# ---------------------------------------------------------------------------------------------------------------
# Whole runs, through train.py


def test_bad_samples_are_skipped_and_reported_and_error_mode_names_the_first(tmp_path):
    data = dataset_with_bad_samples(tmp_path / "bad", n_good=4)
    common = ["experiment=quick", f"dataset.sample.path={data}", "training.max_steps=4", "training.batch_size=2",
              "data.val_ratio=0", "data.num_workers=1"]  # fmt: skip
    result = run_script("train.py", *common, f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    listed = {}
    for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines():
        entry = json.loads(line)
        listed[entry["file"].split("/")[-1]] = entry["reason"]
    assert listed == BAD_FILES
    assert "bad sample(s) skipped" in result.stderr + result.stdout

    failed = run_script("train.py", *common, "data.on_bad_sample=error", f"hydra.run.dir={tmp_path / 'run2'}")
    assert failed.returncode != 0
    assert "anns/train/b_bomb.json: image_too_large" in failed.stderr or "anns/train/b_" in failed.stderr
    assert not (tmp_path / "run2" / "final_model").exists()


def test_optuna_sweep_optimises_the_returned_objective_and_gives_complete_run_folders(tmp_path):
    data = good_dataset(tmp_path / "data", 4)
    result = run_script("train.py", "-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2",
                        "hydra.sweeper.sampler.seed=0", "training.lr_connector=interval(1e-4,1e-2)", "experiment=quick",
                        "training.max_steps=2", f"dataset.sample.path={data}", "training.batch_size=2",
                        "data.val_ratio=0", "data.num_workers=0", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    final_losses = {}
    for job in ("0", "1"):
        folder = tmp_path / "sweep" / job
        assert (folder / "final_model" / "model.safetensors").is_file()
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert [row["step"] for row in rows] == [1, 2]
        lr = read_yaml(folder / ".hydra" / "config.yaml")["training"]["lr_connector"]
        final_losses[lr] = rows[-1]["train/loss"]  # the objective without a validation split
    best = read_yaml(tmp_path / "sweep" / "optimization_results.yaml")
    assert best["best_value"] == pytest.approx(min(final_losses.values()))
    assert final_losses[best["best_params"]["training.lr_connector"]] == pytest.approx(best["best_value"])


def read_yaml(path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path))


def test_torchrun_two_processes_share_one_run_folder(tmp_path):
    data = good_dataset(tmp_path / "data", 4)
    work = tmp_path / "work"
    work.mkdir()
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train.py")]
    overrides = ["experiment=quick", f"dataset.sample.path={data}", "training.max_steps=2", "training.batch_size=1",
                 "data.val_ratio=0", "data.num_workers=0"]  # fmt: skip
    result = run_script(*launch, *overrides, cwd=work, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = [p.parent for p in (work / "outputs").rglob(".hydra")]
    assert (run_dir / "final_model" / "model.safetensors").is_file()
    assert (run_dir / "train.log").is_file() and (run_dir / "train_rank1.log").is_file()
    assert "2 process(es)" in (run_dir / "train.log").read_text()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2  # written once, by the main process


def test_wandb_offline_and_gradient_checkpointing(four_samples, tmp_path):
    cfg = demo_config(four_samples, "training.max_steps=2", "wandb.enabled=true", "wandb.mode=offline",
                      "training.gradient_checkpointing=true")  # fmt: skip
    assert train_loop.train(cfg, tmp_path).exit_code == 0
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_generation_eval_during_training_is_logged(four_samples, tmp_path):
    data = good_dataset(tmp_path / "data", 6)
    cfg = demo_config(data, "training.max_steps=2", "data.val_ratio=0.3", "training.gen_eval_steps=2",
                      "training.gen_eval_samples=2", "training.gen_eval_max_new_tokens=8")  # fmt: skip
    assert train_loop.train(cfg, tmp_path / "run").exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    generated = [r for r in rows if "gen/edit_distance" in r]
    assert len(generated) == 1 and generated[0]["step"] == 2 and generated[0]["gen/n"] == 2


def test_throughput_logs_data_wait_and_mfu(four_samples, tmp_path):
    cfg = demo_config(four_samples, "training.max_steps=2", "training.log_interval=1", "training.peak_tflops=1")
    assert train_loop.train(cfg, tmp_path).exit_code == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert 0 <= row["train/data_wait"] <= 1
        assert row["train/mfu"] > 0 and row["train/tokens_per_second"] > 0
    # MFU = model FLOPs / s / peak (1 TFLOP/s here), so MFU x peak / samples per second is the mean model FLOPs
    # of the step's samples: within the range of the four samples' own counts
    from granite_docling.data.encoding import collate_skipping_problems
    from granite_docling.data.indexed import ConversationDataset
    from granite_docling.data.sources import ReadOptions, read_dataset
    from granite_docling.flops import ModelFlops, batch_shape

    model, processor = load_model_and_processor(cfg.model)
    samples, _ = read_dataset(four_samples, "sample", ReadOptions())
    dataset = ConversationDataset.from_samples({"sample": samples}, processor, {}, image_path="fast")
    pad_id = processor.tokenizer.pad_token_id
    per_sample = [
        ModelFlops(model).sample(*shape, train_vision=True)
        for i in range(len(samples))
        for shape in batch_shape(collate_skipping_problems([dataset[i]], pad_id))
    ]
    for row in rows:
        logged = row["train/mfu"] * 1e12 / row["train/samples_per_second"]
        assert min(per_sample) * (1 - 1e-6) <= logged <= max(per_sample) * (1 + 1e-6), (logged, per_sample)


def test_peak_flops_from_the_config_or_the_device_name():
    assert train_loop.device_peak_flops(2.0) == 2e12
    if not torch.cuda.is_available():
        assert train_loop.device_peak_flops(None) is None


@pytest.mark.slow
def test_compiled_training_saves_a_stock_model(four_samples, tmp_path):
    """training.compile=true (inductor; ~1 min per shape on this CPU): the loss falls like eager's, and the saved
    folder has plain parameter names (no ``_orig_mod.``) and loads with stock transformers."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert train_loop.train(demo_config(four_samples, "training.max_steps=2"), eager).exit_code == 0
    assert (
        train_loop.train(demo_config(four_samples, "training.max_steps=2", "training.compile=true"), compiled).exit_code
        == 0
    )
    losses = [
        [json.loads(line)["train/loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        for run in (eager, compiled)
    ]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-3, atol=1e-3)
    weights = load_file(compiled / "final_model" / "model.safetensors")
    assert not any("_orig_mod" in name for name in weights)
    AutoModelForImageTextToText.from_pretrained(compiled / "final_model")


def literal_batch(token_counts: list[int], supervised: list[int]) -> dict:
    """A collated batch of len(token_counts) text-only samples: attention over the tokens, labels on the last ones."""
    width = max(token_counts)
    attention = torch.tensor([[1] * n + [0] * (width - n) for n in token_counts])
    labels = torch.full((len(token_counts), width), -100)
    for row, (n, s) in enumerate(zip(token_counts, supervised, strict=True)):
        labels[row, n - s : n] = 7
    return {"ids": [str(i) for i in range(len(token_counts))], "attention_mask": attention, "labels": labels}


def test_the_throughput_window_gives_rates_over_every_process_and_starts_again():
    window = progress.ThroughputWindow(torch.nn.Identity(), peak_flops=None)
    window.reset(now=100.0)
    window.add([literal_batch([10, 6], [3, 2]), {"ids": []}])  # a micro-batch of only bad samples ran nothing
    window.add([literal_batch([4], [1])])
    window.waited = 1.0
    rates = window.close(world=2, now=104.0)
    assert rates == {"train/samples_per_second": 3 * 2 / 4, "train/tokens_per_second": 20 * 2 / 4,
                     "train/data_wait": 0.25}  # fmt: skip
    assert window.seconds == 4.0 and window.samples == 0 and window.waited == 0.0 and window.started == 104.0


def test_step_metrics_and_the_console_line():
    state = LoopState(step=20, epoch=1, loss_sum=3.0, loss_steps=2, elapsed_seconds=3600.0)
    groups = [{"name": "vision", "lr": 1e-5}, {"name": "vision_no_decay", "lr": 1e-5}, {"name": "text", "lr": 2e-5}]
    step_loss = StepLoss(1.25, 40, {"pages": 1.5, "formulas": 0.5})
    metrics = progress.step_metrics(step_loss, state, groups, micro_batches=3, grad_norm=torch.tensor(0.5))
    assert metrics == {"train/loss": 1.25, "train/avg_loss": 1.5, "train/lr": 1e-5, "train/lr_vision": 1e-5,
                       "train/lr_vision_no_decay": 1e-5, "train/lr_text": 2e-5, "epoch": 1,
                       "train/supervised_tokens": 40, "train/micro_batches": 3, "train/loss/pages": 1.5,
                       "train/loss/formulas": 0.5, "train/grad_norm": 0.5}  # fmt: skip
    window = progress.ThroughputWindow(torch.nn.Identity(), peak_flops=None)
    window.seconds = 20.0  # 10 steps a window: 2 s a step
    rates = {"train/samples_per_second": 4.0, "train/tokens_per_second": 1234.4, "train/data_wait": 0.031}
    line = progress.progress_line(state, 50, metrics | rates | {"train/mfu": 0.4}, groups, window, log_every=10)
    assert line.startswith("step 20/50  epoch 1  loss 1.2500  avg 1.5000  lr 1.00e-05/2.00e-05  4.00 samples/s  "
                           "1234 tokens/s  data wait 3%  MFU 40.0%  elapsed 1:00:0")  # fmt: skip
    assert line.endswith("ETA 0:01:00")  # 30 steps left at 2 s each


def test_the_optimizer_gives_each_component_its_learning_rate_and_one_schedule(tiny_config):
    from granite_docling.model import load_model_and_processor

    model, _ = load_model_and_processor(tiny_config.model)
    t = tiny_config.training
    t = type(t)(**{**vars(t), "lr_vision": 1e-5, "lr_connector": 1e-3, "lr_text": 2e-5, "warmup_steps": 2,
                   "min_lr": 1e-6})  # fmt: skip
    optimizer, scheduler = make_optimizer(model, t, tiny_config.optimizer, total_steps=10)
    peaks = {group["name"].removesuffix("_no_decay"): group["initial_lr"] for group in optimizer.param_groups}
    assert peaks == {"vision": 1e-5, "connector": 1e-3, "text": 2e-5}
    assert all(group["lr"] == group["initial_lr"] / 2 for group in optimizer.param_groups)  # warmup: step 1 of 2
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert all(math.isclose(group["lr"], 1e-6) for group in optimizer.param_groups)  # every group ends at min_lr


def test_nonfinite_steps_are_counted_and_stop_the_run_at_the_limit(caplog):
    state = LoopState(step=7)
    assert train_loop.skip_nonfinite_step(state, float("nan"), max_in_a_row=2) == 0
    assert train_loop.skip_nonfinite_step(state, float("inf"), max_in_a_row=2) == 1
    assert (state.skipped_steps, state.nonfinite_in_a_row) == (2, 2)
    assert "2 non-finite losses in a row: stopping" in caplog.text
