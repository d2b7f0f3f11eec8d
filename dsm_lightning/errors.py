"""The package's error types for user mistakes: the console commands print these (and ``ValueError`` / ``OSError``,
which the package raises for bad values and paths) as one line naming the fix; anything else keeps its traceback,
because it is a bug.

Each type also derives from the built-in a caller would expect, so ``except TypeError`` keeps working.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DSMUserError", "InputError", "ModelAttributeError"]


class DSMUserError(Exception):
    """A mistake in what the user passed; the message says what to change."""


class ConfigError(DSMUserError, TypeError):
    """A config of the wrong type or with unknown fields."""


class InputError(DSMUserError, RuntimeError):
    """Inputs the model cannot run merged (an unreadable image, a token count the plan does not expect)."""


class ModelAttributeError(DSMUserError, AttributeError):
    """``model_attr`` names an attribute the LightningModule does not have."""
