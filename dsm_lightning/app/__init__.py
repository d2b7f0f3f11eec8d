"""The application built on the library: the command line (LightningCLI), its LightningModule and DataModule,
the prediction writer, the console and the pictures. It needs the ``app`` extra (``pip install
'dsm-lightning[app]'``); the library (everything outside this package) never imports it."""

from __future__ import annotations

import importlib.util
from typing import List

__all__ = ["missing_requirements"]

#: the import name of each distribution the ``app`` extra brings
_REQUIREMENTS = {"jsonargparse": "jsonargparse", "safetensors": "safetensors", "PIL": "pillow"}


def missing_requirements() -> List[str]:
    """The distributions of the ``app`` extra that are not installed (empty when the command line can run)."""
    return [dist for module, dist in _REQUIREMENTS.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken or blocked installation counts as missing
        return False
