"""The one base class of the mistakes a user fixes (a config, a path, a checkpoint, a data file).

Every such error of the package subclasses :class:`UserError` beside its usual base (``class ConfigError(UserError,
ValueError)``), so ``except ValueError`` still catches it and :mod:`granite_docling.errors` words every one of them
with one ``isinstance``. This module imports nothing, so any module can define a user error without a cost.
"""


class UserError(Exception):
    """A mistake the user fixes: its message is the one line shown (``error: <message>``, exit code 2)."""
