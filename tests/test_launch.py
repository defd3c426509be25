"""One process group and one run folder for all processes of a launch (torchrun, srun); legacy argv translation."""

from __future__ import annotations

import logging
import os
import pickle
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_script
from fixture_data import good_dataset
from omegaconf import OmegaConf
from test_elastic_resume import losses

from granite_docling import launch, legacy_config, slurm

STAMP_SCRIPT = """
import os, time
rank = int(os.environ["RANK"])
time.sleep(2.5 * rank)  # rank 1 asks seconds later: its own clock would give another folder
from granite_docling.launch import run_stamp
print(f"rank{rank}={run_stamp()}", flush=True)
"""


@pytest.mark.slow  # make test-slow: test_train_loop's torchrun run through train.py finds one run folder for both
def test_all_torchrun_processes_agree_on_one_run_folder(tmp_path):
    script = tmp_path / "stamp.py"
    script.write_text(STAMP_SCRIPT)
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), timeout=120)
    assert result.returncode == 0, result.stderr
    stamps = dict(line.split("=", 1) for line in result.stdout.split() if line.startswith("rank"))
    assert set(stamps) == {"rank0", "rank1"}
    assert stamps["rank0"] == stamps["rank1"]


@pytest.fixture
def fresh_stamp():
    """run_stamp asked anew (it is asked once per process), and forgotten after the test."""
    launch.run_stamp.cache_clear()
    yield
    launch.run_stamp.cache_clear()


def test_single_process_stamp_is_a_date_and_time(monkeypatch, fresh_stamp):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    date, clock = launch.run_stamp().split("/")
    assert len(date) == 10 and len(clock) == 8
    assert launch.run_stamp() == f"{date}/{clock}"  # stable within a process


