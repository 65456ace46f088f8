"""Errors a person can read: a user error ends the program with its message, not a traceback.

Our code names the file and what was expected when a dataset, datalist, checkpoint, input or
setting is wrong. Under ``python -m monai.bundle run`` MONAI wraps such an error in its
``RuntimeError("Failed to evaluate ...")`` / ``("Failed to instantiate ...")`` chain, so the
console showed 60-280 lines of config-machinery traceback with the message somewhere inside.
:func:`install` makes :func:`excepthook` the process's ``sys.excepthook``; when the uncaught exception is
a user error, alone or inside MONAI's wrappers, stderr gets two lines and the exit status stays 1::

    Full traceback: /tmp/selfmedmae-error-20260101-120000-4242.txt (SELFMEDMAE_TRACEBACK=1 prints it here)
    error: Checkpoint not found: /data/models/model.pt. Check the path, or run the stage that writes it first.

Importing the package installs nothing (a program or a test that imports it keeps its own hook). Whoever
runs calls :func:`install`: every bundle config's first ``run`` expression,
``$selfmedmae_components.errors.install()``, before anything that can fail is resolved (MONAI resolves
nothing before ``run`` in our configs: no ``initialize``; the multi-GPU layers' ``initialize`` only sets
up torch.distributed), and the ``main`` of each tool in ``tools/`` that uses the package.

A user error is a :class:`UserError` (``DatasetError`` and ``CheckpointError`` are ones), or a
``ValueError`` / ``FileNotFoundError`` / ``NotADirectoryError`` raised by a ``raise`` statement in
this package. Anything else (a bug, an error inside a library, Ctrl-C) keeps Python's full
traceback, and so does every error when ``SELFMEDMAE_TRACEBACK=1`` is set. Only a process's
uncaught exception passes through here: pytest reports test failures itself, and under torchrun
each worker prints the short form before torchrun's own failure summary. An error raised inside a
DataLoader worker process reaches the main process as text (torch re-raises a new exception) and
keeps its traceback; MONAI's StatsHandler, which logs an engine's exception with its traceback
before re-raising it, logs a user error's message alone.
"""

from __future__ import annotations

import dis
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import TracebackType

__all__ = ["UserError", "ENV_VAR", "find_user_error", "excepthook", "install"]

ENV_VAR = "SELFMEDMAE_TRACEBACK"
_PACKAGE = __name__.split(".")[0]  # selfmedmae_components
_STATS_LOGGER = "monai.handlers.StatsHandler"  # StatsHandler's default logger name
_MONAI_WRAPPERS = ("Failed to evaluate", "Failed to instantiate", "applying transform")
_RAISE = dis.opmap["RAISE_VARARGS"]
_BUILTIN_USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError)


class UserError(Exception):
    """Base of the project's errors about what a user gave (files, datasets, settings): its message
    alone says what is wrong, so the console shows only that (see the module docstring)."""


def _raised_by_a_raise_statement_in(exc: BaseException, package: str) -> bool:
    """True when the innermost frame of ``exc`` is a ``raise`` statement in a module of ``package``."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    module = tb.tb_frame.f_globals.get("__name__", "")
    in_package = module == package or module.startswith(package + ".")
    return in_package and 0 <= tb.tb_lasti < len(code.co_code) and code.co_code[tb.tb_lasti] == _RAISE


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, UserError) or (
        isinstance(exc, _BUILTIN_USER_ERRORS) and _raised_by_a_raise_statement_in(exc, _PACKAGE)
    )


def _is_monai_wrapper(exc: BaseException) -> bool:
    """MONAI's ``raise RuntimeError("Failed to evaluate ..." / "Failed to instantiate ..." /
    "applying transform ...") from e`` (config items, component instantiation, transforms)."""
    return (
        type(exc) is RuntimeError
        and exc.__cause__ is not None
        and str(exc).startswith(_MONAI_WRAPPERS)
        and _raised_by_a_raise_statement_in(exc, "monai")
    )


def find_user_error(exc: BaseException | None) -> BaseException | None:
    """The user error that ``exc`` is, or that MONAI's wrappers around it were raised from; else None.

    Only explicit wrapping (``raise ... from e``) is followed: an exception raised *while handling*
    a user error (``__context__``) is a different problem and keeps its traceback.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if _is_user_error(exc):
            return exc
        if not _is_monai_wrapper(exc):
            return None
        exc = exc.__cause__
    return None


def _shortened(exc: BaseException | None) -> BaseException | None:
    """The user error to show instead of ``exc``'s traceback; None for a full traceback."""
    wanted = os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes", "on")
    return None if wanted or hasattr(sys, "ps1") else find_user_error(exc)  # ps1: an interactive session


def _write_traceback(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> Path:
    name = f"selfmedmae-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    path = Path(tempfile.gettempdir()) / name
    command = " ".join(getattr(sys, "orig_argv", sys.argv))
    path.write_text(f"$ {command}\n\n" + "".join(traceback.format_exception(exc_type, exc, tb)))
    return path


def excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, fallback=sys.__excepthook__
) -> None:
    """Print a user error as ``error: <message>`` (full traceback to a file); anything else via ``fallback``."""
    user_error = _shortened(exc)
    if user_error is None:
        return fallback(exc_type, exc, tb)
    try:
        log = _write_traceback(exc_type, exc, tb)
    except OSError:
        return fallback(exc_type, exc, tb)
    try:
        sys.stdout.flush()  # what the run printed comes first
    except (OSError, ValueError):
        pass
    print(f"Full traceback: {log} ({ENV_VAR}=1 prints it here)", file=sys.stderr)
    print(f"error: {user_error}", file=sys.stderr, flush=True)


class _UserErrorLogFilter(logging.Filter):
    """MONAI's StatsHandler logs an engine's exception with its traceback (``logger.exception``)
    before re-raising it; for a user error it logs the message alone (the hook writes the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        user_error = _shortened(record.exc_info[1]) if record.exc_info else None
        if user_error is not None:
            record.msg, record.args, record.exc_info, record.exc_text = "Exception: %s", (user_error,), None, None
        return True


def install() -> None:
    """Make :func:`excepthook` the process's ``sys.excepthook``, falling back to the hook it replaces,
    and shorten StatsHandler's log of a user error (once per process)."""
    if getattr(sys.excepthook, "_selfmedmae", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        excepthook(exc_type, exc, tb, fallback=previous)

    hook._selfmedmae = True
    sys.excepthook = hook
    if "monai" in sys.modules:  # a bundle run (never import MONAI here just for this)
        from monai.apps.utils import get_logger

        # the logger as StatsHandler makes it (its own stdout handler), so that nothing else changes
        get_logger(_STATS_LOGGER).addFilter(_UserErrorLogFilter())
