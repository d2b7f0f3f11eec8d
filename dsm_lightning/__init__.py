"""dsm-lightning: training-free ViT acceleration with Delayed Spatial Merging, as a PyTorch Lightning plugin."""

from .adapters import Adapter, UnsupportedModelError, get_adapter, register_adapter
from .adaptive import AdaptiveFlops, adaptive_flops, fit_thresholds
from .calibration import CalibrationResult, calibrate
from .config import DSMConfig
from .errors import DSMUserError
from .inspection import dense_intermediates, trace_tokens
from .patch import apply_dsm, get_config, is_patched, remove_dsm, token_plan
from .regional import compile_blocks, uncompile_blocks
from .schedule import BlockPlan, TokenPlan


def __getattr__(name):  # Lightning pieces load lazily: the core does not import lightning
    if name == "DSMCallback":
        from .callback import DSMCallback

        return DSMCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "Adapter",
    "AdaptiveFlops",
    "BlockPlan",
    "CalibrationResult",
    "DSMCallback",
    "DSMConfig",
    "DSMUserError",
    "TokenPlan",
    "UnsupportedModelError",
    "adaptive_flops",
    "apply_dsm",
    "calibrate",
    "compile_blocks",
    "dense_intermediates",
    "fit_thresholds",
    "get_adapter",
    "get_config",
    "is_patched",
    "register_adapter",
    "remove_dsm",
    "token_plan",
    "trace_tokens",
    "uncompile_blocks",
]