def test_rank_suffix_keeps_log_files_apart(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    assert launch.rank_suffix() == ""
    monkeypatch.setenv("RANK", "3")
    assert launch.rank_suffix() == "_rank3"


def test_argv_without_legacy_flags_is_untouched():
    argv = ["dataset=[sample]", "training.seed=3", "-m"]
    assert legacy_config.translate_legacy_argv(argv) == argv


def test_legacy_argv_becomes_a_generated_primary_config(tmp_path):
    argv = legacy_config.translate_legacy_argv(
        ["--config", str(REPO / "conf/legacy/granite_docling_test.py"), "--resume", str(tmp_path), "training.seed=1"]
    )
    assert argv[0] == "--config-dir" and argv[2:4] == ["--config-name", "legacy_config"]
    assert argv[4:] == [f"training.resume={tmp_path}", "training.seed=1"]
    generated = (Path(argv[1]) / "legacy_config.yaml").read_text()
    assert "DoclingMatix_test" in generated and "config_schema" in generated


def test_resume_flag_without_legacy_config_says_what_to_use():
    with pytest.raises(SystemExit, match="training.resume"):
        legacy_config.translate_legacy_argv(["--resume", "ckpt"])


def test_hydra_settings_put_runs_under_outputs():
    result = run_script("train.py", "--cfg", "hydra")
    assert result.returncode == 0, result.stderr
    assert "dir: outputs/${run_stamp:}" in result.stdout
    assert "dir: outputs/multirun/${run_stamp:}" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# SLURM: srun's tasks form one process group and one run folder


def srun_task(rank: int, job: int = 123456, tasks: int = 2, **more: str) -> dict[str, str]:
    """What ``srun --ntasks=2`` on one node sets for task ``rank`` (the variables we read)."""
    return {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_NTASKS": str(tasks),
            "SLURM_STEP_NUM_TASKS": str(tasks), "SLURM_STEP_TASKS_PER_NODE": str(tasks), "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(job), **more}  # fmt: skip


@pytest.mark.parametrize(
    ("nodelist", "host"),
    [("gpu[001-004,007],cpu1", "gpu001"), ("node7", "node7"), ("a,b", "a"), ("n[09-12]-ib", "n09-ib"),
     ("rack[2-3]n[5,7]", "rack2n5"), ("gpu[007,001-004]", "gpu007"), ("127.0.0.1", "127.0.0.1")],
)  # fmt: skip
def test_first_host_of_a_slurm_host_list(nodelist, host):
    assert slurm.first_host(nodelist) == host


def test_tasks_per_node_expands_repeats():
    assert slurm.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.tasks_per_node("4") == [4]
    assert slurm.tasks_per_node("") == []
    with pytest.raises(ValueError, match="tasks-per-node"):
        slurm.tasks_per_node("4x2")


def test_srun_task_on_the_second_node_gets_torchrun_variables():
    task = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
            "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_JOB_ID": "123456",
            "SLURM_STEP_ID": "2"}  # fmt: skip
    expected = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                "MASTER_ADDR": "gpu003", "MASTER_PORT": "29194"}  # fmt: skip  # 15000 + (7 x 123456 + 2) % 17000
    assert slurm.slurm_environment(task) == expected
    first = slurm.slurm_environment({**task, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"})
    assert (first["MASTER_ADDR"], first["MASTER_PORT"]) == ("gpu003", "29194")  # every task agrees
    other_step = slurm.slurm_environment({**task, "SLURM_STEP_ID": "3"})
    assert other_step["MASTER_PORT"] == "29195"


def test_uneven_layout_and_explicit_master_address_and_port():
    task = srun_task(3, tasks=4, SLURM_NODEID="1", SLURM_LOCALID="0", SLURM_STEP_TASKS_PER_NODE="3,1",
                     MASTER_ADDR="10.0.0.1", MASTER_PORT="4000")  # fmt: skip
    env = slurm.slurm_environment(task)
    assert env["LOCAL_WORLD_SIZE"] == "1" and env["MASTER_ADDR"] == "10.0.0.1" and env["MASTER_PORT"] == "4000"


@pytest.mark.parametrize(
    "environ",
    [
        {**srun_task(0), "RANK": "0", "WORLD_SIZE": "2"},  # torchrun inside srun: torchrun's variables stand
        {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"},  # batch script
        {"SLURM_NTASKS": "8", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]"},  # salloc shell
        srun_task(0, tasks=1),  # a one-task step
        {},
    ],
    ids=["torchrun", "batch-script", "salloc", "one-task-step", "no-slurm"],
)
def test_one_process_slurm_jobs_and_other_launchers_get_nothing(environ):
    assert slurm.slurm_environment(environ) == {}


def test_apply_keeps_what_is_set_and_warns_about_a_batch_script_without_srun(caplog):
    environ = {**srun_task(1), "MASTER_PORT": "4000"}
    derived = slurm.apply_slurm_environment(environ)
    assert environ["RANK"] == "1" and environ["WORLD_SIZE"] == "2" and environ["MASTER_ADDR"] == "localhost"
    assert environ["MASTER_PORT"] == derived["MASTER_PORT"] == "4000"
    assert slurm.apply_slurm_environment(environ) == {}  # a second call changes nothing

    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}
    with caplog.at_level(logging.WARNING, logger="granite_docling.slurm"):
        assert slurm.apply_slurm_environment(batch) == {}
    assert "RANK" not in batch and "WORLD_SIZE" not in batch
    assert "8 tasks" in caplog.text and "srun" in caplog.text


def test_srun_tasks_stamp_the_run_folder_with_the_job_step(monkeypatch, fresh_stamp):
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in srun_task(1, job=4242, SLURM_STEP_ID="3").items():
        monkeypatch.setenv(key, value)
    assert launch.run_stamp() == "slurm-4242.3"
    assert launch.rank_suffix() == "_rank1"  # before apply_slurm_environment too (submitit's log files)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # one task: the clock, as without SLURM
    launch.run_stamp.cache_clear()
    assert launch.run_stamp().count("/") == 1 and not launch.run_stamp().startswith("slurm")


def test_a_sweep_job_launched_elsewhere_keeps_the_submitters_stamp(monkeypatch, fresh_stamp):
    """Hydra's submitit launcher pickles the composed config; each job composes its own and copies the cache."""
    launch.register_resolvers()
    for key in ("RANK", "WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(launch.time, "strftime", lambda _: "2030-01-02/03-04-05")
    submitted = OmegaConf.create({"dir": "outputs/multirun/${run_stamp:}"})
    assert submitted.dir == "outputs/multirun/2030-01-02/03-04-05"
    launch.run_stamp.cache_clear()
    for key, value in srun_task(0, job=99).items():  # the job, by itself, would name it slurm-99.0
        monkeypatch.setenv(key, value)
    assert launch.run_stamp() == "slurm-99.0"
    job = OmegaConf.create({"dir": "outputs/multirun/${run_stamp:}"})
    OmegaConf.copy_cache(from_config=pickle.loads(pickle.dumps(submitted)), to_config=job)
    assert job.dir == "outputs/multirun/2030-01-02/03-04-05"


def job_with_a_free_port() -> int:
    """A SLURM job id whose derived MASTER_PORT nobody listens on here."""
    for job in random.sample(range(10**6), 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", int(slurm.slurm_environment(srun_task(0, job))["MASTER_PORT"])))
            except OSError:
                continue
            return job
    raise RuntimeError("no free port in 50 tries")


@pytest.mark.slow  # make test-slow: the srun translation is tested above in-process; this trains through it
def test_srun_tasks_train_as_one_run_with_the_losses_of_torchrun(tmp_path):
    data = good_dataset(tmp_path / "data", 4)
    train = [str(REPO / "train.py"), "experiment=quick", f"dataset.sample.path={data}", "training.max_steps=3",
             "training.batch_size=1", "data.val_ratio=0", "data.num_workers=0", "training.warmup_steps=0",
             "training.log_interval=1"]  # fmt: skip
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # One after the other: started beside the srun tasks, the torchrun agent sometimes never returned on 2 cores.
    reference = run_script(*torchrun, *train, f"hydra.run.dir={tmp_path / 'torchrun'}", timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    # Two plain processes that know only what srun tells its tasks: no torchrun, RANK or MASTER_* variables.
    inherited = {k: v for k, v in os.environ.items()
                 if not k.startswith(("SLURM_", "TORCHELASTIC_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_",
                                      "ROLE_"))}  # fmt: skip
    job, work = job_with_a_free_port(), tmp_path / "work"
    work.mkdir()
    tasks = []
    for rank in (0, 1):
        with (work / f"task{rank}.log").open("w") as log:
            env = {**inherited, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **srun_task(rank, job)}
            tasks.append(subprocess.Popen([sys.executable, *train], cwd=work, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))  # fmt: skip
    codes = []
    try:
        for task in tasks:
            try:
                codes.append(task.wait(timeout=240))
            except subprocess.TimeoutExpired:
                codes.append("timed out")
    finally:
        for task in tasks:
            task.kill()
    assert codes == [0, 0], "\n".join((work / f"task{rank}.log").read_text()[-3000:] for rank in (0, 1))

    (run_dir,) = [p.parent for p in (work / "outputs").rglob(".hydra")]  # ONE folder, named after the job step
    assert run_dir == work / "outputs" / f"slurm-{job}.0"
    assert "2 process(es)" in (run_dir / "train.log").read_text() and (run_dir / "train_rank1.log").is_file()
    expected, got = losses(tmp_path / "torchrun"), losses(run_dir)
    assert sorted(got) == sorted(expected) == [1, 2, 3]
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=1e-5), f"step {step}"
