"""The ``headavatar`` logger: user-facing messages of library code.

Library modules take a child logger and never print::

    from headavatar.log import get_logger
    log = get_logger(__name__)
    log.info("imported 120 frames")          # -> "imported 120 frames"      (stdout)
    log.warning("not checkpointing ...")     # -> "warning: not checkpointing ..." (stderr)

Out of the box (Python API, tests) the ``headavatar`` logger shows INFO and above, as
the prints it replaces did; the CLI calls ``configure()`` once with the user's
verbosity. Messages go through ``tqdm.write`` so a running progress bar is cleared
and redrawn below them instead of being broken in two. The streams are looked up
when a message is written, so redirected ``sys.stdout``/``sys.stderr`` (pytest's
capsys, a notebook) are honoured.

``warnings.warn`` stays the way to tell a Python caller about input it can fix (a
caller may catch or filter it); ``configure()`` also shows headavatar's own warnings
as ``warning: ...`` lines under the same verbosity.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Literal

ROOT = "headavatar"
Verbosity = Literal["quiet", "normal", "verbose"]
LEVELS: dict[str, int] = {"quiet": logging.WARNING, "normal": logging.INFO, "verbose": logging.DEBUG}


class MessageFormatter(logging.Formatter):
    """A plain message at INFO and DEBUG; ``warning: ...`` / ``error: ...`` above."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname.lower()}: {msg}"
        return msg


class TqdmHandler(logging.Handler):
    """Writes each record with ``tqdm.write``: INFO and below to stdout, warnings and errors to stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            tqdm.write(self.format(record), file=stream)
        except Exception:  # a logging call must never take the program down
            self.handleError(record)


_handler: TqdmHandler | None = None


def _install() -> logging.Logger:
    """Give the ``headavatar`` logger its handler once (level INFO unless configured)."""
    global _handler
    root = logging.getLogger(ROOT)
    if _handler is None:
        _handler = TqdmHandler()
        _handler.setFormatter(MessageFormatter())
        root.addHandler(_handler)
        # our handler shows the messages; a root handler an application adds would repeat them
        root.propagate = False
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return root


def get_logger(name: str = ROOT) -> logging.Logger:
    """The logger for ``name`` (usually ``__name__``), placed under ``headavatar``."""
    _install()
    if name != ROOT and not name.startswith(ROOT + "."):
        name = f"{ROOT}.{name}"
    return logging.getLogger(name)


def level_of(verbosity: Verbosity | int) -> int:
    """'quiet' / 'normal' / 'verbose', or a count (-1 quiet, 0 normal, >= 1 verbose) -> a logging level."""
    if isinstance(verbosity, bool) or not isinstance(verbosity, (int, str)):
        raise ValueError(f"verbosity must be one of {', '.join(LEVELS)} or an int, got {verbosity!r}")
    if isinstance(verbosity, int):
        return LEVELS["quiet" if verbosity < 0 else "normal" if verbosity == 0 else "verbose"]
    if verbosity not in LEVELS:
        raise ValueError(f"verbosity must be one of {', '.join(LEVELS)}, got {verbosity!r}")
    return LEVELS[verbosity]


def configure(verbosity: Verbosity | int = "normal", *, show_warnings: bool = True) -> None:
    """Set how much the ``headavatar`` logger shows; the CLI calls this once per command.

    quiet: warnings and errors only; normal: plus progress messages (INFO); verbose:
    plus details (DEBUG). With ``show_warnings``, ``warnings.warn`` calls made by
    headavatar's own modules are shown as ``warning: ...`` lines through the same
    handler (so ``--quiet`` keeps them, and they look like the rest); warnings of other
    packages keep Python's default display.
    """
    _install().setLevel(level_of(verbosity))
    if show_warnings and not getattr(warnings.showwarning, "_headavatar", False):
        warnings.showwarning = _warning_shower(warnings.showwarning)


def _warning_shower(fallback):
    """A ``warnings.showwarning`` that routes warnings raised inside headavatar to its logger."""
    import headavatar

    pkg_dir = headavatar.__file__.rsplit("__init__.py", 1)[0]

    def show(message, category, filename, lineno, file=None, line=None):
        if file is None and str(filename).startswith(pkg_dir):
            get_logger("headavatar.warnings").warning("%s", message)
        else:
            fallback(message, category, filename, lineno, file, line)

    show._headavatar = True
    return show


__all__ = ["ROOT", "Verbosity", "LEVELS", "configure", "get_logger", "level_of", "MessageFormatter", "TqdmHandler"]
