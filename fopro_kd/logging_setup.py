"""One log line per event: the command line's logging setup (``fopro-kd ...``).

Flower installs its own console handler on the ``flwr`` logger at import time *and* lets the
records propagate to the root logger, so with any root handler (``logging.basicConfig``) every
Flower line was printed twice, once in Flower's colour format and once in ours. Flower also
sets its logger to DEBUG, and a propagated record skips the root logger's level check, which
let its DEBUG lines through; alembic (Flower's state database) announces every migration
plugin at INFO. :func:`configure_logging` fixes all three:

* the root logger gets exactly one stream handler (ours; re-running replaces it, handlers
  that others installed, e.g. pytest's capture, are left alone);
* Flower's own console handler is removed, so its records reach the console once, through
  the root handler, in the same format as fopro-kd's;
* third-party loggers (Flower, Ray, alembic, SQLAlchemy, urllib3, filelock, matplotlib) are set
  to WARNING, or DEBUG with ``--verbose``. fopro-kd's own loggers stay at INFO (round and epoch
  progress); tqdm progress bars are not logging and are unaffected.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["NOISY_LOGGERS", "configure_logging", "detach_flower_console"]

NOISY_LOGGERS: tuple[str, ...] = (
    "flwr", "ray", "alembic", "sqlalchemy", "urllib3", "filelock", "matplotlib", "PIL", "timm", "httpx",
    "huggingface_hub",
)
"""Loggers of libraries whose INFO/DEBUG lines are noise to a researcher (WARNING unless ``--verbose``)."""

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_fopro_kd_handler"


_state = {"verbose": None}


def detach_flower_console() -> bool:
    """Remove Flower's own console handler from the ``flwr`` logger; True when one was removed.

    Call it after importing Flower (which installs the handler and resets the ``flwr`` level to
    DEBUG at import). Only acts when the root logger has a handler: otherwise Flower's lines
    would vanish instead of being printed once. After :func:`configure_logging` it also re-applies
    the ``flwr`` level (WARNING, or DEBUG with ``--verbose``).
    """
    if not logging.getLogger().handlers:
        return False
    # looked up, not imported: the library never imports Flower (tests/test_import_structure.py);
    # importing flwr loads this module and installs the handler, so without it there is none to remove
    flower_logger = sys.modules.get("flwr.supercore.logger")
    if flower_logger is None:
        return False
    console_handler = flower_logger.ConsoleHandler
    flower = logging.getLogger("flwr")
    removed = False
    for handler in list(flower.handlers):
        if isinstance(handler, console_handler):
            flower.removeHandler(handler)
            removed = True
    flower.propagate = True
    if _state["verbose"] is not None:
        flower.setLevel(logging.DEBUG if _state["verbose"] else logging.WARNING)
        if not _state["verbose"] and not any(isinstance(f, _KnownDeprecation) for f in flower.filters):
            flower.addFilter(_KnownDeprecation())
    return removed


class _KnownDeprecation(logging.Filter):
    """Drops Flower's warning that ``run_simulation`` is deprecated: ``fopro-kd simulate`` calls it on
    purpose (one process, no SuperLink) and the user can do nothing about it (shown with ``--verbose``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def configure_logging(verbose: bool = False, stream: Any = None) -> logging.Handler:
    """Set up the process's logging as described in the module docstring; return the root handler.

    Does not import Flower (``fopro-kd report`` should start fast); commands that use it call
    :func:`detach_flower_console` after importing it, and do so here if it is already imported.

    Parameters
    ----------
    verbose : bool
        DEBUG for fopro-kd and for the third-party loggers in :data:`NOISY_LOGGERS`.
    stream : file-like, optional
        Where the handler writes (default ``sys.stderr``, looked up at call time).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _MARK, False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("fopro_kd").setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    _state["verbose"] = bool(verbose)
    if "flwr.supercore.logger" in sys.modules:
        detach_flower_console()
    return handler
