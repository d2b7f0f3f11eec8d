"""plan_tokens(): the per-block merging schedule, computed once per input shape from Python ints only.

This module knows nothing of models or tensors (:func:`dsm_lightning.token_plan` reads a model's shape through its
adapter and calls :func:`plan_tokens`).

The plan is the single source of truth for token counts: the merge engine reads its Python ints (so
``torch.compile`` sees constants), the FLOP estimate and the callback's summary table print it, and tests check the
real tensors against it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from .config import DSMConfig

__all__ = ["BlockPlan", "TokenPlan", "WindowGroup", "block_flops", "plan_tokens", "split_windows"]

Box = Tuple[int, int, int, int]  # (row0, row1, col0, col1) on the patch grid, end-exclusive


def _split(length: int, parts: int) -> List[Tuple[int, int]]:
    """Split ``range(length)`` into ``parts`` contiguous spans; the first ``length % parts`` are one longer."""
    base, extra = divmod(length, parts)
    spans, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        spans.append((start, start + size))
        start += size
    return spans


@dataclass(frozen=True)
class WindowGroup:
    """Local windows that share one shape, so they can be stacked along the batch axis and merged in one call.

    Attributes:
        boxes: The windows on the patch grid, ``(row0, row1, col0, col1)``, in row-major order.
        tokens_in: Tokens per window entering the block.
        tokens_out: Tokens per window leaving the block.
    """

    boxes: Tuple[Box, ...]
    tokens_in: int
    tokens_out: int

    @property
    def count(self) -> int:
        """Number of windows in the group."""
        return len(self.boxes)

    @property
    def r(self) -> int:
        """Tokens merged per window."""
        return self.tokens_in - self.tokens_out


def _box_area(box: Box) -> int:
    return (box[1] - box[0]) * (box[3] - box[2])


def split_windows(grid: Tuple[int, int], windows: Tuple[int, int]) -> Tuple[Tuple[Box, ...], ...]:
    """Split a patch grid into ``rows x cols`` windows and group them by shape.

    Grids that do not divide evenly get windows whose sides differ by one patch (a 9x9 grid in 2x2 windows gives
    5x5, 5x4, 4x5 and 4x4). Windows of one shape form one group, stacked along the batch axis; an evenly divided
    grid therefore has one group and a single batched merge per block.

    Raises:
        ValueError: If the grid has fewer patches than windows along a side, or a window would hold < 2 patches.
    """
    (height, width), (rows, cols) = grid, windows
    if rows > height or cols > width:
        raise ValueError(
            f"windows={rows}x{cols} needs a patch grid of at least {rows}x{cols}, but this input gives "
            f"{height}x{width} patches; use fewer windows (e.g. windows=1) or a larger input"
        )
    if (height // rows) * (width // cols) < 2:
        raise ValueError(
            f"windows={rows}x{cols} on a {height}x{width} patch grid leaves windows of a single patch, which "
            f"cannot merge; use fewer windows"
        )
    groups: Dict[Tuple[int, int], List[Box]] = {}
    for r0, r1 in _split(height, rows):
        for c0, c1 in _split(width, cols):
            groups.setdefault((r1 - r0, c1 - c0), []).append((r0, r1, c0, c1))
    return tuple(tuple(boxes) for boxes in groups.values())


@dataclass(frozen=True)
class BlockPlan:
    """What one block does.

    Attributes:
        index: Block index.
        mode: ``"dense"`` (no merging), ``"local"`` (merge inside windows) or ``"global"``.
        tokens_in: Patch tokens entering the block (prefix tokens excluded).
        tokens_out: Patch tokens leaving it.
        groups: For local blocks, the window groups with per-window token counts.
        size_bias: Whether tokens entering this block have unequal sizes (proportional attention is active).
        threshold: Adaptive merging (:attr:`DSMConfig.threshold`), global blocks only: each image merges every pair
            at least this similar, so ``tokens_in`` / ``tokens_out`` are the budget the threshold was fitted to (the
            fixed plan's counts), not every image's. None for a fixed merge.
        fit: While thresholds are fitted (:meth:`TokenPlan.fitting`): this global block picks the threshold under
            which the batch keeps ``tokens_out`` patch tokens per image on average, and reports it in
            :attr:`MergeState.threshold <dsm_lightning.merge.MergeState>`.
    """

    index: int
    mode: str
    tokens_in: int
    tokens_out: int
    groups: Tuple[WindowGroup, ...] = ()
    size_bias: bool = False
    threshold: Optional[float] = None
    fit: bool = False

    @property
    def adaptive(self) -> bool:
        """Whether this block's token counts follow the data (a threshold, or one being fitted)."""
        return self.threshold is not None or self.fit

    @property
    def r(self) -> int:
        """Patch tokens removed by this block."""
        return self.tokens_in - self.tokens_out

    @property
    def merges(self) -> bool:
        """Whether this block merges tokens."""
        return self.tokens_out < self.tokens_in


def block_flops(tokens_attn: int, tokens_mlp: int, dim: int, mlp_hidden: int) -> float:
    """FLOPs (2 per multiply-add) of a pre-norm block: attention on ``tokens_attn``, MLP on ``tokens_mlp``."""
    t = tokens_attn
    attn = 2 * t * dim * 3 * dim + 2 * 2 * t * t * dim + 2 * t * dim * dim
    mlp = 2 * 2 * tokens_mlp * dim * mlp_hidden
    return float(attn + mlp)


@dataclass(frozen=True)
class TokenPlan:
    """The per-block plan for one input shape.

    Attributes:
        grid: Patch grid (rows, cols) of the input.
        num_prefix_tokens: cls / distillation / register tokens, never merged.
        config: The config the plan was made from.
        blocks: One :class:`BlockPlan` per block.
        r: The ``r`` used (the chosen one when ``config.r`` is None): an int for a constant schedule, a fraction
            for a proportional one, ``None`` for per-block lists.
        dims: ``(embed_dim, mlp_hidden_dim)`` of the model planned for, when known: :meth:`table` then shows
            GFLOPs per block and the FLOPs against dense without being told them.
    """

    grid: Tuple[int, int]
    num_prefix_tokens: int
    config: DSMConfig
    blocks: Tuple[BlockPlan, ...]
    r: Union[int, float, None]
    dims: Optional[Tuple[int, int]] = None

    @property
    def num_patches(self) -> int:
        """Patch tokens of the input."""
        return self.grid[0] * self.grid[1]

    @property
    def depth(self) -> int:
        """Number of blocks."""
        return len(self.blocks)

    @property
    def tokens_out(self) -> int:
        """Patch tokens after the last block."""
        return self.blocks[-1].tokens_out

    @property
    def adaptive(self) -> bool:
        """Whether any block's token counts follow the data (adaptive merging): the counts are then the budget."""
        return any(b.adaptive for b in self.blocks)

    def fitting(self) -> TokenPlan:
        """This plan with every global merging block fitting its threshold (:attr:`BlockPlan.fit`) instead of
        applying one: what :func:`~dsm_lightning.fit_thresholds` runs a calibration batch through."""
        blocks = tuple(replace(b, threshold=None, fit=True) if b.mode == "global" else b for b in self.blocks)
        return replace(self, blocks=blocks)

    def block_flops(self, dim: int, mlp_hidden: int) -> List[float]:
        """Analytic FLOPs per block (attention on the tokens entering it, MLP on the tokens after its merge)."""
        p = self.num_prefix_tokens
        return [block_flops(b.tokens_in + p, b.tokens_out + p, dim, mlp_hidden) for b in self.blocks]

    def flops(self, dim: int, mlp_hidden: int) -> float:
        """Analytic FLOPs of all blocks for one image."""
        return sum(self.block_flops(dim, mlp_hidden))

    def flops_ratio(self, dim: int, mlp_hidden: int) -> float:
        """Planned block FLOPs divided by the dense model's (1.0 = no saving)."""
        dense = (
            block_flops(
                self.num_patches + self.num_prefix_tokens, self.num_patches + self.num_prefix_tokens, dim, mlp_hidden
            )
            * self.depth
        )
        return self.flops(dim, mlp_hidden) / dense

    def rows(self, dim: Optional[int] = None, mlp_hidden: Optional[int] = None) -> List[Dict[str, Any]]:
        """The plan as a list of dicts (one per block), with GFLOPs when ``dim`` is given."""
        flops = self.block_flops(dim, mlp_hidden) if dim and mlp_hidden else [None] * self.depth
        out = []
        for b, f in zip(self.blocks, flops):
            row: Dict[str, Any] = {
                "block": b.index,
                "mode": b.mode,
                "r": b.r,
                "tokens_in": b.tokens_in + self.num_prefix_tokens,
                "tokens_out": b.tokens_out + self.num_prefix_tokens,
            }
            if b.threshold is not None:
                row["threshold"] = b.threshold
            if b.mode == "local":
                row["per_window"] = "/".join(f"{g.tokens_in}->{g.tokens_out}x{g.count}" for g in b.groups)
            if f is not None:
                row["gflops"] = f / 1e9
            out.append(row)
        return out

    def table(self, dim: Optional[int] = None, mlp_hidden: Optional[int] = None) -> str:
        """A printable per-block table (tokens include prefix tokens), with GFLOPs per block and the block FLOPs
        against dense when the dims are passed or known (:attr:`dims`, set by ``token_plan(model)``)."""
        if dim is None and mlp_hidden is None and self.dims is not None:
            dim, mlp_hidden = self.dims
        rows = self.rows(dim, mlp_hidden)
        head = f"{'block':>5} {'mode':>6} {'r':>4} {'tokens':>11}"
        head += f" {'GFLOPs':>7}" if dim else ""
        head += f" {'threshold':>9}" if self.adaptive else ""
        lines = [head]
        for row in rows:
            line = f"{row['block']:>5} {row['mode']:>6} {row['r']:>4} {row['tokens_in']:>5}->{row['tokens_out']:<5}"
            if dim:
                line += f" {row['gflops']:>7.3g}"
            if self.adaptive:
                line += f" {row['threshold']:>9.4f}" if "threshold" in row else f" {'':>9}"
            if "per_window" in row:
                line += f"  windows {row['per_window']}"
            lines.append(line)
        summary = f"grid {self.grid[0]}x{self.grid[1]}, prefix {self.num_prefix_tokens}, r={self.r}"
        if dim is not None and mlp_hidden is not None:
            summary += f", block FLOPs {self.flops_ratio(dim, mlp_hidden):.3f}x dense"
        if self.adaptive:
            summary += " (adaptive: tokens and FLOPs are the budget the thresholds were fitted to; images vary)"
        lines.append(summary)
        return "\n".join(lines)


def _build(
    depth: int,
    grid: Tuple[int, int],
    config: DSMConfig,
    r_for: Callable[[int, int], int],
    strict: str,
    groups0: Tuple[Tuple[Box, ...], ...],
) -> Tuple[BlockPlan, ...]:
    """Walk the blocks and count tokens. ``r_for(i, n)`` is the requested r of block i with n patch tokens.

    ``strict``: ``"all"`` raises for any block whose r cannot be merged, ``"first"`` only for the first merging
    block (later blocks merge at most half their tokens, like ToMe), ``"none"`` never raises.
    """
    n = grid[0] * grid[1]
    strict_all = strict == "all"
    strict_first = strict != "none"
    merged_before = False
    local_left = config.local_blocks
    window_counts: Optional[List[int]] = None
    nw = sum(len(g) for g in groups0)
    blocks = []
    first_merge = True
    for i in range(depth):
        r = r_for(i, n)
        mode = "dense"
        groups: Tuple[WindowGroup, ...] = ()
        n_out = n
        if i >= config.delay and local_left > 0 and nw > 1:
            local_left -= 1
            if window_counts is None:
                window_counts = [_box_area(g[0]) for g in groups0]
            k = math.ceil(r / nw) if r else 0
            if k:
                mode = "local"
                limit = min(window_counts) // 2
                if k > limit and (strict_all or (strict_first and first_merge)):
                    raise ValueError(
                        f"r={r} is too large at block {i} (local phase): each of the {nw} windows must merge "
                        f"ceil({r}/{nw})={k} tokens but the smallest window holds {min(window_counts)} and can "
                        f"merge at most {limit}; the largest r here is {limit * nw}. Lower r, use fewer windows "
                        f"or fewer local_blocks"
                    )
                new_counts = [c - min(k, c // 2) for c in window_counts]
                groups = tuple(
                    WindowGroup(boxes, c_in, c_out) for boxes, c_in, c_out in zip(groups0, window_counts, new_counts)
                )
                n_out = sum(len(b) * c for b, c in zip(groups0, new_counts))
                window_counts = new_counts
        elif i >= config.delay and r:
            limit = n // 2
            if r > limit and (strict_all or (strict_first and first_merge)):
                raise ValueError(
                    f"r={r} is too large at block {i}: {n} patch tokens can merge at most {limit} "
                    f"(bipartite matching halves the tokens at most); lower r to <= {limit} or raise delay"
                )
            mode = "global"
            n_out = n - min(r, limit)
        elif r and i < config.delay:
            raise ValueError(f"r[{i}]={r} but block {i} is inside the delay (delay={config.delay}); set it to 0")
        if n_out < n:
            first_merge = False
        blocks.append(
            BlockPlan(i, mode if n_out < n else "dense", n, n_out, groups, size_bias=merged_before and config.prop_attn)
        )
        merged_before = merged_before or n_out < n
        n = n_out
    return tuple(blocks)


def _validate(depth: int, grid: Tuple[int, int], num_prefix_tokens: int, config: DSMConfig) -> None:
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if config.delay >= depth:
        raise ValueError(
            f"delay={config.delay} must be < depth={depth}: with delay >= depth no block merges; "
            f"use delay <= {depth - 1}"
        )
    if config.delay + config.local_blocks > depth:
        raise ValueError(
            f"delay + local_blocks = {config.delay} + {config.local_blocks} exceeds depth={depth}; "
            f"use local_blocks <= {depth - config.delay}"
        )
    if isinstance(config.r, tuple) and len(config.r) != depth:
        raise ValueError(f"a per-block r needs one entry per block: got {len(config.r)} entries for depth={depth}")
    if isinstance(config.threshold, tuple) and len(config.threshold) != depth:
        raise ValueError(
            f"a per-block threshold needs one entry per block: got {len(config.threshold)} entries for depth={depth}"
        )
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"patch grid must be at least 1x1, got {grid}")
    if num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}")


def _plan(
    depth: int,
    grid: Tuple[int, int],
    num_prefix_tokens: int,
    config: DSMConfig,
    dims: Optional[Tuple[int, int]] = None,
) -> TokenPlan:
    """Uncached core of :func:`token_plan` (all arguments hashable Python values), remembering ``dims``."""
    plan = _plan_blocks(depth, grid, num_prefix_tokens, config, dims)
    if config.threshold is not None:  # adaptive: global blocks merge by similarity, the counts are the budget
        blocks = tuple(
            replace(b, threshold=config.block_threshold(b.index)) if b.mode == "global" else b for b in plan.blocks
        )
        plan = replace(plan, blocks=blocks)
    return plan if dims is None else replace(plan, dims=(int(dims[0]), int(dims[1])))


def _plan_blocks(
    depth: int,
    grid: Tuple[int, int],
    num_prefix_tokens: int,
    config: DSMConfig,
    dims: Optional[Tuple[int, int]] = None,
) -> TokenPlan:
    """The plan's blocks and r (see :func:`_plan`)."""
    grid = (int(grid[0]), int(grid[1]))
    _validate(depth, grid, num_prefix_tokens, config)
    use_windows = config.local_blocks > 0 and config.num_windows > 1
    groups0 = split_windows(grid, config.window_grid) if use_windows else ()
    nw = sum(len(g) for g in groups0)
    if isinstance(config.r, tuple):
        per_block = config.r
        blocks = _build(depth, grid, config, lambda i, n: per_block[i], "all", groups0)
        return TokenPlan(grid, num_prefix_tokens, config, blocks, None)

    def plan_r(r: Union[int, float]) -> TokenPlan:
        if isinstance(r, float):  # proportional: merge this fraction of the tokens entering each merging block
            blocks = _build(depth, grid, config, lambda i, n: int(r * n) if i >= config.delay else 0, "none", groups0)
        else:
            blocks = _build(depth, grid, config, lambda i, n: r if i >= config.delay else 0, "first", groups0)
        return TokenPlan(grid, num_prefix_tokens, config, blocks, r)

    if isinstance(config.r, (int, float)):
        return plan_r(config.r)

    if dims is None:
        raise ValueError(
            "r=None picks r from a FLOP target and needs the model's dims=(embed_dim, mlp_hidden_dim); "
            "pass a model, dims=..., or an explicit r"
        )
    # Largest r the first merging block accepts; FLOPs fall monotonically with r, so bisect the smallest r that
    # meets the target (or take the largest allowed when none does).
    # For the proportional schedule, bisect the fraction on a grid of 1/256.
    if config.schedule == "proportional":
        steps = 128

        def at(k: int) -> TokenPlan:
            return plan_r(k / 256)
    else:
        steps = nw * (min(_box_area(g[0]) for g in groups0) // 2) if use_windows else grid[0] * grid[1] // 2

        def at(k: int) -> TokenPlan:
            return plan_r(k)

    target = config.flops_target * plan_r(0).flops(*dims)
    lo, hi = 0, steps
    if at(hi).flops(*dims) > target:
        return at(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        if at(mid).flops(*dims) <= target:
            hi = mid
        else:
            lo = mid + 1
    return at(lo)


_plan_cached = functools.lru_cache(maxsize=256)(_plan)


def plan_tokens(
    depth: int,
    grid: Tuple[int, int],
    num_prefix_tokens: int,
    config: DSMConfig,
    dims: Optional[Tuple[int, int]] = None,
) -> TokenPlan:
    """The plan for a ViT of ``depth`` blocks on a ``grid`` of patches with ``num_prefix_tokens`` prefix tokens
    (``dims=(embed_dim, mlp_hidden)`` for FLOP targets), cached per argument set. The one way in to planning:
    :func:`dsm_lightning.token_plan` and the adapters call it.

    Under ``torch.compile`` the uncached function is traced instead: it is pure Python on ints, so Dynamo folds it
    into constants (the LRU cache wrapper itself is not traceable).
    """
    import torch

    if torch.compiler.is_compiling():
        return _plan(depth, grid, num_prefix_tokens, config, dims)
    return _plan_cached(depth, grid, num_prefix_tokens, config, dims)
