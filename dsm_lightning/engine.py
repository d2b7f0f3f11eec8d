"""The block loop shared by all adapters: dense blocks run untouched, merging blocks attend, merge, then run the MLP.

Everything one forward pass needs (sizes, the patch-to-token map) lives in a :class:`~dsm_lightning.merge.MergeState`
created inside the call and threaded through the loop, never stored on a module.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

from torch import Tensor, nn

from .merge import MergeState, merge_step, size_bias
from .schedule import BlockPlan, TokenPlan

__all__ = ["run_blocks", "check_tokens", "BlockHook", "MergeStep", "MergeFn"]

#: ``hook(block_index, tokens, state)`` called after every block (used by tests and the visualiser).
BlockHook = Callable[[int, Tensor, MergeState], None]


class MergeStep:
    """The merge of one block, handed to an adapter's ``merge_block``: ``step(tokens, metric, cls_attn=None)``.

    Called between attention and MLP with the tokens ``[B, T, C]`` and the merge metric ``[B, T, D]`` (keys averaged
    over heads); returns ``(tokens, state)``. ``needs_class_attention`` tells the adapter to also pass the class
    token's attention ``[B, T]`` (see :func:`~dsm_lightning.merge.class_attention`), which ``protect`` ranks by.
    """

    __slots__ = ("block", "needs_class_attention", "plan", "state")

    def __init__(self, state: MergeState, block: BlockPlan, plan: TokenPlan) -> None:
        self.state = state
        self.block = block
        self.plan = plan
        self.needs_class_attention = plan.config.protect > 0

    def __call__(self, tokens: Tensor, metric: Tensor, cls_attn: Optional[Tensor] = None) -> Tuple[Tensor, MergeState]:
        plan = self.plan
        return merge_step(
            tokens, metric, self.state, self.block, plan.grid, plan.num_prefix_tokens, plan.config, cls_attn
        )


#: Type of the ``step`` argument of ``Adapter.merge_block``.
MergeFn = MergeStep


def run_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    plan: TokenPlan,
    dense_block: Callable[[nn.Module, Tensor, Optional[Tensor]], Tensor],
    merge_block: Callable[[nn.Module, Tensor, Optional[Tensor], MergeStep], Tuple[Tensor, MergeState]],
    hook: Optional[BlockHook] = None,
) -> Tuple[Tensor, MergeState]:
    """Run ``blocks`` on tokens ``x`` ``[B, prefix + N, C]`` following ``plan``.

    Args:
        blocks: The transformer blocks, in order.
        x: Tokens, prefix tokens first.
        plan: The :class:`TokenPlan` for this input's grid.
        dense_block: ``fn(block, x, bias)`` running a block without merging (``bias`` is None while sizes are equal,
            which lets an adapter call the block's own forward).
        merge_block: ``fn(block, x, bias, step)`` running a block that calls ``step(x, metric)`` (a
            :class:`MergeStep`) between attention and MLP and returns ``(x, state)``.
        hook: Optional per-block observer.

    Returns:
        The tokens after the last block and the final :class:`MergeState`.
    """
    state = MergeState()
    for blk, bp in zip(blocks, plan.blocks):
        bias = size_bias(state, x.dtype) if bp.size_bias else None
        if bp.merges:
            x, state = merge_block(blk, x, bias, MergeStep(state, bp, plan))
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
