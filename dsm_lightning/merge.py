"""Merge ops: pure tensor functions, no module state.

Conventions: ``x`` is ``[B, N, C]`` patch tokens (the global merge also takes ``num_prefix`` prefix tokens in front,
which it copies through untouched; they are never matched or merged), ``size`` is ``[B, N, 1]`` (how many input
patches each token holds), ``metric`` is ``[B, N, D]`` (the features pairs are matched on), and ``pos`` is
``[B, N0]`` (for every input patch, the index of the token that holds it now). All counts (``r``, windows) are
Python ints from the :class:`~dsm_lightning.TokenPlan`, so a compiled graph sees constants.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .config import DSMConfig
from .errors import ConfigError
from .schedule import BlockPlan, WindowGroup

__all__ = [
    "Matching",
    "bipartite_soft_matching",
    "threshold_soft_matching",
    "bucket_tokens",
    "merge_wavg",
    "window_order",
    "merge_local",
    "merge_global",
    "MergeState",
    "class_attention",
    "protected_mask",
    "merge_step",
    "size_bias",
    "unmerge",
]


class Matching(NamedTuple):
    """Result of :func:`bipartite_soft_matching`.

    Attributes:
        merge: ``merge(x) -> x'`` sums each merged ``a`` token into its ``b`` partner. ``x`` is
            ``[B, num_prefix + N, C]``; output order: the prefix tokens (untouched), the unmerged ``a`` tokens, then
            all ``b`` tokens.
        new_index: ``[B, N]`` long: where each input token ends up in the output.
        lengths: Under :func:`threshold_soft_matching`, each image's token count after the merge (prefix
            included; host ints, read back with the output length); None for a fixed matching.
    """

    merge: Callable[[Tensor], Tensor]
    new_index: Tensor
    lengths: Optional[Tuple[int, ...]] = None


def stable_argsort(values: Tensor, descending: bool = False) -> Tensor:
    """``values.argsort(dim=-1, descending=descending, stable=True)`` for ``[B, N]``, also inside an export.

    ONNX has no stable sort, so while ``torch.export`` traces (``torch.compiler.is_exporting()``) each position's
    rank is counted instead: the values that come before it, plus the equal ones at smaller indices. That is the
    same permutation, ties included, at ``O(N^2)`` comparisons (N is at most a few hundred tokens here).
    """
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6; older versions cannot export to ONNX
    if exporting is None or not exporting():
        return values.argsort(dim=-1, descending=descending, stable=True)
    index = torch.arange(values.shape[-1], device=values.device)
    mine, other = values.unsqueeze(-1), values.unsqueeze(-2)  # [B, i, 1], [B, 1, j]
    ahead = (other > mine) if descending else (other < mine)
    ahead = ahead | ((other == mine) & (index < index.unsqueeze(-1)))  # j comes before i
    rank = ahead.sum(dim=-1)
    return torch.empty_like(rank).scatter_(-1, rank, index.expand_as(rank))


def bipartite_soft_matching(
    metric: Tensor,
    r: int,
    protected: Optional[Tensor] = None,
    num_prefix: int = 0,
    parity: int = 0,
    sort_unmerged: bool = False,
) -> Matching:
    """ToMe's bipartite soft matching, on patch tokens only.

    Tokens alternate between set ``a`` and set ``b``; set ``a`` starts at patch ``parity`` (0: even positions, 1:
    odd ones). Each ``a`` token proposes its most similar ``b`` token (cosine similarity of ``metric``); the ``r``
    most similar proposals are merged.

    Args:
        metric: ``[B, N, D]`` similarity features.
        r: Tokens to remove, ``0 <= r <= N // 2``.
        protected: Optional ``[B, N]`` bool mask of tokens that should neither merge away nor receive a merge. Their
            proposals rank last, so they merge only when fewer than ``r`` unprotected ``a`` tokens exist.
        num_prefix: Prefix tokens in front of the patch tokens in what ``merge`` is applied to; they are copied
            through first (so the caller need not split them off and concatenate them back).
        parity: Patch index where set ``a`` starts (0 or 1). Official ToMe alternates over the whole sequence with
            the class token first in set ``a``, which is ``parity=1`` on the patch tokens of a model with a class
            token.
        sort_unmerged: Keep the unmerged ``a`` tokens in their input order (official ToMe, which re-sorts them
            whenever there is a class token) instead of the order of their best similarity.
    """
    batch, n, _ = metric.shape
    odd = parity % 2
    na = (n + 1 - odd) // 2
    nb = n - na
    with torch.no_grad():
        node_max, node_idx = _best_partners(metric / metric.norm(dim=-1, keepdim=True), odd, protected)
        edge_idx = stable_argsort(node_max, descending=True)  # ties (protected) keep order
        unm_idx = edge_idx[:, r:]  # [B, na - r]
        if sort_unmerged:
            unm_idx = unm_idx.gather(1, stable_argsort(unm_idx))
        src_idx = edge_idx[:, :r]  # [B, r]
        dst_idx = node_idx.gather(1, src_idx)  # [B, r]

        device = metric.device
        a_new = torch.empty(batch, na, dtype=torch.long, device=device)
        a_new.scatter_(1, unm_idx, torch.arange(na - r, device=device).expand(batch, -1))
        a_new.scatter_(1, src_idx, dst_idx + (na - r))
        # a and b tokens sit at alternate positions, written by slice so that no branch depends on the parity of n
        # (a branch would give every parity its own compiled graph under dynamic shapes)
        new_index = torch.empty(batch, n, dtype=torch.long, device=device)
        new_index[:, odd::2] = a_new
        new_index[:, 1 - odd :: 2] = torch.arange(na - r, na - r + nb, device=device)
        # Flat row indices into x.reshape(batch * t, C), t = num_prefix + n: the kept tokens in output order (prefix,
        # unmerged a, every b), the merged-away a tokens, and the output rows they add into. index_select / index_add_
        # on one flat axis are several times faster than gather / scatter_add with expanded indices on CPU, and
        # carrying the prefix through saves splitting it off and concatenating it back. Each index is built with as
        # few small ops as possible: at batch 1 their count, not their size, is what costs.
        p, t, m = num_prefix, num_prefix + n, num_prefix + n - r
        row_t = torch.arange(0, batch * t, t, device=device).unsqueeze(1)  # first flat row of each image
        parts = [torch.arange(p, device=device).expand(batch, -1)] if p else []
        first_b = p + 1 - odd
        parts += [unm_idx * 2 + (p + odd), torch.arange(first_b, first_b + 2 * nb, 2, device=device).expand(batch, -1)]
        keep = (torch.cat(parts, dim=1) + row_t).flatten()
        src = (src_idx * 2 + row_t + (p + odd)).flatten()
        first_dst = p + na - r  # output row of the first b token; one start per image, m rows apart
        dst = (dst_idx + torch.arange(first_dst, first_dst + batch * m, m, device=device).unsqueeze(1)).flatten()

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        flat = x.reshape(batch * t, c)
        out = flat.index_select(0, keep)
        out.index_add_(0, dst, flat.index_select(0, src))
        return out.view(batch, m, c)

    return Matching(merge, new_index)


def _best_partners(unit: Tensor, odd: int, blocked: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """For every ``a`` token of unit-norm ``unit`` ``[B, N, D]`` (set ``a`` starts at patch ``odd``): the cosine
    similarity of its most similar ``b`` token and that token's index among ``b``. Pairs touching a ``blocked``
    ``[B, N]`` token score -2, below any cosine similarity."""
    scores = torch.bmm(unit[:, odd::2], unit[:, 1 - odd :: 2].transpose(1, 2))  # matmul would guard on N's parity
    if blocked is not None:
        scores = scores.masked_fill(blocked[:, odd::2, None] | blocked[:, None, 1 - odd :: 2], -2.0)
    best: Tuple[Tensor, Tensor] = scores.max(dim=-1)
    return best


def bucket_tokens(count: int, n: int, buckets: int) -> int:
    """Round a token count up to the next of ``buckets`` evenly spaced levels between 0 and ``n``, capped at ``n``.

    Examples:
        >>> tuple(bucket_tokens(c, 256, 16) for c in (1, 16, 17, 200, 256))
        (16, 16, 32, 208, 256)
    """
    step = -(-n // buckets)
    return min(n, -(-count // step) * step)


def threshold_soft_matching(
    metric: Tensor,
    threshold: Union[float, Callable[[Tensor], float]],
    alive: Tensor,
    buckets: int,
    protected: Optional[Tensor] = None,
    num_prefix: int = 0,
    parity: int = 0,
    sort_unmerged: bool = False,
) -> Matching:
    """Bipartite soft matching that merges, in each image, every proposal whose similarity is at least
    ``threshold``: the number of merges follows the image (adaptive merging, :attr:`DSMConfig.threshold`).

    Images of a batch keep different numbers of tokens, so the output is padded: each image's tokens come first, in
    the order :func:`bipartite_soft_matching` gives them (prefix, unmerged ``a``, ``b``), and padding rows of zeros
    fill the rest (:func:`merge_wavg` gives them size 0, so proportional attention's ``log(size)`` bias hides them
    from every query, and later merges skip them). An image's tokens are the same whatever shares its batch: the
    padding only ever sits behind them. The output length is the batch's longest image rounded up by
    :func:`bucket_tokens`; each image's count (:attr:`Matching.lengths`) is the one read back to the host.

    Args:
        metric: ``[B, N, D]`` similarity features of the patch tokens (padding rows included).
        threshold: Cosine similarity at or above which an ``a`` token merges into its most similar ``b`` token, or
            a function of the best similarities ``[B, N_a]`` (-2 where blocked) that chooses it
            (while a block fits it: :attr:`BlockPlan.fit <dsm_lightning.schedule.BlockPlan>`).
        alive: ``[B, N]`` bool, False on padding rows (which must all sit behind the live ones).
        buckets: Number of output lengths allowed for ``N`` patch tokens (see :func:`bucket_tokens`).
        protected: As in :func:`bipartite_soft_matching`.
        num_prefix: As in :func:`bipartite_soft_matching`.
        parity: As in :func:`bipartite_soft_matching`.
        sort_unmerged: As in :func:`bipartite_soft_matching`.
    """
    batch, n, _ = metric.shape
    odd = parity % 2
    na = (n + 1 - odd) // 2
    p, t = num_prefix, num_prefix + n
    device = metric.device
    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # padding rows are zeros
        node_max, node_idx = _best_partners(unit, odd, ~alive if protected is None else ~alive | protected)
        if callable(threshold):
            threshold = threshold(node_max)
        merged = node_max >= threshold  # [B, na], by a index; blocked rows (-2) never pass
        # Candidates in output order (prefix, a tokens, b tokens); the live ones move to the front, order kept.
        a_order = torch.arange(na, device=device).expand(batch, -1)
        if not sort_unmerged:
            a_order = stable_argsort(node_max, descending=True)
        a_rows = a_order * 2 + (p + odd)
        b_rows = torch.arange(p + 1 - odd, t, 2, device=device).expand(batch, -1)
        rows = torch.cat([torch.arange(p, device=device).expand(batch, -1), a_rows, b_rows], dim=1)
        kept_a = (alive[:, odd::2] & ~merged).gather(1, a_order)
        kept = torch.cat([alive.new_ones(batch, p), kept_a, alive[:, 1 - odd :: 2]], dim=1)
        order = stable_argsort((~kept).to(torch.uint8))
        lengths = tuple(kept.sum(dim=1).tolist())  # the one read back to the host: each image's count
        m = p + bucket_tokens(max(lengths) - p, n, buckets)
        slot = torch.empty_like(order).scatter_(1, order, torch.arange(t, device=device).expand(batch, -1))
        b_slot = slot[:, p + na :]
        a_slot = torch.empty_like(a_order).scatter_(1, a_order, slot[:, p : p + na])  # by a index
        dst_slot = torch.where(merged, b_slot.gather(1, node_idx), 0)
        new_index = torch.empty(batch, n, dtype=torch.long, device=device)
        new_index[:, odd::2] = torch.where(merged, dst_slot, a_slot) - p
        new_index[:, 1 - odd :: 2] = b_slot - p
        row_t = torch.arange(0, batch * t, t, device=device).unsqueeze(1)
        row_m = torch.arange(0, batch * m, m, device=device).unsqueeze(1)
        keep = (rows.gather(1, order[:, :m]) + row_t).flatten()
        live = kept.gather(1, order[:, :m]).flatten().unsqueeze(1)
        src = (torch.arange(p + odd, t, 2, device=device) + row_t).flatten()
        dst = (dst_slot + row_m).flatten()
        weight = merged.flatten().unsqueeze(1)

    def merge(x: Tensor) -> Tensor:
        c = x.shape[-1]
        flat = x.reshape(batch * t, c)
        out = flat.index_select(0, keep) * live.to(x.dtype)
        out.index_add_(0, dst, flat.index_select(0, src) * weight.to(x.dtype))
        return out.view(batch, m, c)

    return Matching(merge, new_index, lengths)


def merge_wavg(
    merge: Callable[[Tensor], Tensor], x: Tensor, size: Tensor, padded: bool = False
) -> Tuple[Tensor, Tensor]:
    """Size-weighted average merge: ``x' = merge(x * size) / merge(size)``; returns ``(x', size')``.

    ``size`` is float32 whatever the model's dtype (a bf16 size cannot count past 256 exactly); the weighted sum is
    taken at the wider of the two dtypes and ``x'`` comes back in ``x``'s dtype. ``padded``: ``merge`` leaves padding
    rows of size 0 (:func:`threshold_soft_matching`), which come back as zeros.
    """
    dtype = x.dtype
    x = merge(x * size)
    size = merge(size)
    return (x / (size.clamp_min(1e-12) if padded else size)).to(dtype), size


def window_order(grid: Tuple[int, int], groups: Sequence[WindowGroup], device: torch.device) -> Tensor:
    """Raster patch indices in window-major order: group by group, window by window, row-major inside."""
    height, width = grid
    raster = torch.arange(height * width, device=device).view(height, width)
    parts = [raster[r0:r1, c0:c1].reshape(-1) for g in groups for (r0, r1, c0, c1) in g.boxes]
    return torch.cat(parts)


def merge_global(
    x: Tensor,
    size: Tensor,
    metric: Tensor,
    r: int,
    protected: Optional[Tensor] = None,
    num_prefix: int = 0,
    tome_order: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge ``r`` tokens over the whole image. ``x`` and ``size`` may start with ``num_prefix`` prefix tokens,
    which pass through unchanged; ``metric`` and ``protected`` cover the patch tokens only. ``tome_order`` matches
    as official ToMe does (:attr:`DSMConfig.matching <dsm_lightning.DSMConfig>` ``"tome"``): set ``a`` alternates
    over the whole sequence, prefix tokens included, and unmerged tokens keep their order when there is a prefix.
    Returns ``(x, size, new_index)``."""
    parity, sort = (num_prefix % 2, num_prefix > 0) if tome_order else (0, False)
    m = bipartite_soft_matching(metric, r, protected, num_prefix, parity, sort)
    x, size = merge_wavg(m.merge, x, size)
    return x, size, m.new_index


