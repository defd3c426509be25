"""The structured config: composition, typos and wrong types, cross-field validation, legacy Python files."""

from __future__ import annotations

import textwrap

import pytest
from conftest import REPO, compose_config, run_script

from granite_docling.config import ConfigError, DatasetConfig, validate
from granite_docling.legacy_config import load_legacy_config
from granite_docling.preflight import check_config


def test_cli_composes_two_datasets_and_an_override():
    result = run_script(
        "train.py", "dataset=[docling_matix,synth_formula]", "training.lr_connector=1e-3", "--cfg", "job"
    )
    assert result.returncode == 0, result.stderr
    assert "docling_matix:" in result.stdout and "synth_formula:" in result.stdout
    assert "lr_connector: 0.001" in result.stdout


def test_misspelt_key_fails_naming_it():
    result = run_script("train.py", "training.lr_conector=1e-3", "--cfg", "job")
    assert result.returncode != 0
    assert "lr_conector" in result.stderr


def test_wrong_type_fails_naming_the_key():
    cfg_error = run_script("train.py", "dataset.docling_matix.max_samples=lots", "--cfg", "job")
    assert cfg_error.returncode != 0
    assert "dataset.docling_matix.max_samples" in cfg_error.stderr


def test_each_selected_dataset_gets_its_own_node():
    cfg = compose_config("dataset=[docling_matix,synth_formula]", "dataset.docling_matix.path=/data/x")
    assert set(cfg.dataset) == {"docling_matix", "synth_formula"}
    assert isinstance(cfg.dataset["docling_matix"], DatasetConfig)
    assert cfg.dataset["docling_matix"].path == "/data/x"
    assert cfg.dataset["synth_formula"].path == "../SynthFormulaNet_00000"


def test_defaults_are_the_seeds_full_run():
    cfg = compose_config()
    assert cfg.model.checkpoint == "ibm-granite/granite-docling-258M"
    t = cfg.training
    assert (t.num_epochs, t.batch_size, t.gradient_accumulation_steps, cfg.data.val_ratio) == (3, 1, 8, 0.05)
    assert (cfg.data.val_max_samples, cfg.data.num_workers, cfg.data.on_bad_sample) == (64, 8, "skip")
    assert (t.lr_vision, t.lr_text, t.lr_connector) == (5e-5, 5e-5, 5e-4)
    assert (t.weight_decay, t.max_grad_norm, t.min_lr, t.gradient_checkpointing) == (0.01, 1.0, 1e-6, True)
    validate(cfg)


def test_quick_test_trainer_caps_every_dataset():
    cfg = compose_config("trainer=test")
    assert cfg.training.num_epochs == 1
    assert cfg.data.max_samples_per_dataset == 100
    assert cfg.training.lr_connector == 5e-4  # inherited from trainer/default


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=tiny"],
        ["model=tiny_hd64"],
        ["model=small"],
        ["model=granite_docling_258m", "model.random_init=true"],
        ["dataset=[sample]"],
        ["dataset=[folder]", "dataset.folder.path=/data/mine"],
        ["trainer=test"],
        ["experiment=quick"],
        ["experiment=demo"],
        ["experiment=learning_curve"],
        ["optimizer=adamw"],
    ],
)
def test_every_config_group_option_composes_and_validates(overrides):
    validate(compose_config(*overrides))


def test_quick_experiment_is_tiny_and_on_sample_data():
    cfg = compose_config("experiment=quick")
    assert cfg.model.name == "tiny" and cfg.model.random_init
    assert list(cfg.dataset) == ["sample"]
    assert cfg.training.mixed_precision == "no"


def test_validate_reports_every_problem_at_once():
    cfg = compose_config(
        "training.mixed_precision=fp8",
        "data.val_ratio=1.5",
        "training.batch_size=0",
        "model.checkpoint=null",
        "data.on_bad_sample=ignore",
        "data.image_path=gpu",
    )
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    message = str(error.value)
    for key in ("mixed_precision", "val_ratio", "batch_size", "model.checkpoint", "on_bad_sample", "image_path"):
        assert key in message


def test_validate_requires_a_dataset_path_and_something_to_train():
    cfg = compose_config("dataset=[folder]", "model.freeze_vision=true", "model.freeze_text=true",
                         "model.freeze_connector=true")  # fmt: skip
    with pytest.raises(ConfigError, match="dataset.folder.path is not set") as error:
        validate(cfg)
    assert "nothing would train" in str(error.value)


