"""A user's mistake gives one ``error: ...`` line and exit code 2, before any model or data is loaded; a bug, or
any error under HYDRA_FULL_ERROR=1, keeps its traceback."""

from __future__ import annotations

import ast
import errno
import importlib
import re
from pathlib import Path

import pytest
from conftest import compose_config, run_script
from PIL import Image

import granite_docling
from granite_docling.errors import user_error_message
from granite_docling.preflight import check_paths
from granite_docling.user_error import UserError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A Docling folder (never read: the runs fail before), one with only a val split, one with no dataset."""
    root = tmp_path_factory.mktemp("folders")
    for name, split in (("docling", "train"), ("val_only", "val")):
        (root / name / "anns" / split).mkdir(parents=True)
        (root / name / "anns" / split / "a.json").write_text('{"img_pth": "images/a.png", "anns": []}')
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a dataset")
    return root


def assert_one_line_error(result, *hints: str) -> str:
    stderr = result.stderr
    assert result.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = [line for line in stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: "), stderr[-3000:]
    for hint in hints:
        assert hint in last, last
    assert "dataset DoclingMatix:" not in result.stdout + stderr  # failed before the data was opened
    return last


MATIX = ["dataset=[docling_matix]"]

CASES = {
    "missing dataset path": (
        ["train.py", *MATIX, "dataset.docling_matix.path=/no/such/data"],
        ["dataset.docling_matix.path=/no/such/data: no such file or folder", "or a hub id"],
    ),
    "folder without a dataset": (
        ["train.py", *MATIX, "dataset.docling_matix.path={folders}/notes"],
        ["holds no dataset", "pass dataset.docling_matix.path="],
    ),
    "Docling folder without the split": (
        ["train.py", *MATIX, "dataset.docling_matix.path={folders}/val_only"],
        ["has no anns/train/*.json", "set dataset.docling_matix.split to one of val"],
    ),
    "missing model checkpoint": (
        ["train.py", *MATIX, "dataset.docling_matix.path={folders}/docling", "model.checkpoint=/no/such/model"],
        ["model.checkpoint=/no/such/model: no such folder", "hub id"],
    ),
    "resume from a folder without training state": (
        ["train.py", *MATIX, "dataset.docling_matix.path={folders}/docling", "training.resume={folders}/docling"],
        ["holds no training state", "model.checkpoint="],
    ),
    "wrong value type": (["train.py", "training.lr_connector=abc"], ["training.lr_connector=abc", "Float"]),
    "misspelt key": (["train.py", "training.batch_sizee=2"], ["batch_sizee", "did you mean 'batch_size'?"]),
    "unknown group option": (["train.py", "model=nosuch"], ["model/nosuch", "choose from", "tiny"]),
    "unknown dataset": (["train.py", "dataset=[nosuch]"], ["dataset/nosuch", "conf/dataset/"]),
    "missing legacy config file": (["train.py", "--config", "/no/such.py"], ["--config /no/such.py: no such file"]),
    "evaluate: missing checkpoint": (
        ["evaluate.py", "checkpoint=/no/such/model", "dataset=[sample]", "dataset.sample.path={folders}/docling"],
        ["checkpoint=/no/such/model: no such folder", "hub id"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_mistake_is_one_line(case, folders, tmp_path):
    args, hints = CASES[case]
    result = run_script(*(a.format(folders=folders) for a in args), f"hydra.run.dir={tmp_path / 'run'}", timeout=60)
    assert_one_line_error(result, *hints)
    assert "Error executing job" not in result.stderr  # a single run: no Hydra line before ours


def test_a_bad_trial_fails_the_sweep_at_its_end_in_one_line(tmp_path):
    result = run_script("train.py", "-m", *MATIX, "dataset.docling_matix.path=/no/such/a,/no/such/b",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=60)  # fmt: skip
    assert "#1 : " in result.stdout  # the second trial still ran after the first failed
    assert_one_line_error(result, "dataset.docling_matix.path=/no/such/a: no such file or folder")
    assert "Error executing job with overrides" in result.stderr  # Hydra names the failed trial


@pytest.mark.parametrize(
    "args",
    [
        ["train.py", "training.batch_sizee=2"],  # at composition
        ["evaluate.py", "checkpoint=/no/such/model", "dataset=[sample]"],  # in the task function
    ],
)
def test_hydra_full_error_shows_the_traceback(args, tmp_path):
    result = run_script(*args, f"hydra.run.dir={tmp_path / 'run'}", env={"HYDRA_FULL_ERROR": "1"}, timeout=60)
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_hub_ids_are_not_checked_as_local_paths():
    check_paths(compose_config("dataset=[docling_matix]", "dataset.docling_matix.path=HuggingFaceM4/DoclingMatix"))


OUTPUT_UNDER_A_FILE = {  # root cannot be denied a folder, but nobody can create one inside a file
    # Hydra making a run folder (evaluate.py's is the same), and a command's own output folder (sample-data's too)
    "train.py run folder": ["train.py", "experiment=demo", "hydra.run.dir={file}/run"],
    "predict --out": ["-m", "granite_docling.cli", "predict", "tiny", "{file}.png", "--out", "{file}/converted"],
}


@pytest.mark.parametrize("case", list(OUTPUT_UNDER_A_FILE))
def test_an_output_folder_that_cannot_be_made_is_one_line(case, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    Image.new("RGB", (8, 8)).save(f"{file}.png")
    args = [a.format(file=file) for a in OUTPUT_UNDER_A_FILE[case]]
    assert_one_line_error(run_script(*args, timeout=60), f"{file}/", "Not a directory", "choose another folder")


def test_a_permission_error_on_a_named_path_is_one_line():
    message = user_error_message(PermissionError(errno.EACCES, "Permission denied", "/shared/runs/x"))
    assert message.startswith("/shared/runs/x: Permission denied; ")
    assert user_error_message(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None  # a bug's, maybe


PACKAGE = Path(granite_docling.__file__).parent
# Errors the package raises and catches itself: one bad record or image, reported as a Problem (or a skipped image),
# never shown as the run's one line (data.on_bad_sample=error raises a BadSampleError with it).
INTERNAL_ERRORS = {"ImageError", "RecordError"}


def defined_error_classes() -> dict[str, type]:
    """Every exception class defined in a module of the package, found by reading the sources (so a module that
    defines none is not imported), by ``module.Class`` name."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
        if not any(name.endswith(("Error", "Exception")) for name in names):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = importlib.import_module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
        for name in names:
            cls = getattr(module, name)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found[f"{module.__name__}.{name}"] = cls
    return found


