"""A user's mistake ends the process with one line, ``error: ...``, and exit code 2, not a stack trace.

``user_errors()`` (around an entry point's ``main()``) and ``@exit_on_user_error`` (on its Hydra task function)
word as one line any :class:`~granite_docling.user_error.UserError` (its message: a ``ConfigError``, a path that
is no dataset, a checkpoint that cannot be read or saved...), a bad override, an unknown group option, and an output
folder that cannot be written. Other errors, and all of them under ``HYDRA_FULL_ERROR=1``, keep their traceback::

    python train.py training.lr_conector=1e-3    # error: training.lr_conector: Key 'lr_conector' not in ...
    python train.py training.val_ratio=0.1       # error: training.val_ratio is now data.val_ratio: ...
"""

from __future__ import annotations

import errno
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from typing import Any, NoReturn

from granite_docling.config import did_you_mean, moved_key
from granite_docling.user_error import UserError

EXIT_USER_ERROR = 2  # a mistake in the command, the config or the data (as argparse's usage errors)
_user_full_error: bool | None = None  # HYDRA_FULL_ERROR=1 as the user set it; None outside user_errors()


def user_error_message(error: BaseException) -> str | None:
    """The one line that says what is wrong with the command, config or data; None for anything else (a bug,
    whose traceback is wanted)."""
    from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(error, UserError):
        return str(error)
    if (line := _moved_key_line(error)) is not None:
        return line
    if isinstance(error, OSError) and error.errno in _FOLDER_ERRNOS and error.filename is not None:
        return _os_error_line(error)
    if isinstance(error, OmegaConfBaseException):  # e.g. a bad ${interpolation}, met when the config is resolved
        return _omegaconf_line(error)
    if not isinstance(error, CompactHydraException):  # Hydra's own user errors: composition, override syntax
        return None
    lines = [line.strip() for line in str(error).split("\n\n")[0].splitlines()]  # not the config search path
    paragraph = "; ".join(line for line in lines if line)
    if isinstance(error, MissingConfigException):
        group = (error.missing_cfg_file or "").rpartition("/")[0]
        if error.options:
            return f"{paragraph.rstrip('.')}; choose from {', '.join(error.options)}"
        return f"{paragraph.rstrip('.')}; see conf/{group}/ for the choices" if group else paragraph
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override {error.override!r}: {paragraph}"
    if isinstance(error.__cause__, OmegaConfBaseException):
        # 'Error merging override x=abc' / 'Could not override x' + the reason; not Hydra's '+x to append' hint,
        # which fails on our typed schema anyway
        return f"{str(error).splitlines()[0].rstrip('.')}: {_omegaconf_line(error.__cause__, with_key=False)}"
    return paragraph


# A folder or file the command was told to use that this user cannot create or write (a run folder, --out, OUT):
# the environment's to fix, never a bug of ours. ENOENT is not among them: a missing file is often a bug.
_FOLDER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.ENOSPC, errno.ENAMETOOLONG, errno.EDQUOT}


def _os_error_line(error: OSError) -> str:
    """``PATH: Permission denied; ...`` for a folder or file the process may not create, read or write."""
    reason = error.strerror or os.strerror(error.errno)
    hint = "check that you may write there, or choose another folder (hydra.run.dir=, --out)"
    return f"{error.filename}: {reason}; {hint}"


def _omegaconf_line(error: BaseException, with_key: bool = True) -> str:
    """First line of an OmegaConf error (after its full key), with a "did you mean" for a misspelt key."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    line = str(error).splitlines()[0]
    key = getattr(error, "key", None)
    schema = getattr(error, "object_type", None)
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)) and key is not None and is_dataclass(schema):
        line += did_you_mean(str(key), [f.name for f in fields(schema)])
    full_key = getattr(error, "full_key", None)
    return f"{full_key}: {line}" if with_key and full_key else line


def _moved_key_line(error: BaseException) -> str | None:
    """``training.val_ratio is now data.val_ratio: ...`` for a key of the seed's that moved (an override or a
    config file that sets it under its old name); None for any other error."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    key_errors = (ConfigKeyError, ConfigAttributeError)
    cause = error if isinstance(error, key_errors) else error.__cause__ or error.__context__
    if not isinstance(cause, key_errors):
        return None
    old = str(getattr(cause, "full_key", None) or "")
    new = moved_key(old)
    if new is None:
        return None
    given = re.search(rf"\+{re.escape(old)}=(.*)$", str(error))  # Hydra's hint repeats an override's value
    fix = f"write {new}={given.group(1)}" if given else f"set {new} instead"
    where = re.match(r"In '[^']+': ", str(error))  # a config file of the user's, e.g. In 'experiment/mine'
    line = f"{old} is now {new} (the data section holds what decides how samples become batches): {fix}"
    return (where.group(0) if where else "") + line


def _traces_wanted() -> bool:
    return _user_full_error if _user_full_error is not None else os.environ.get("HYDRA_FULL_ERROR") == "1"


def _exit_with(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


@contextmanager
def user_errors() -> Iterator[None]:
    """Around an entry point's ``main()``: a user's mistake ends the process with one ``error: ...`` line on
    stderr and exit code 2; anything else keeps its full traceback, and so does everything under HYDRA_FULL_ERROR=1.

    Hydra prints an exception with a stack trace, and a composition error over several lines, unless
    HYDRA_FULL_ERROR=1, in which case it raises them on; so this sets HYDRA_FULL_ERROR=1 and words them here.
    """
    global _user_full_error
    before = os.environ.get("HYDRA_FULL_ERROR")
    _user_full_error = before == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    except Exception as error:
        message = None if _traces_wanted() else user_error_message(error)
        if message is None:
            raise
        _exit_with(message)
    finally:
        _user_full_error = None
        if before is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def exit_on_user_error(task: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Decorate a Hydra task function (under ``@hydra.main``): a user's mistake ends a single run with one
    ``error: ...`` line (without Hydra's "Error executing job" line before it). In a sweep (``-m``) it is
    raised as Hydra expects: that job fails, the others run, and :func:`user_errors` words it at the end."""

    @functools.wraps(task)
    def run(cfg: Any) -> Any:
        try:
            return task(cfg)
        except Exception as error:
            from hydra.core.hydra_config import HydraConfig
            from hydra.types import RunMode

            message = None if _traces_wanted() else user_error_message(error)
            if message is None or HydraConfig.get().mode == RunMode.MULTIRUN:
                raise
            _exit_with(message)

    return run
