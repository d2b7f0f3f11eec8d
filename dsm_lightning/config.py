"""DSMConfig: the user-facing knobs of Delayed Spatial Merging.

A :class:`DSMConfig` is a frozen, hashable dataclass. It validates everything that can be checked without a model
when it is built; :func:`dsm_lightning.token_plan` checks the rest (depth, grid, token counts) and names the limit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from .errors import ConfigError

__all__ = ["DSMConfig", "window_grid"]

#: Forms of :attr:`DSMConfig.r`: an int, a fraction in (0, 0.5], one int per block, or None (from flops_target).
RType = Union[int, float, Sequence[int], None]
#: Values of :attr:`DSMConfig.metric`.
METRICS = ("keys", "tokens")
#: Values of :attr:`DSMConfig.matching`.
MATCHINGS = ("dsm", "tome")


def window_grid(windows: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """Return the (rows, cols) window grid for ``windows``.

    Args:
        windows: A perfect square (``4`` means a 2x2 grid, ``9`` a 3x3 grid, ``1`` no windowing) or an explicit
            ``(rows, cols)`` pair.

    Raises:
        ValueError: If ``windows`` is neither a positive perfect square nor a pair of positive ints.
    """
    if isinstance(windows, bool):
        raise ValueError(f"windows must be an int or a (rows, cols) pair, got {windows!r}")
    if isinstance(windows, int):
        side = math.isqrt(windows) if windows > 0 else 0
        if windows < 1 or side * side != windows:
            raise ValueError(
                f"windows={windows} is not a positive perfect square; pass 1, 4, 9, 16, ... "
                f"or an explicit (rows, cols) pair such as windows=(2, 3)"
            )
        return side, side
    if isinstance(windows, (str, bytes)):
        raise ValueError(f"windows must be an int or a (rows, cols) pair, got the string {windows!r}")
    try:
        pair = tuple(windows)
    except TypeError:
        raise ValueError(f"windows must be an int or a (rows, cols) pair, got {windows!r}") from None
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in pair):
        raise ValueError(f"windows=(rows, cols) must be two ints, got {windows!r}")
    rows, cols = pair
    if rows < 1 or cols < 1:
        raise ValueError(f"windows=(rows, cols) must both be >= 1, got {windows!r}")
    return rows, cols


@dataclass(frozen=True)
class DSMConfig:
    """Settings of Delayed Spatial Merging.

    Blocks ``0 .. delay-1`` stay dense. The next ``local_blocks`` blocks merge inside ``windows`` equal windows of
    the patch grid (each window merges ``ceil(r / windows)`` tokens); every later block merges ``r`` tokens over the
    whole image. :meth:`DSMConfig.tome` is official ToMe (``delay=0, local_blocks=0, metric="keys", protect=0``, a
    constant ``r`` and ToMe's own matching order).

    The defaults are the schedule that stayed closest to the dense model at matched FLOPs on held-out real data
    (README, "Accuracy vs speed"): no delay, no local phase, a proportional ``r``, token features as the matching
    metric and the 20% most class-attended tokens protected. Delay and the local phase lost fidelity there at equal
    FLOPs; they stay available.

    Args:
        delay: Number of leading blocks that are never merged (default 0).
        r: Tokens merged per merging block. An int applies to every block from ``delay`` on; a float in
            ``(0, 0.5]`` merges that fraction of the tokens entering each merging block (a proportional schedule);
            a sequence gives one value per block (length = depth; entries before ``delay`` must be 0). ``None``
            (default) picks, per input size, the smallest ``r`` of the ``schedule`` family whose planned FLOPs are
            at most ``flops_target`` times the dense model's.
        windows: Local windows: a perfect square (``4`` = 2x2) or ``(rows, cols)``.
        local_blocks: How many merging blocks after the delay merge inside windows before global merging starts
            (default 0).
        prop_attn: Proportional attention: add ``log(size)`` to the attention logits so a merged token counts as
            many tokens as it holds.
        flops_target: Fraction of the dense FLOPs to aim for when ``r`` is None (0.55 = 1.8x fewer FLOPs).
        schedule: Family searched when ``r`` is None: ``"proportional"`` (default; the same fraction of the
            remaining tokens in every merging block) or ``"constant"`` (the same r in every merging block, as
            ToMe). At matched FLOPs the proportional family kept more agreement with the dense model for every
            delay we measured (README, "Accuracy vs speed").
        metric: What pairs are matched on: ``"tokens"`` (default: the token features themselves, after the block's
            attention) or ``"keys"`` (ToMe: attention keys averaged over heads).
        protect: Fraction of the patch tokens entering a merging block, those the class token attends to most
            (averaged over heads; the mean query for models without a class token), that neither merge away nor
            receive a merge in that block (default 0.2). ``0`` (ToMe) protects none; needs an adapter that reports
            class attention (timm and torchvision do).
        matching: Which tokens form the two sets of the global bipartite matching, and in what order the unmerged
            ones leave it. ``"dsm"`` (default): the patch tokens alternate from the first patch, and unmerged tokens
            leave in the order of their best similarity. ``"tome"``: as official ToMe, the whole sequence alternates
            with the prefix tokens in it (with a class token, set ``a`` starts at the second patch), and unmerged
            tokens keep their input order whenever there is a prefix token. The two differ only in these arbitrary
            choices; both are measured (README, "Accuracy vs speed"). Local (windowed) merges always use ``"dsm"``.
        threshold: Adaptive merging. ``None`` (default): every image merges the planned number of tokens. A
            float, or one float per block: each global merging block of the plan merges, in each image, every
            pair whose cosine similarity is at least the block's threshold, so redundant images merge more
            (values above 1 merge nothing). Fit thresholds to a FLOP budget with
            :func:`~dsm_lightning.fit_thresholds`. Images of a batch are padded to the longest one (padding
            rows have size 0 and are hidden from attention), so proportional attention is required.
        buckets: With ``threshold``, how many token counts a block's output may have (the batch's longest image
            is rounded up to the next of ``buckets`` evenly spaced counts), which bounds the shapes a compiled
            graph sees.
    """

    delay: int = 0
    r: RType = None
    windows: Union[int, Tuple[int, int]] = 4
    local_blocks: int = 0
    prop_attn: bool = True
    flops_target: float = 0.55
    schedule: str = "proportional"
    metric: str = "tokens"
    protect: float = 0.2
    matching: str = "dsm"
    threshold: Union[float, Tuple[float, ...], None] = None
    buckets: int = 16

    @classmethod
    def tome(cls, r: Union[int, Sequence[int]], prop_attn: bool = True) -> DSMConfig:
        """Official ToMe (Bolya et al., 2023): ``r`` tokens merged in every block (an int, or one int per block as
        ToMe's ``model.r`` takes a list), matched on attention keys averaged over heads, no protection, no delay, no
        local phase, size-weighted averages, proportional attention, and ToMe's own matching order
        (``matching="tome"``). On a model whose only prefix token is a class token the merges are those of the
        official code (tested against a line-by-line transcription of it). Unlike ToMe, an ``r`` too large for a
        block raises instead of being clamped.

        Examples:
            >>> DSMConfig.tome(16).r, DSMConfig.tome(16).matching
            (16, 'tome')
        """
        return cls(r=r, schedule="constant", metric="keys", protect=0.0, prop_attn=prop_attn, matching="tome")

    def __post_init__(self) -> None:
        for name in ("delay", "local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self._check_r()
        rows, cols = window_grid(self.windows)
        object.__setattr__(self, "windows", (rows, cols) if not isinstance(self.windows, int) else self.windows)
        if not isinstance(self.prop_attn, bool):
            raise ValueError(f"prop_attn must be a bool, got {self.prop_attn!r}")
        if (
            isinstance(self.flops_target, bool)
            or not isinstance(self.flops_target, (int, float))
            or not 0.0 < float(self.flops_target) <= 1.0
        ):
            raise ValueError(f"flops_target must be in (0, 1], got {self.flops_target!r}")
        object.__setattr__(self, "flops_target", float(self.flops_target))
        if self.schedule not in ("constant", "proportional"):
            raise ValueError(f"schedule must be 'constant' or 'proportional', got {self.schedule!r}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if (
            isinstance(self.protect, bool)
            or not isinstance(self.protect, (int, float))
            or not 0.0 <= float(self.protect) < 0.5
        ):
            raise ValueError(
                f"protect is a fraction of the tokens in [0, 0.5), got {self.protect!r}; 0 protects nothing (ToMe)"
            )
        object.__setattr__(self, "protect", float(self.protect))
        if self.matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {self.matching!r}")
        self._check_threshold()

    def _check_r(self) -> None:
        r = self.r
        if r is not None:
            if isinstance(r, bool):
                raise ValueError(f"r must be an int, a per-block list of ints or None, got {r!r}")
            if isinstance(r, int):
                if r < 0:
                    raise ValueError(f"r must be >= 0, got {r}")
            elif isinstance(r, float):
                if not 0.0 < r <= 0.5:
                    raise ValueError(
                        f"a fractional r must be in (0, 0.5] (bipartite matching merges at most half "
                        f"the tokens), got {r}"
                    )
            else:
                try:
                    r_tuple = tuple(r)
                except TypeError:
                    raise ValueError(f"r must be an int, a per-block list of ints or None, got {r!r}") from None
                for i, v in enumerate(r_tuple):
                    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                        raise ValueError(f"r[{i}]={v!r}: every per-block r must be an int >= 0")
                object.__setattr__(self, "r", r_tuple)

    def _check_threshold(self) -> None:
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 1:
            raise ValueError(f"buckets must be an int >= 1, got {self.buckets!r}")
        if self.threshold is None:
            return
        values = self.threshold if isinstance(self.threshold, (list, tuple)) else (self.threshold,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -1.0 <= float(v) < math.inf:
                raise ValueError(
                    f"threshold must be a cosine similarity >= -1 (above 1 merges nothing), or one per block; "
                    f"got {self.threshold!r}"
                )
        if isinstance(self.threshold, (list, tuple)):
            object.__setattr__(self, "threshold", tuple(float(v) for v in self.threshold))
        else:
            object.__setattr__(self, "threshold", float(self.threshold))
        if not self.prop_attn:
            raise ValueError(
                "threshold (adaptive merging) pads images to the longest one and hides the padding through "
                "proportional attention; set prop_attn=True or threshold=None"
            )

    def block_threshold(self, index: int) -> Optional[float]:
        """The adaptive threshold of block ``index`` (None when merging is not adaptive)."""
        if isinstance(self.threshold, tuple):
            return self.threshold[index]
        return self.threshold

    @property
    def window_grid(self) -> Tuple[int, int]:
        """The (rows, cols) grid of local windows."""
        return window_grid(self.windows)

    @property
    def num_windows(self) -> int:
        """Number of local windows."""
        rows, cols = self.window_grid
        return rows * cols

    def replace(self, **changes: Any) -> DSMConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self) if not f.name.startswith("_")}
        if unknown:
            raise ConfigError(f"unknown DSMConfig field(s): {sorted(unknown)}; valid: {self.field_names()}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> List[str]:
        """Names of the public fields."""
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")]

    def to_dict(self) -> Dict[str, Any]:
        """Plain-Python dict of the public fields (YAML/JSON friendly)."""
        out: Dict[str, Any] = {}
        for name in self.field_names():
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_yaml(self, path: Optional[str] = None) -> str:
        """The config as YAML (the same keys ``DSMCallback`` takes as ``init_args``); written to ``path`` if given."""
        import yaml

        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            with open(path, "w") as fh:
                fh.write(text)
        return text

    @classmethod
    def from_yaml(cls, path: str) -> DSMConfig:
        """Load a config written by :meth:`to_yaml`."""
        import yaml

        with open(path) as fh:
            return cls.from_dict(yaml.safe_load(fh) or {})

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> DSMConfig:
        """Build a config from :meth:`to_dict` output."""
        data = dict(data)
        for key in ("windows", "threshold"):
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        unknown = set(data) - set(cls.field_names())
        if unknown:
            raise ConfigError(f"unknown DSMConfig field(s): {sorted(unknown)}; valid: {cls.field_names()}")
        return cls(**data)


def resolve_config(config: Optional[DSMConfig] = None, **overrides: Any) -> DSMConfig:
    """Combine an optional base config with keyword overrides."""
    base = config if config is not None else DSMConfig()
    if not isinstance(base, DSMConfig):
        raise ConfigError(f"config must be a DSMConfig, got {type(base).__name__}")
    return base.replace(**overrides) if overrides else base