def test_validate_rejects_architecture_overrides_on_pretrained_weights():
    cfg = compose_config("model.architecture.text_layers=2")
    with pytest.raises(ConfigError, match="random_init"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Legacy get_config() files


def test_legacy_test_config_prints_inside_the_structured_config():
    result = run_script("train.py", "--config", "conf/legacy/granite_docling_test.py", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "DoclingMatix_test:" in out and "SynthFormulaNet_test:" in out
    assert "max_samples: 100" in out and "max_turns: 3" in out
    assert "save_dir: ./checkpoints/granite_docling_test" in out
    assert "project: granite-docling-test" in out and "run_name: quick_test" in out
    # schema fields the legacy file does not mention still appear, with their defaults
    assert "on_bad_sample: skip" in out
    # the legacy file's datasets replace the default ones
    assert "docling_matix:" not in out


def test_legacy_resume_flag_and_overrides_apply(tmp_path):
    result = run_script("train.py", "--config", "conf/legacy/granite_docling_config.py", "--resume", str(tmp_path),
                        "training.seed=7", "--cfg", "job")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"resume: {tmp_path}" in result.stdout
    assert "seed: 7" in result.stdout


def write_legacy(tmp_path, body: str):
    path = tmp_path / "legacy.py"
    path.write_text(textwrap.dedent(body))
    return path


def test_legacy_unknown_key_fails_with_suggestion(tmp_path):
    path = write_legacy(
        tmp_path,
        """
        def get_config():
            return {'model': {'checkpoint': 'x'},
                    'datasets': [{'name': 'a', 'path': '/a', 'max_sample': 3}],
                    'training': {'lr_conector': 1e-3}}
        """,
    )
    with pytest.raises(ConfigError) as error:
        load_legacy_config(path)
    assert "'lr_conector' (did you mean 'lr_connector'?)" in str(error.value)
    assert "'max_sample' (did you mean 'max_samples'?)" in str(error.value)

    result = run_script("train.py", "--config", str(path), "--cfg", "job")
    assert result.returncode != 0
    assert "did you mean 'lr_connector'" in result.stderr


def test_legacy_wrong_type_fails_at_composition(tmp_path):
    path = write_legacy(tmp_path, "def get_config():\n    return {'training': {'batch_size': 'big'}}\n")
    result = run_script("train.py", "--config", str(path), "--cfg", "job")
    assert result.returncode != 0
    assert "batch_size" in result.stderr


def test_legacy_dataset_names_become_unique_keys(tmp_path):
    path = write_legacy(
        tmp_path,
        """
        def get_config():
            return {'datasets': [{'name': 'My Docs', 'path': '/a'}, {'name': 'My Docs', 'path': '/b'}]}
        """,
    )
    mapped = load_legacy_config(path)
    assert list(mapped["dataset"]) == ["My_Docs", "My_Docs_2"]
    assert mapped["dataset"]["My_Docs_2"] == {"name": "My Docs", "path": "/b"}


def test_legacy_file_without_get_config_is_refused(tmp_path):
    path = write_legacy(tmp_path, "CONFIG = {}\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_legacy_config(path)


def test_repository_legacy_examples_use_the_hub_id():
    for name in ("granite_docling_config.py", "granite_docling_test.py"):
        mapped = load_legacy_config(REPO / "conf" / "legacy" / name)
        assert mapped["model"]["checkpoint"] == "ibm-granite/granite-docling-258M"


def test_auto_precision_picks_what_the_device_computes_fast(tmp_path):
    from granite_docling.precision import choose_precision, cpu_flags

    avx2_only = frozenset({"fpu", "sse2", "avx2", "fma"})  # the AMD EPYC where bf16 autocast was 10x slower
    amx = avx2_only | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert choose_precision("auto", cuda=False, cuda_bf16=False, cpu_flags=avx2_only)[0] == "no"
    assert choose_precision("auto", cuda=False, cuda_bf16=False, cpu_flags=amx)[0] == "bf16"
    assert choose_precision("auto", cuda=True, cuda_bf16=True, cpu_flags=avx2_only)[0] == "bf16"
    assert choose_precision("auto", cuda=True, cuda_bf16=False, cpu_flags=amx) == (
        "fp16",
        "auto: the GPU has no bf16, so fp16 with loss scaling",
    )
    assert choose_precision("bf16", cuda=False, cuda_bf16=False, cpu_flags=avx2_only) == ("bf16", "as set")
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert cpu_flags(cpuinfo) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_the_trainer_defaults_choose_the_precision_by_device():
    assert compose_config().training.mixed_precision == "auto"


def test_a_token_budget_needs_indexed_data_and_a_positive_size():
    cfg = compose_config("model=tiny", "dataset=[sample]", "dataset.sample.path=/data", "data.batch_tokens=0")
    with pytest.raises(ConfigError, match=r"data.batch_tokens=0 must be at least 1"):
        validate(cfg)
    streamed = compose_config(
        "model=tiny",
        "dataset=[sample]",
        "dataset.sample.path=/data",
        "dataset.sample.streaming=true",
        "data.batch_tokens=4096",
        "data.val_ratio=0",
    )
    with pytest.raises(ConfigError, match="data.batch_tokens needs indexed data"):
        validate(streamed)


def test_the_dataset_format_is_checked_with_every_other_problem_in_one_error():
    cfg = compose_config("dataset=[sample]", "dataset.sample.format=parquet", "training.batch_size=0")
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert "dataset.sample.format='parquet' is not one of auto, docling, docling_eval, hub" in str(error.value)
    assert "batch_size" in str(error.value)
    streamed = compose_config("dataset=[sample]", "dataset.sample.format=docling_eval", "dataset.sample.streaming=true")
    with pytest.raises(ConfigError, match=r"dataset.sample: docling-eval datasets are indexed, not streamed; drop"):
        check_config(streamed)
