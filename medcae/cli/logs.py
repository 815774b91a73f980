"""A quiet console and a complete log file for every job.

The console keeps medcae's own progress lines (one per stage: files read, images/s and ETA,
epochs, classifier, bundle) and every warning or error. ``<out>/run.log`` keeps everything at
INFO and above: medcae, Ray's driver-side loggers (``ray``, ``ray.data``, ``ray.train``,
``ray.tune``, ``ray.serve``, ...) and the worker output that Ray forwards to the driver.

How Ray routes its driver-side output (Ray 2.60):

- ``import ray`` gives the ``ray`` logger its own stderr handler (``propagate=False``).
- ``import ray.data`` gives ``ray.data`` its own handlers (``propagate=False``): a file under
  ``<session>/logs/ray-data`` and a console handler at INFO ("Execution plan of Dataset ...").
- Actors and tasks (the Ray Train V2 controller and workers, Ray Data's split coordinators) write
  to their own stdout/stderr; with ``ray.init(log_to_driver=True)`` the driver's log thread
  hands each batch of lines to ``ray._private.ray_logging.global_worker_stdstream_dispatcher``,
  whose ``ray_print_logs`` handler prints them. :func:`route_ray_output` wraps that handler.
- Ray Tune prints its trial tables with ``print`` (``RunConfig(verbose=...)`` controls them).

No function here imports Ray at module level, so the core can import this module.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RUN_LOG = "run.log"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Ray loggers that get their own handlers on the driver; others propagate to ``ray``.
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air", "ray.util")
#: Warnings that carry no information for a user of medcae (Ray internals, our own settings).
NOISE = re.compile(
    r"Progress bars disabled|DeprecationWarning|Token authentication is enabled"
    r"|constructor arguments in the object store"
    r"|PYTHON worker processes have been started on node"  # Ray's start-up concurrency note
)
#: Forwarded worker lines that are medcae's progress (the CAE epochs run in Train workers).
WORKER_PROGRESS = re.compile(r"^(?:medcae[.:]|CAE training |epoch \d+/\d+ )")
LOUD = re.compile(
    r"\b(?:WARNING|ERROR|CRITICAL|FATAL)\b|Traceback \(most recent call last\)"
    r"|^\w*(?:Error|Exception|Warning)\b|^\[[^\]]* [EF] \d+ \d+\]"
)
_HANDLER_NAME = "medcae-run-log"
_BUFFER_NAME = "medcae-early"
_CONSOLE_NAME = "medcae-console"
_file: logging.FileHandler | None = None


class ConsoleFilter(logging.Filter):
    """Pass medcae's own INFO lines, and warnings and errors that are not :data:`NOISE`.

    A record logged with ``extra={"to_console": False}`` goes to the file only.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "to_console", True):
            return False
        if record.levelno >= logging.WARNING:
            return not NOISE.search(record.getMessage())
        return record.name == "medcae" or record.name.startswith("medcae.")


