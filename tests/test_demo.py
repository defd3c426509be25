"""``training.save_initial`` writes the untrained start as a stock model folder: the "before" of a before/after
evaluation (``evaluate.py checkpoint=<run>/final_model compare_to=<run>/initial_model``)."""

from __future__ import annotations

import pytest
import torch
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from conftest import compose_config
from fixture_data import good_dataset
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from granite_docling import train_loop
from granite_docling.model import load_model_and_processor


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    AcceleratorState._reset_state(reset_partial_state=True)


def test_save_initial_writes_the_untrained_start_as_a_stock_model(tmp_path):
    data = good_dataset(tmp_path / "data", 2)
    cfg = compose_config("experiment=quick", "model=tiny", f"dataset.sample.path={data}", "data.num_workers=0",
                         "training.batch_size=2", "training.max_steps=1", "training.save_initial=true")  # fmt: skip
    assert train_loop.train(cfg, tmp_path / "run").exit_code == 0

    initial_dir = tmp_path / "run" / "initial_model"
    model = AutoModelForImageTextToText.from_pretrained(initial_dir)  # stock classes, no code of ours
    AutoProcessor.from_pretrained(initial_dir)
    assert not (initial_dir / "training_state.pt").exists()

    set_seed(cfg.training.seed)  # the random init training starts from
    expected, _ = load_model_and_processor(cfg.model)
    for name, parameter in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], parameter, rtol=0, atol=0, msg=name)
    final = load_file(tmp_path / "run" / "final_model" / "model.safetensors")
    initial = load_file(initial_dir / "model.safetensors")
    assert any(not torch.equal(final[name], initial[name]) for name in initial)  # one step moved the weights
