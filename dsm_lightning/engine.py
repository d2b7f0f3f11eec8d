"""The block loop shared by all adapters: dense blocks run untouched, merging blocks attend, merge, then run the MLP.

Everything one forward pass needs (sizes, the patch-to-token map) lives in a :class:`~dsm_lightning.merge.MergeState`
created inside the call and threaded through the loop, never stored on a module.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from torch import Tensor, nn

from .merge import MergeState, merge_step, size_bias
from .schedule import TokenPlan

__all__ = ["run_blocks", "check_tokens", "BlockHook", "MergeFn"]

#: ``hook(block_index, tokens, state)`` called after every block (used by tests and the visualiser).
BlockHook = Callable[[int, Tensor, MergeState], None]
#: ``step(tokens, metric) -> (tokens, state)``: the merge of the current block, handed to an adapter's block fn.
MergeFn = Callable[[Tensor, Tensor], Tuple[Tensor, MergeState]]


def run_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    plan: TokenPlan,
    dense_block: Callable[[nn.Module, Tensor, Optional[Tensor]], Tensor],
    merge_block: Callable[[nn.Module, Tensor, Optional[Tensor], MergeFn], Tuple[Tensor, MergeState]],
    hook: Optional[BlockHook] = None,
) -> Tuple[Tensor, MergeState]:
    """Run ``blocks`` on tokens ``x`` ``[B, prefix + N, C]`` following ``plan``.

    Args:
        blocks: The transformer blocks, in order.
        x: Tokens, prefix tokens first.
        plan: The :class:`TokenPlan` for this input's grid.
        dense_block: ``fn(block, x, bias)`` running a block without merging (``bias`` is None while sizes are equal,
            which lets an adapter call the block's own forward).
        merge_block: ``fn(block, x, bias, step)`` running a block that calls ``step(x, metric)`` between attention
            and MLP and returns ``(x, state)``.
        hook: Optional per-block observer.

    Returns:
        The tokens after the last block and the final :class:`MergeState`.
    """
    state = MergeState()
    num_prefix = plan.num_prefix_tokens
    for blk, bp in zip(blocks, plan.blocks):
        bias = size_bias(state, x.dtype) if bp.size_bias else None
        if bp.merges:
            def step(tokens: Tensor, metric: Tensor, _state: MergeState = state, _bp=bp) -> Tuple[Tensor, MergeState]:
                return merge_step(tokens, metric, _state, _bp, plan.grid, num_prefix)

            x, state = merge_block(blk, x, bias, step)
        else:
            x = dense_block(blk, x, bias)
        if hook is not None:
            hook(bp.index, x, state)
    return x, state


def check_tokens(x: Tensor, plan: TokenPlan) -> None:
    """Raise if the token count after embedding does not match the plan (e.g. active patch dropout)."""
    expected = plan.num_prefix_tokens + plan.num_patches
    if x.shape[1] != expected:
        raise RuntimeError(
            f"DSM expected {expected} tokens ({plan.num_prefix_tokens} prefix + {plan.grid[0]}x{plan.grid[1]} "
            f"patches) after embedding but got {x.shape[1]}; token-dropping layers (patch dropout in training) "
            f"cannot be combined with merging: call model.eval() or remove_dsm(model)"
        )