def merge_local(
    x: Tensor, size: Tensor, metric: Tensor, groups: Sequence[WindowGroup], protected: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """Merge inside windows. Tokens are in window-major order (see :func:`window_order`).

    Each group's windows are stacked along the batch axis (``[B * windows, tokens_per_window, C]``) and merged
    in one call; a token never leaves its window. Returns ``(x, size, new_index)`` in window-major order.
    """
    batch = x.shape[0]
    xs, sizes, indices = [], [], []
    start, out_start = 0, 0
    for g in groups:
        span = g.count * g.tokens_in
        window = (slice(None), slice(start, start + span))
        keep = None if protected is None else protected[window].reshape(batch * g.count, g.tokens_in)
        m = bipartite_soft_matching(metric[window].reshape(batch * g.count, g.tokens_in, -1), g.r, keep)
        gx, gs = merge_wavg(
            m.merge,
            x[window].reshape(batch * g.count, g.tokens_in, -1),
            size[window].reshape(batch * g.count, g.tokens_in, 1),
        )
        xs.append(gx.reshape(batch, g.count * g.tokens_out, -1))
        sizes.append(gs.reshape(batch, g.count * g.tokens_out, 1))
        offsets = torch.arange(g.count, device=x.device) * g.tokens_out + out_start
        indices.append((m.new_index.view(batch, g.count, g.tokens_in) + offsets.view(1, -1, 1)).reshape(batch, span))
        start += span
        out_start += g.count * g.tokens_out
    if len(groups) == 1:
        return xs[0], sizes[0], indices[0]
    return torch.cat(xs, dim=1), torch.cat(sizes, dim=1), torch.cat(indices, dim=1)


class MergeState(NamedTuple):
    """What one forward pass carries next to the tokens (created per call, never stored on a module).

    Attributes:
        size: ``[B, T, 1]`` float32 tokens' sizes including prefix tokens (size 1), or None while no merge has
            happened.
        pos: ``[B, N0]`` index (among patch tokens) of the token holding each input patch, or None while identity.
        lengths: After an adaptive merge, each image's token count (prefix included, host ints): its tokens are the
            first ``lengths[i]`` rows and padding of size 0 follows. The engine regroups the batch by them
            (:func:`~dsm_lightning.engine.run_blocks`). None otherwise, and while thresholds are being fitted (the
            fitted batch stays whole).
        threshold: After a block that fits its threshold (:attr:`BlockPlan.fit
            <dsm_lightning.schedule.BlockPlan>`), the threshold it chose; None otherwise.
    """

    size: Optional[Tensor] = None
    pos: Optional[Tensor] = None
    lengths: Optional[Tuple[int, ...]] = None
    threshold: Optional[float] = None


def size_bias(state: MergeState, dtype: torch.dtype) -> Optional[Tensor]:
    """Additive attention bias ``log(size)`` of shape ``[B, 1, 1, T]`` (None while sizes are uniform)."""
    if state.size is None:
        return None
    return state.size.to(dtype).log().transpose(1, 2).unsqueeze(1)


def class_attention(q: Tensor, k: Tensor, scale: float, bias: Optional[Tensor], num_prefix: int) -> Tensor:
    """Attention each token receives from the class token, averaged over heads: ``[B, T]``.

    One ``[1 x T]`` row of the attention matrix per head (``q`` and ``k`` are ``[B, heads, T, head_dim]``), so the
    fused attention kernel stays untouched. Models without prefix tokens use the mean query instead.
    """
    query = q[:, :, :1] if num_prefix else q.mean(dim=2, keepdim=True)
    logits = (query * scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def protected_mask(cls_attn: Tensor, fraction: float, alive: Optional[Tensor] = None) -> Tensor:
    """``[B, N]`` bool: the ``int(fraction * N)`` patch tokens with the highest class attention ``[B, N]``.

    With ``alive`` (``[B, N]`` bool, False on padding rows), ``N`` is each image's own count of live tokens, and ties
    go to the earlier token, so an image's protected tokens do not depend on the padding its batch adds.
    """
    if alive is not None:
        rank = torch.empty_like(cls_attn, dtype=torch.long)
        order = stable_argsort(cls_attn.masked_fill(~alive, -1.0), descending=True)
        rank.scatter_(1, order, torch.arange(cls_attn.shape[1], device=cls_attn.device).expand_as(order))
        keep = (alive.sum(dim=1).double() * fraction).floor().long()  # float64, as int(fraction * n) in Python
        return rank < keep.unsqueeze(1)
    batch, n = cls_attn.shape
    k = int(fraction * n)
    mask = torch.zeros(batch, n, dtype=torch.bool, device=cls_attn.device)
    if k:  # a tensor source, not a Python bool: TorchScript tracing and ONNX export have no scatter with a scalar bool
        top = cls_attn.topk(k, dim=-1).indices
        mask = mask.scatter(1, top, torch.ones_like(top, dtype=torch.bool))
    return mask


def _fit_threshold(alive: Tensor, plan: BlockPlan, chosen: List[float]) -> Callable[[Tensor], float]:
    """What :func:`threshold_soft_matching` calls while a block fits its threshold: from the best similarities of
    the batch, the threshold under which it keeps ``plan.tokens_out`` patch tokens per image on average (the batch's
    ``B * (tokens_in - tokens_out)`` most similar proposals merge, spread over the images as their similarities
    fall); appended to ``chosen``."""

    def choose(node_max: Tensor) -> float:
        k = int(alive.sum()) - alive.shape[0] * plan.tokens_out  # merges the batch needs
        candidates = node_max.flatten()
        threshold = 2.0 if k <= 0 else float(candidates.topk(min(k, candidates.numel())).values[-1].clamp_min(-1.0))
        chosen.append(threshold)
        return threshold

    return choose


@torch.compiler.disable  # type: ignore[untyped-decorator]  # reads a length back: compiled code runs around it
def _merge_adaptive(
    x: Tensor,
    metric: Tensor,
    size: Tensor,
    pos: Tensor,
    alive: Tensor,
    protected: Optional[Tensor],
    plan: BlockPlan,
    num_prefix: int,
    config: DSMConfig,
) -> Tuple[Tensor, MergeState]:
    """:func:`merge_step`'s global merge under adaptive merging (:func:`threshold_soft_matching`): the plan's
    threshold, or, while fitting, the one this batch needs (reported in the state; the batch stays whole)."""
    if metric.shape[1] < 2:  # a single patch token left: nothing to pair
        return x, MergeState(size, pos)
    parity, sort = (num_prefix % 2, num_prefix > 0) if config.matching == "tome" else (0, False)
    chosen: List[float] = []
    threshold = plan.threshold
    choose = _fit_threshold(alive, plan, chosen) if threshold is None else threshold
    m = threshold_soft_matching(metric, choose, alive, config.buckets, protected, num_prefix, parity, sort)
    x, size = merge_wavg(m.merge, x, size, padded=True)
    if chosen:
        return x, MergeState(size, m.new_index.gather(1, pos), None, chosen[0])
    return x, MergeState(size, m.new_index.gather(1, pos), m.lengths)


def merge_step(
    x: Tensor,
    metric: Tensor,
    state: MergeState,
    plan: BlockPlan,
    grid: Tuple[int, int],
    num_prefix: int,
    config: Optional[DSMConfig] = None,
    cls_attn: Optional[Tensor] = None,
) -> Tuple[Tensor, MergeState]:
    """Apply one block's merge to tokens ``x`` ``[B, T, C]`` (prefix first) with ``metric`` ``[B, T, D]``.

    ``config`` supplies the merge options (:attr:`~DSMConfig.metric`, :attr:`~DSMConfig.protect`; ToMe's when
    None); ``cls_attn`` ``[B, T]`` is the class attention that ``protect`` ranks by.
    """
    batch = x.shape[0]
    if config is not None and config.metric == "tokens":
        metric = x[:, num_prefix:]
    else:  # ToMe's keys: [B, T, D], or per-head keys [B, heads, T, head_dim] averaged here (only when used)
        metric = (metric.mean(dim=1) if metric.ndim == 4 else metric)[:, num_prefix:]
    adaptive = plan.adaptive and plan.mode == "global"
    alive = _alive(state, x, num_prefix) if adaptive else None
    if alive is not None and num_prefix == 0 and config is not None and config.protect > 0:
        raise ConfigError(
            "adaptive merging (threshold) with protect > 0 ranks tokens by the class token's attention, and this "
            "model has no class token (the mean query would include padding); set protect=0"
        )
    protected = _protected(config, cls_attn, num_prefix, alive)
    size = state.size
    if size is None:
        size = torch.ones(batch, x.shape[1], 1, dtype=torch.float32, device=x.device)  # exact counts (bf16 is not)
    pos = state.pos
    if pos is None:
        pos = torch.arange(grid[0] * grid[1], device=x.device).expand(batch, -1)
    if alive is not None:
        assert config is not None
        merged: Tuple[Tensor, MergeState] = _merge_adaptive(
            x, metric, size, pos, alive, protected, plan, num_prefix, config
        )
        return merged
    if plan.mode != "local":  # global: the prefix tokens ride along in the merge, no split and concatenation
        tome_order = config is not None and config.matching == "tome"
        x, size, new_index = merge_global(x, size, metric, plan.r, protected, num_prefix, tome_order)
        return x, MergeState(size, new_index.gather(1, pos))
    return _merge_windows(x, metric, size, pos, protected, plan, grid, num_prefix, first=state.pos is None)


def _alive(state: MergeState, x: Tensor, num_prefix: int) -> Tensor:
    """``[B, N]`` bool: which patch tokens are real (padding rows of adaptive merging have size 0)."""
    if state.size is not None:
        return state.size[:, num_prefix:, 0] > 0
    return torch.ones(x.shape[0], x.shape[1] - num_prefix, dtype=torch.bool, device=x.device)


def _protected(
    config: Optional[DSMConfig], cls_attn: Optional[Tensor], num_prefix: int, alive: Optional[Tensor]
) -> Optional[Tensor]:
    """The tokens :attr:`DSMConfig.protect` keeps out of this merge, or None."""
    if config is None or config.protect <= 0:
        return None
    if cls_attn is None:
        raise ConfigError(
            "DSMConfig.protect needs the class attention, but this model's adapter passed none to "
            "BlockCall.merge(tokens, metric, cls_attn); set protect=0 or extend the adapter "
            "(docs/models.md, 'Custom ViTs')"
        )
    return protected_mask(cls_attn[:, num_prefix:], config.protect, alive)


def _merge_windows(
    x: Tensor,
    metric: Tensor,
    size: Tensor,
    pos: Tensor,
    protected: Optional[Tensor],
    plan: BlockPlan,
    grid: Tuple[int, int],
    num_prefix: int,
    first: bool,
) -> Tuple[Tensor, MergeState]:
    """:func:`merge_step`'s local merge; ``first``: tokens are still in raster order and are regrouped window by
    window first."""
    prefix, patches = x[:, :num_prefix], x[:, num_prefix:]
    size_prefix, size = size[:, :num_prefix], size[:, num_prefix:]
    if first:
        order = window_order(grid, plan.groups, x.device)
        patches, size, metric = patches[:, order], size[:, order], metric[:, order]
        protected = None if protected is None else protected[:, order]
        pos = torch.argsort(order).expand(x.shape[0], -1)
    patches, size, new_index = merge_local(patches, size, metric, plan.groups, protected)
    x = torch.cat([prefix, patches], dim=1)
    return x, MergeState(torch.cat([size_prefix, size], dim=1), new_index.gather(1, pos))


def unmerge(x: Tensor, state: MergeState, num_prefix: int) -> Tensor:
    """Broadcast merged tokens back onto the input patch layout: ``[B, prefix + N0, C]``.

    Each input patch receives the value of the token that holds it, so an average over patches equals the
    size-weighted average over tokens, and any head that reads patch tokens sees the dense layout.
    """
    if state.pos is None:
        return x
    c = x.shape[-1]
    patches = x[:, num_prefix:].gather(1, state.pos.unsqueeze(-1).expand(-1, -1, c))
    return torch.cat([x[:, :num_prefix], patches], dim=1)
