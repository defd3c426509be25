"""The ``data`` section: it owns what decides how samples become batches; the seed's names under ``training`` keep
working where users wrote them (legacy files are mapped), and an override or a config file with an old name fails
with one line naming the new one."""

from __future__ import annotations

import textwrap

import pytest
import yaml
from conftest import REPO, compose_config, run_script

from granite_docling.config import MOVED_TO_DATA, ConfigError, DataConfig, TrainingConfig, moved_key, validate
from granite_docling.errors import user_error_message
from granite_docling.evaluation.config import EvalConfig, training_split_settings
from granite_docling.legacy_config import load_legacy_config

WHY = "(the data section holds what decides how samples become batches)"


def test_moved_keys_are_the_data_fields_and_none_is_left_under_training():
    training = {f for f in TrainingConfig.__dataclass_fields__}
    assert not training & set(MOVED_TO_DATA)
    assert set(MOVED_TO_DATA.values()) == set(DataConfig.__dataclass_fields__)
    assert moved_key("training.val_ratio") == "data.val_ratio"
    assert moved_key("training.length_cache_dir") == "data.index_cache_dir"
    assert moved_key("training.seed") is None and moved_key("data.val_ratio") is None


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("training.val_ratio=0.1", f"training.val_ratio is now data.val_ratio {WHY}: write data.val_ratio=0.1"),
        ("training.num_workers=0", f"training.num_workers is now data.num_workers {WHY}: write data.num_workers=0"),
        (
            "training.length_cache_dir=/tmp/idx",
            f"training.length_cache_dir is now data.index_cache_dir {WHY}: write data.index_cache_dir=/tmp/idx",
        ),
    ],
)
def test_an_override_with_the_seeds_name_fails_naming_the_new_one(override, line):
    with pytest.raises(Exception) as raised:
        compose_config("experiment=quick", override)
    assert user_error_message(raised.value) == line


def test_a_config_file_with_an_old_name_is_one_error_line(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - quick\ntraining:\n  val_max_samples: 8\n"
    )
    (tmp_path / "experiment" / "quick.yaml").write_text((REPO / "conf" / "experiment" / "quick.yaml").read_text())
    result = run_script("train.py", "--config-dir", str(tmp_path), "experiment=mine", "--cfg", "job")
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: In 'experiment/mine': training.val_max_samples is now data.val_max_samples {WHY}: "
        "set data.val_max_samples instead"
    ]


def test_the_new_names_compose_and_are_checked():
    cfg = compose_config("experiment=quick", "data.val_ratio=0.2", "data.num_workers=0", "data.batch_tokens=512")
    assert (cfg.data.val_ratio, cfg.data.num_workers, cfg.data.batch_tokens) == (0.2, 0, 512)
    assert (cfg.training.batch_size, cfg.training.seed) == (4, 42)  # batch shape and seed stay under training
    cfg.data.num_workers = -1
    with pytest.raises(ConfigError, match=r"^data.num_workers=-1 must not be negative$"):
        validate(cfg)


def write_legacy(tmp_path, training: str):
    path = tmp_path / "legacy.py"
    path.write_text(textwrap.dedent(f"def get_config():\n    return {{'training': {training}}}\n"))
    return path


def test_legacy_data_keys_under_training_land_under_data(tmp_path):
    path = write_legacy(
        tmp_path, "{'val_ratio': 0.2, 'num_workers': 0, 'length_cache_dir': '/c', 'lr_connector': 1e-3, 'seed': 3}"
    )
    mapped = load_legacy_config(path)
    assert mapped["data"] == {"val_ratio": 0.2, "num_workers": 0, "index_cache_dir": "/c"}
    assert mapped["training"] == {"lr_connector": 1e-3, "seed": 3}

    both = load_legacy_config(write_legacy(tmp_path, "{'length_cache_dir': '/old', 'index_cache_dir': '/new'}"))
    assert both["data"] == {"index_cache_dir": "/new"}  # as before: the older name counts only when the newer is unset
    unset = load_legacy_config(write_legacy(tmp_path, "{'length_cache_dir': '/old', 'index_cache_dir': None}"))
    assert unset["data"] == {"index_cache_dir": "/old"}


def test_the_repositorys_legacy_test_config_runs_with_its_data_settings():
    result = run_script("train.py", "--config", "conf/legacy/granite_docling_test.py", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    job = yaml.safe_load(result.stdout)
    assert (job["data"]["val_ratio"], job["data"]["num_workers"]) == (0.1, 2)
    assert "val_ratio" not in job["training"] and job["training"]["num_epochs"] == 1


@pytest.mark.parametrize(
    ("run_config", "expected"),
    [
        ("data:\n  val_ratio: 0.5\ntraining:\n  seed: 7\n", (0.5, 7)),
        ("training:\n  val_ratio: 0.25\n  seed: 9\n", (0.25, 9)),  # a run from before the data section
    ],
)
def test_evaluation_reads_the_validation_share_of_new_and_older_runs(tmp_path, run_config, expected):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(run_config)
    (tmp_path / "final_model").mkdir()
    assert training_split_settings(str(tmp_path / "final_model"), EvalConfig()) == expected


def test_no_data_module_takes_the_training_section():
    for path in sorted((REPO / "granite_docling" / "data").glob("*.py")):
        assert "TrainingConfig" not in path.read_text(), path.name
