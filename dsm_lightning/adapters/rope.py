"""Positions of merged tokens, and timm's rotary embeddings (RoPE) evaluated at them.

A RoPE ViT rotates every patch token's queries and keys by angles computed from its position on the patch grid. A
merged token holds several patches, so it needs one position. Two rules are implemented (never an average of sin/cos
values, which is no rotation at all):

* ``"centroid"``: the size-weighted centroid of its source patches, in continuous patch coordinates;
  the rotary embedding is recomputed there from the model's own frequencies (RoPE angles are linear in the position,
  so this is the rotation of the mean position).
* ``"destination"`` (the default, measured closer to the dense model): the position of the token it merged
  into, recursively the one patch that was never merged
  away: the model's own sin/cos table gathered at that patch, as timm's patch dropout does with
  ``apply_keep_indices_nlc``.

Everything here is a pure function of the per-forward :class:`~dsm_lightning.merge.MergeState` (``pos``: the token
holding each input patch), the :class:`~dsm_lightning.TokenPlan` and the rope module's frequencies.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..errors import ConfigError
from ..merge import MergeState, window_order
from ..schedule import BlockPlan, TokenPlan

__all__ = [
    "POSITION_RULES",
    "patch_coords",
    "token_centroids",
    "matched_into",
    "next_destinations",
    "gather_rope",
    "rope_at",
    "SUPPORTED_ROPES",
    "MergedPositions",
]

#: How a merged token's position is chosen (see the module docstring).
POSITION_RULES = ("centroid", "destination")
#: timm rotary-embedding classes whose embedding :func:`rope_at` recomputes at continuous positions.
SUPPORTED_ROPES = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed", "RotaryEmbeddingMRope")


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`POSITION_RULES`, else a :class:`ConfigError` naming them."""
    if rule not in POSITION_RULES:
        raise ConfigError(f"rope position rule must be one of {POSITION_RULES}, got {rule!r}")
    return rule


def patch_coords(grid: Tuple[int, int], device: torch.device) -> Tensor:
    """``[N0, 2]`` float32 (row, col) of every input patch, raster order."""
    rows = torch.arange(grid[0], device=device, dtype=torch.float32)
    cols = torch.arange(grid[1], device=device, dtype=torch.float32)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def token_centroids(pos: Tensor, num_tokens: int, grid: Tuple[int, int]) -> Tensor:
    """``[B, N, 2]``: the size-weighted centroid (row, col) of the input patches each of ``num_tokens`` tokens
    holds (``pos`` ``[B, N0]``: the token holding each patch). A token's size is its patch count, so this is the mean
    of its patches' coordinates; tokens that hold no patch (adaptive merging's padding) get (0, 0)."""
    batch = pos.shape[0]
    coords = patch_coords(grid, pos.device).expand(batch, -1, -1)
    index = pos.unsqueeze(-1).expand(-1, -1, 2)
    sums = coords.new_zeros(batch, num_tokens, 2).scatter_add_(1, index, coords)
    counts = coords.new_zeros(batch, num_tokens, 1).scatter_add_(
        1, pos.unsqueeze(-1), coords.new_ones(batch, pos.shape[1], 1)
    )
    return sums / counts.clamp_min(1.0)


def matched_into(block: BlockPlan, n: int, plan: TokenPlan, first: bool, device: torch.device) -> Tensor:
    """``[n]`` bool over the ``n`` patch tokens entering ``block``'s merge: True for the tokens of set ``b`` (the
    ones that receive merges and are never merged away), in the tokens' current order.

    Follows :mod:`~dsm_lightning.merge`: a global merge alternates sets over the patch tokens, set ``a`` starting at
    patch ``num_prefix % 2`` under ``matching="tome"`` and at 0 otherwise; a local merge alternates inside each
    window (window-major order, set ``a`` first), after regrouping raster tokens window by window on the first."""
    if block.mode != "local":
        odd = plan.num_prefix_tokens % 2 if plan.config.matching == "tome" else 0
        return torch.arange(n, device=device) % 2 != odd
    parts = [(torch.arange(g.tokens_in, device=device) % 2 == 1).repeat(g.count) for g in block.groups]
    in_windows = torch.cat(parts)
    if not first:
        return in_windows
    order = window_order(plan.grid, block.groups, device)
    return torch.empty_like(in_windows).scatter_(0, order, in_windows)


