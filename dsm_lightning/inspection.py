"""Look inside a patched model: the merged tokens with their sizes and sources (:func:`trace_tokens`), and block
outputs unmerged onto the dense layout (:func:`dense_intermediates`)."""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence

from torch import Tensor, nn

from .adapters import get_adapter
from .engine import BlockHook
from .merge import MergeState, unmerge
from .patch import is_patched
from .schedule import TokenPlan

__all__ = ["TokenTrace", "trace_tokens", "dense_intermediates"]


class TokenTrace(NamedTuple):
    """Result of :func:`trace_tokens`.

    Attributes:
        tokens: Merged tokens after the last block (before the final norm), ``[B, prefix + N_out, C]``.
        state: Final sizes and patch-to-token map (``state.pos``: ``[B, N0]``, index among patch tokens).
        plan: The :class:`TokenPlan` used.
    """

    tokens: Tensor
    state: MergeState
    plan: TokenPlan


def trace_tokens(model: nn.Module, images: Tensor, hook: Optional[BlockHook] = None) -> TokenTrace:
    """Run a patched model's blocks on ``images`` and return the merged tokens with their sizes and sources.

    ``hook(block_index, tokens, state)`` is called after every block. Used by the visualiser and the tests.
    """
    if not is_patched(model):
        raise ValueError("trace_tokens needs a patched model: call apply_dsm(model, ...) first")
    adapter = get_adapter(model)
    tokens, grid = adapter.embed(model, images)
    tokens, state = adapter.run(model, tokens, grid, hook)
    return TokenTrace(tokens, state, adapter.plan(model, grid))


def dense_intermediates(model: nn.Module, images: Tensor, indices: Optional[Sequence[int]] = None) -> Dict[int, Tensor]:
    """Block outputs of a patched model, unmerged onto the dense layout ``[B, prefix + N0, C]``, for any adapter
    (timm, torchvision, transformers, custom): ``{block index: tokens}`` for ``indices`` (every block when None;
    negative indices count from the end).

    Each input patch position holds the token it was merged into, so necks and heads built for the dense model read
    them unchanged; outputs of delayed (dense) blocks are exactly the dense model's. Final norms are not applied.
    timm models also offer timm's own ``forward_intermediates`` while patched.

    Raises:
        IndexError: For an index outside ``[-depth, depth)``, as timm's ``forward_intermediates`` does.
    """
    if not is_patched(model):
        raise ValueError("dense_intermediates needs a patched model: call apply_dsm(model, ...) first")
    adapter = get_adapter(model)
    depth = adapter.depth(model)
    bad = [i for i in indices or () if not -depth <= i < depth]
    if bad:
        raise IndexError(f"dense_intermediates: block indices {bad} out of range for a model of depth {depth}")
    wanted = set(range(depth)) if indices is None else {i % depth for i in indices}
    prefix = adapter.num_prefix_tokens(model)
    taken: Dict[int, Tensor] = {}

    def keep(index: int, tokens: Tensor, state: MergeState) -> None:
        if index in wanted:
            taken[index] = unmerge(tokens, state, prefix)

    trace_tokens(model, images, keep)
    return {i: taken[i] for i in sorted(taken)}
