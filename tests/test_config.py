"""dsm_lightning/config.py: DSMConfig refuses values it would otherwise coerce silently."""

from __future__ import annotations

import pytest

from dsm_lightning import DSMConfig


def test_silent_coercions_are_refused():
    for kwargs in [dict(windows=(1.5, 2)), dict(windows="22"), dict(flops_target=True), dict(windows=(2, 2, 2))]:
        with pytest.raises(ValueError, match=r"windows|flops_target"):
            DSMConfig(**kwargs)