def next_destinations(rep: Tensor, before: Tensor, after: Tensor, is_b: Tensor, num_after: int) -> Tensor:
    """The patch each token's position is taken from after a merge, under the ``"destination"`` rule.

    Args:
        rep: ``[B, N]`` before the merge: each token's representative patch.
        before: ``[B, N0]`` the token holding each patch before the merge.
        after: ``[B, N0]`` the same after it.
        is_b: ``[N]`` :func:`matched_into`.
        num_after: Patch tokens after the merge (padding rows included).

    Returns:
        ``[B, num_after]``: a token that received merges keeps the representative of the set-``b`` token they merged
        into; an unmerged token keeps its own; padding rows get patch 0.
    """
    new_index = torch.zeros_like(rep).scatter_(1, before, after)  # token before -> token after
    live = torch.zeros_like(rep, dtype=torch.bool).scatter_(1, before, True)
    count = torch.zeros(rep.shape[0], num_after, dtype=torch.long, device=rep.device)
    count.scatter_add_(1, new_index, live.long())
    keeps_place = live & (is_b.unsqueeze(0) | (count.gather(1, new_index) == 1))
    target = torch.where(keeps_place, new_index, num_after)  # the rest goes to a dropped slot
    out = torch.zeros(rep.shape[0], num_after + 1, dtype=torch.long, device=rep.device)
    return out.scatter_(1, target, rep)[:, :num_after]


class MergedPositions:
    """Where the current patch tokens sit, followed through one forward pass (any RoPE family's ``args_for``).

    :meth:`update` is called with the state before every block; positions change only after a merging block, and
    then hold :attr:`rep` (``"destination"``: each token's representative patch, ``[B, N]``) or :attr:`coords`
    (``"centroid"``: ``[B, N, 2]`` continuous (row, col)). Before the first merge both are None (the dense grid).
    """

    def __init__(self, plan: TokenPlan, rule: str) -> None:
        self.plan, self.rule = plan, check_rule(rule)
        self.state = MergeState()
        self.rep: Optional[Tensor] = None
        self.coords: Optional[Tensor] = None

    def update(self, index: int, state: MergeState) -> bool:
        """Follow the merge that produced ``state`` (the state before block ``index``); True when the positions
        changed (a merge happened since the last call)."""
        if state.pos is None or state is self.state:
            return False
        assert state.size is not None
        n_after = state.size.shape[1] - self.plan.num_prefix_tokens
        if self.rule == "centroid":
            self.coords = token_centroids(state.pos, n_after, self.plan.grid)
        else:
            self.rep = self._destinations(index, state, n_after)
        self.state = state
        return True

    def _destinations(self, index: int, state: MergeState, n_after: int) -> Tensor:
        """Representative patches after the merge of block ``index - 1`` (the state changes only there)."""
        assert state.pos is not None
        before = self.state.pos
        batch, n0 = state.pos.shape
        if before is None:
            before = torch.arange(n0, device=state.pos.device).expand(batch, -1)
        rep = self.rep if self.rep is not None else before
        is_b = matched_into(self.plan.blocks[index - 1], rep.shape[1], self.plan, self.state.pos is None, rep.device)
        return next_destinations(rep, before, state.pos, is_b, n_after)


def gather_rope(dense: Tensor, rep: Tensor) -> Tensor:
    """timm's rotary table ``dense`` (``[N0, 2d]``, or ``[depth, heads, N0, 2d]`` for mixed RoPE) at patches
    ``rep`` ``[B, N]``: ``[B, 1, N, 2d]`` (``[B, depth, heads, N, 2d]``), the layouts timm's patch dropout makes."""
    if dense.ndim == 2:
        return dense[rep].unsqueeze(1)
    return dense[:, :, rep].permute(2, 0, 1, 3, 4)


