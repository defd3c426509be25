"""Shared fixtures: the repository root, Hydra composition, the tiny model preset."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from granite_docling.config import Config, register_configs
from granite_docling.launch import register_resolvers

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Dataset indexes (and HF datasets' Arrow conversions) of test runs go to a folder of this session, not ~/.cache;
# subprocesses inherit it, and the session that made it removes it.
if "GRANITE_DOCLING_TEST_CACHE" not in os.environ:
    os.environ["GRANITE_DOCLING_TEST_CACHE"] = os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="gd_test_cache_")
    atexit.register(shutil.rmtree, os.environ["GRANITE_DOCLING_TEST_CACHE"], ignore_errors=True)

# One thread per process (a value set outside is kept): the tests' models are tiny, where a second thread costs more
# than it gives, and test processes run side by side (make test's two pytest workers, torchrun's processes).
# Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

register_configs()
register_resolvers()


def compose_config(*overrides: str) -> Config:
    """Compose conf/config.yaml with overrides, as train.py would, into the typed Config."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_object(cfg)


def data_of(cfg: Config, processor, rank: int = 0, world_size: int = 1):
    """build_data for a composed config, as train.py calls it."""
    from granite_docling.data.loading import build_data
    from granite_docling.data.sampler import BatchPlan

    t = cfg.training
    plan = BatchPlan(t.seed, t.batch_size, t.gradient_accumulation_steps, rank, world_size)
    return build_data(cfg.dataset, processor, cfg.data, plan)


def run_script(*args: str, cwd: Path = REPO, timeout: float = 120, env: dict | None = None):
    """Run a repository script (train.py, evaluate.py, ...) in a fresh interpreter; return the completed process."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return compose_config("model=tiny", "dataset=[sample]")


@pytest.fixture(scope="session")
def tiny_processor():
    from granite_docling.model import load_model_config, load_processor

    cfg = compose_config("model=tiny").model
    return load_processor(cfg, load_model_config(cfg))
