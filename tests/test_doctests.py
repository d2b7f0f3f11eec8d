"""The examples in the docstrings of the main entry points run (doctest)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "dsm_lightning.config",
    "dsm_lightning.merge",
    "dsm_lightning.adaptive",
    "dsm_lightning.guard",
    "dsm_lightning.patch",
    "dsm_lightning.callback",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