def test_every_error_for_users_is_a_user_error():
    errors = defined_error_classes()
    assert "granite_docling.config.ConfigError" in errors and "granite_docling.tools.export.ExportError" in errors
    not_user_errors = {name for name, cls in errors.items() if not issubclass(cls, UserError)}
    assert {name.rpartition(".")[2] for name in not_user_errors} == INTERNAL_ERRORS, (
        "subclass UserError (its message is the one line shown), or name it in INTERNAL_ERRORS with why"
    )
    for name, cls in errors.items():  # any of them, shown as its message alone
        if issubclass(cls, UserError) and cls.__init__ is UserError.__init__:
            assert user_error_message(cls("what to change")) == "what to change", name


def test_user_errors_keep_their_other_base():
    from granite_docling.config import ConfigError
    from granite_docling.data.sample import BadSampleError

    assert issubclass(ConfigError, ValueError) and issubclass(BadSampleError, RuntimeError)


def test_the_user_error_module_imports_nothing_and_errors_names_no_module():
    base = ast.parse((PACKAGE / "user_error.py").read_text(encoding="utf-8"))
    assert not [node for node in ast.walk(base) if isinstance(node, (ast.Import, ast.ImportFrom))]
    errors = ast.parse((PACKAGE / "errors.py").read_text(encoding="utf-8"))
    strings = [node.value for node in ast.walk(errors) if isinstance(node, ast.Constant)]
    names = [s for s in strings if isinstance(s, str) and re.fullmatch(r"granite_docling(\.\w+)+|\w+Error", s)]
    assert not names, "errors.py words a user error by its UserError base, not by module or class names"
    assert "sys.modules" not in ast.unparse(errors)
