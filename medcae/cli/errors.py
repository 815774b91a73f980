"""Turning input the user can fix into one-line messages, and keeping tracebacks for the rest."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Callable


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug: printed as one line, exit code 2."""
    from medcae.config import ConfigError
    from medcae.data import DataError
    from medcae.inference.bundle import BundleError
    from medcae.model.backbones import BackboneError
    from medcae.model.classifier import BudgetError

    return (BackboneError, BundleError, BudgetError, ConfigError, DataError)


def user_message(err: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or ``None`` for anything else.

    A ``FileNotFoundError`` counts only when it names its file (``err.filename``): a bare
    ``[Errno 2] No such file or directory`` (say, from a working directory that was removed)
    is a bug to debug, with its traceback.
    """
    if isinstance(err, user_errors()):
        return str(err)
    if isinstance(err, FileNotFoundError) and err.filename is not None:
        names = [err.filename, err.filename2]
        where = " -> ".join(str(n) for n in names if n is not None)
        return f"{err.strerror or 'no such file or directory'}: {where}"
    return None


def run_cli(fn: Callable[[], int]) -> int:
    """Run ``fn``; a user error prints ``error: <message>`` to stderr and returns 2.

    Any other exception prints its full traceback to stderr, and to the run log if one is open
    (:func:`medcae.cli.logs.setup_run_logging`), and returns 1.
    """
    try:
        return fn()
    except Exception as err:
        message = user_message(err)
        if message is not None:
            _to_run_log(logging.ERROR, "error: %s", message)
            print(f"error: {message}", file=sys.stderr)
            return 2
        text = traceback.format_exc()
        _to_run_log(logging.CRITICAL, "the job failed:\n%s", text.rstrip())
        print(text, end="", file=sys.stderr)
        return 1


def _to_run_log(level: int, message: str, *args: object) -> None:
    from medcae.cli.logs import run_log, to_file

    if run_log() is not None:
        to_file(message, *args, level=level)
