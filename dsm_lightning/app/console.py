"""Console commands end a user error with one line (the message and its fix) instead of a traceback.

``DSM_LIGHTNING_TRACEBACK=1`` in the environment shows the full traceback instead, for debugging.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, TypeVar

from ..errors import DSMUserError

__all__ = ["TRACEBACK_ENV", "USER_ERRORS", "one_line", "run_console"]

#: Environment variable that turns full tracebacks back on.
TRACEBACK_ENV = "DSM_LIGHTNING_TRACEBACK"
#: Exceptions that mean "the input is wrong": the package raises these with the fix in the message (its own
#: :class:`~dsm_lightning.errors.DSMUserError` types, ``ValueError`` for bad values, ``OSError`` for paths), and
#: Lightning's ``MisconfigurationException`` for a bad Trainer setting. Anything else is a bug and keeps its
#: traceback.
USER_ERRORS: tuple = (DSMUserError, ValueError, OSError)
try:  # Lightning's own "bad setting" error (e.g. trainer.limit_predict_batches=-1)
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    USER_ERRORS = (*USER_ERRORS, MisconfigurationException)
except ImportError:  # pragma: no cover - lightning is a dependency
    pass

T = TypeVar("T")


def one_line(err: BaseException) -> str:
    """``"<Type>: <message>"`` on one line (a DataLoader worker's re-raised error keeps only its last line)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1]
    return f"{type(err).__name__}: {' '.join(text.split())}"


def run_console(fn: Callable[[], T], prog: str) -> T:
    """Call ``fn()``; a :data:`USER_ERRORS` exception prints ``<prog>: error: ...`` and exits with status 1, and a
    stop on SIGTERM exits with 143 (128 + 15), as a process killed by it would, never 0."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return fn()
    try:
        return fn()
    except USER_ERRORS as err:
        print(f"{prog}: error: {one_line(err)}\n(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        raise SystemExit(1) from None
    except SystemExit as stop:
        # Lightning's fit and evaluation loops end on SIGTERM with SIGTERMException(), whose status would be 0
        if type(stop).__name__ == "SIGTERMException" and stop.code is None:
            print(f"{prog}: stopped by SIGTERM at the end of a batch", file=sys.stderr)
            raise SystemExit(128 + 15) from None
        raise