class ConsoleFormatter(logging.Formatter):
    """``12:00:01 message`` for progress, with level and logger name for warnings."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")
        self._loud = logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return self._loud.format(record)
        return super().format(record)


def setup_console() -> None:
    """Quiet console on stderr, and a buffer that :func:`setup_run_logging` writes to the file.

    Call it first thing in a job, before its input is checked: the lines logged before the
    output folder is known still reach ``run.log``.
    """
    root = logging.getLogger()
    _drop(root, _CONSOLE_NAME, _BUFFER_NAME)
    root.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stderr)
    console.set_name(_CONSOLE_NAME)
    console.setFormatter(ConsoleFormatter())
    console.addFilter(ConsoleFilter())
    buffer = logging.handlers.MemoryHandler(10_000, flushLevel=logging.CRITICAL + 1)
    buffer.set_name(_BUFFER_NAME)
    root.addHandler(console)
    root.addHandler(buffer)
    logging.captureWarnings(True)  # Python warnings: console (unless noise) and run.log


def setup_run_logging(out_dir: str | Path, name: str = RUN_LOG) -> Path:
    """Write everything at INFO and above to ``<out_dir>/<name>`` (``run.log``); keep the
    console quiet.

    Installs :func:`setup_console` if it was not called, flushes its buffered lines into the
    file, attaches the file to the root logger and to Ray's non-propagating loggers, and turns
    those loggers' console handlers down to warnings. Calling it again moves the file.

    Returns:
        The path of the log file.
    """
    global _file
    root = logging.getLogger()
    if not any(h.get_name() == _CONSOLE_NAME for h in root.handlers):
        setup_console()
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _file
    _file = logging.FileHandler(path, encoding="utf-8")
    _file.set_name(_HANDLER_NAME)
    _file.setLevel(logging.INFO)
    _file.setFormatter(logging.Formatter(FILE_FORMAT))
    for h in list(root.handlers):
        if isinstance(h, logging.handlers.MemoryHandler) and h.get_name() == _BUFFER_NAME:
            h.setTarget(_file)
            h.flush()
            root.removeHandler(h)
            h.close()
    root.addHandler(_file)
    if old is not None:
        old.close()
    quiet_ray_console()
    logging.getLogger(__name__).info("command: %s", " ".join(sys.argv), extra={"to_console": False})
    return path


def run_log() -> Path | None:
    """The open run log, if :func:`setup_run_logging` was called."""
    return Path(_file.baseFilename) if _file is not None else None


def to_file(message: str, *args: Any, level: int = logging.INFO) -> None:
    """Log a line to ``run.log`` only (tables and summaries already printed on stdout)."""
    logging.getLogger("medcae").log(level, message, *args, extra={"to_console": False})


def print_summary(lines: list[str]) -> None:
    """A job's closing lines: on stdout, and once into ``run.log``."""
    text = "\n".join(lines)
    print(text)
    to_file("%s", text)


def quiet_ray_console() -> None:
    """Send Ray's own loggers to the run log, and only their warnings to the console.

    Imports ``ray`` and ``ray.data`` first (if installed), because importing them installs
    their handlers; what is installed later is fixed by :func:`route_ray_output`.
    """
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        return
    names = set(RAY_LOGGERS) | {
        n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")
    }
    for name in sorted(names):
        logger = logging.getLogger(name)
        if logger.propagate or not logger.handlers:
            continue  # reaches ``ray`` or the root, which are handled
        for h in logger.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(max(h.level, logging.WARNING))
                if not any(isinstance(f, ConsoleFilter) for f in h.filters):
                    h.addFilter(ConsoleFilter())
        _drop(logger, _HANDLER_NAME)
        if _file is not None:
            logger.addHandler(_file)


def route_ray_output() -> None:
    """After ``ray.init``: forwarded worker lines go to the run log, progress and errors also
    to the console; Ray loggers set up by ``ray.init`` are quieted like the others."""
    quiet_ray_console()
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    printer = dict(dispatcher.handlers).get("ray_print_logs")
    if printer is None or getattr(printer, "medcae", False):
        return  # log_to_driver=False, or already routed
    routed = _routed(printer)
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", routed)  # the name Ray removes at shutdown


def _routed(printer: Callable[[dict], None]) -> Callable[[dict], None]:
    workers = logging.getLogger("medcae.workers")

    def route(data: dict) -> None:
        lines = data.get("lines") or []
        who = data.get("actor_name") or data.get("task_name") or "worker"
        for line in lines:
            workers.info("(%s pid=%s) %s", who, data.get("pid"), line, extra={"to_console": False})
        keep = console_lines(lines)
        if keep:
            printer({**data, "lines": keep})

    route.medcae = True  # type: ignore[attr-defined]
    return route


def console_lines(lines: list[str]) -> list[str]:
    """The forwarded worker lines worth a terminal: medcae progress, warnings, errors and
    everything after a ``Traceback`` line in the same batch."""
    keep, in_traceback = [], False
    for line in lines:
        in_traceback = in_traceback or line.startswith("Traceback (most recent call last)")
        if in_traceback or WORKER_PROGRESS.search(line):
            keep.append(line)
        elif LOUD.search(line) and not NOISE.search(line):
            keep.append(line)
    return keep


def _drop(logger: logging.Logger, *names: str) -> None:
    for h in list(logger.handlers):
        if h.get_name() in names:
            logger.removeHandler(h)