def rope_at(rope: Any, coords: Tensor, grid: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The rotary embedding timm's ``rope`` module gives a token at continuous patch coordinates ``coords``
    ``[B, N, 2]`` (row, col) on a ``grid`` patch grid: ``[B, 1, N, 2d]`` (``[B, depth, heads, N, 2d]`` for mixed
    RoPE), cast to ``dtype``. At integer coordinates it equals the module's own table (tested per class)."""
    name = type(rope).__name__
    if name == "RotaryEmbeddingMixed":
        return _mixed(rope, coords, grid).to(dtype)
    if name == "RotaryEmbeddingDinoV3":
        scaled = _grid_coords(coords, grid, "centered", rope.grid_offset, rope.grid_indexing, rope.normalize_coords)
        angles = 2 * math.pi * scaled.unsqueeze(-1) / rope.periods
        return _sincos(angles.flatten(-2), rope.rotate_half).unsqueeze(1).to(dtype)
    if name == "RotaryEmbeddingMRope":
        scaled = _grid_coords(coords, grid, "index", 0.0, "ij", "separate")
        pos = torch.cat([torch.zeros_like(scaled[..., :1]), scaled], dim=-1).index_select(-1, rope.axis)
        return _sincos(pos * rope.inv_freq, True).unsqueeze(1).to(dtype)
    ref = rope.ref_feat_shape
    scaled = _grid_coords(
        coords, grid, rope.grid_type, rope.grid_offset, rope.grid_indexing, rope.normalize_coords, ref
    )
    angles = scaled.unsqueeze(-1) * rope.bands  # [B, N, 2, bands]
    return _sincos(angles.flatten(-2), rope.rotate_half).unsqueeze(1).to(dtype)


def _sincos(angles: Tensor, rotate_half: bool) -> Tensor:
    """``cat([sin, cos])`` of per-frequency ``angles`` in timm's interleaved or half layout."""
    sin, cos = angles.sin(), angles.cos()
    if rotate_half:
        return torch.cat([sin, sin, cos, cos], dim=-1)
    return torch.cat([sin.repeat_interleave(2, -1), cos.repeat_interleave(2, -1)], dim=-1)


def _mixed(rope: Any, coords: Tensor, grid: Tuple[int, int]) -> Tensor:
    """Mixed RoPE: learned per-block, per-head frequencies ``[2, depth, heads, d/2]``; ``[B, depth, heads, N, 2d]``."""
    scaled = _grid_coords(coords, grid, "index", 0.0, rope.grid_indexing, "separate")
    freqs = rope.freqs.float()
    t_x, t_y = scaled[..., 0].float(), scaled[..., 1].float()
    shape = (t_x.shape[0], 1, 1, t_x.shape[1], 1)
    angles = t_x.view(shape) * freqs[0].unsqueeze(-2) + t_y.view(shape) * freqs[1].unsqueeze(-2)
    return _sincos(angles, False).to(rope.freqs.dtype)


def _grid_coords(
    coords: Tensor,
    grid: Tuple[int, int],
    grid_type: str,
    offset: float,
    indexing: str,
    normalize: str,
    ref: Optional[Sequence[int]] = None,
) -> Tensor:
    """Patch coordinates (row, col) mapped as timm's ``_build_grid`` maps grid indices: ``[..., 2]`` in its channel
    order (``'xy'`` swaps the axes). Every mapping is affine, so centroids map to centroids."""
    axes: List[Tensor] = [coords[..., 0], coords[..., 1]]
    sizes = [float(grid[0]), float(grid[1])]
    refs = None if ref is None else [float(ref[0]), float(ref[1])]
    if indexing == "xy":
        axes, sizes = axes[::-1], sizes[::-1]
        refs = None if refs is None else refs[::-1]
    if grid_type == "pixel":
        values = [(2.0 * t / (s - 1.0) - 1.0) if s > 1 else t * 0.0 - 1.0 for t, s in zip(axes, sizes)]
    elif grid_type == "centered":
        denom = {"max": [max(sizes)] * 2, "min": [min(sizes)] * 2}.get(normalize, sizes)
        values = [(t + 0.5 + offset) / d for t, d in zip(axes, denom)]
    else:
        values = [t + offset for t in axes]
    if refs is not None:
        values = [v / s * r for v, s, r in zip(values, sizes, refs)]
    out = torch.stack(values, dim=-1)
    return 2.0 * out - 1.0 if grid_type == "centered" else out
