"""Turning expected user errors into one-line messages at the command line."""

from __future__ import annotations

import sys
from collections.abc import Callable


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug: printed as one line, exit code 2."""
    from medcae.backbones import BackboneError
    from medcae.bundle import BundleError
    from medcae.classifier import BudgetError
    from medcae.config import ConfigError
    from medcae.data import DataError

    return (BackboneError, BundleError, BudgetError, ConfigError, DataError, FileNotFoundError)


def run_cli(fn: Callable[[], int]) -> int:
    """Run ``fn``; on a user error print ``error: <message>`` to stderr and return 2."""
    try:
        return fn()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
