"""The block loop shared by all adapters. Every block runs through its own module call, ``block(x)`` or
``block(x, dsm=call)``, so hooks and wrappers on blocks (checkpoint wrappers, FSDP units) see every block.

Everything one forward pass needs (sizes, the patch-to-token map) lives in a :class:`~dsm_lightning.merge.MergeState`
created inside the call and threaded through the loop in a per-block :class:`BlockCall`, never stored on a module.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .errors import InputError
from .merge import MergeState, merge_step, size_bias
from .schedule import BlockPlan, TokenPlan

__all__ = ["BlockArgs", "BlockCall", "BlockHook", "check_tokens", "run_blocks"]

#: ``hook(block_index, tokens, state)`` called after every block (used by tests and the visualiser).
BlockHook = Callable[[int, Tensor, MergeState], None]
#: ``args_for(block_index, state)``: the positional arguments a block takes after the tokens, from the merge state
#: before it (a RoPE family's rotary embedding of the current tokens, :meth:`Adapter.block_inputs`).
BlockArgs = Callable[[int, MergeState], Tuple[Any, ...]]


class BlockCall:
    """What one block needs in one forward pass: the attention ``bias`` (``[B, 1, 1, T]`` log-sizes, or None) and,
    for a merging block, the merge between attention and MLP.

    The engine passes it as ``block(x, dsm=call)``; the patched block runs attention, then :meth:`merge` (which
    records the new :class:`MergeState` in :attr:`state`), then its MLP.

    A recomputed block (activation checkpointing runs a block's forward again in backward) merges from the same
    input state as the first call, so it produces the same tokens: :meth:`merge` always starts from
    :attr:`before`.

    Attributes:
        before: Sizes and patch-to-token map before the block (never changed).
        state: :attr:`before` until :meth:`merge` runs; after it, the state after the block.
        bias: Additive attention bias, None while all sizes are equal.
        block: This block's :class:`BlockPlan`.
        plan: The whole :class:`TokenPlan`.
        args: The positional arguments the block gets after the tokens (``block_args``, or what ``args_for``
            computed for this block, e.g. its rotary embedding).
    """

    def __init__(
        self, state: MergeState, bias: Optional[Tensor], block: BlockPlan, plan: TokenPlan, args: Tuple[Any, ...] = ()
    ) -> None:
        self.before = state
        self.state = state
        self.bias = bias
        self.block = block
        self.plan = plan
        self.args = args

    @property
    def merges(self) -> bool:
        """Whether this block merges tokens."""
        return self.block.merges

    @property
    def class_attention_prefix(self) -> Optional[int]:
        """``num_prefix_tokens`` when the merge ranks tokens by the class token's attention (``protect > 0``), else
        None: an adapter computes :func:`~dsm_lightning.merge.class_attention` only when this is set."""
        if self.block.merges and self.plan.config.protect > 0:
            return self.plan.num_prefix_tokens
        return None

    def merge(self, tokens: Tensor, metric: Tensor, cls_attn: Optional[Tensor] = None) -> Tensor:
        """Merge ``tokens`` ``[B, T, C]`` by ``metric`` ``[B, T, D]`` as the plan says; returns the merged tokens and
        keeps their state in :attr:`state`."""
        plan = self.plan
        tokens, self.state = merge_step(
            tokens, metric, self.before, self.block, plan.grid, plan.num_prefix_tokens, plan.config, cls_attn
        )
        return tokens


def run_blocks(
    blocks: Sequence[nn.Module],
    x: Tensor,
    plan: TokenPlan,
    hook: Optional[BlockHook] = None,
    block_args: Tuple[Any, ...] = (),
    checkpoint: bool = False,
    args_for: Optional[BlockArgs] = None,
) -> Tuple[Tensor, MergeState]:
    """Run ``blocks`` on tokens ``x`` ``[B, prefix + N, C]`` following ``plan``.

    A block that neither merges nor needs a size bias runs as ``block(x)`` (its own forward, bit-identical to the
    unpatched model); every other block runs as ``block(x, dsm=call)`` with a :class:`BlockCall`.

    Args:
        blocks: The transformer blocks, in order (patched by :func:`~dsm_lightning.apply_dsm`; wrappers around them
            must pass keyword arguments through).
        x: Tokens, prefix tokens first.
        plan: The :class:`TokenPlan` for this input's grid.
        hook: Optional per-block observer.
        block_args: Positional arguments after the tokens that the family's blocks require (HF layers take their
            attention mask positionally: ``(None,)``).
        checkpoint: Run every block under activation checkpointing (``torch.utils.checkpoint``, non-reentrant), as
            timm's ``set_grad_checkpointing(True)`` does for the dense model.
        args_for: Computes each block's positional arguments from the state before it (replaces ``block_args``).

    Returns:
        The tokens after the last block and the final :class:`MergeState`.
    """
    state = MergeState()
    for blk, bp in zip(blocks, plan.blocks):
        bias = size_bias(state, x.dtype) if bp.size_bias else None
        args = block_args if args_for is None else args_for(bp.index, state)
        call = BlockCall(state, bias, bp, plan, args) if bp.merges or bias is not None else None
        kwargs: Dict[str, Any] = {} if call is None else {"dsm": call}
        if checkpoint:
            x = activation_checkpoint(blk, x, *args, use_reentrant=False, **kwargs)
        else:
            x = blk(x, *args, **kwargs)
        if call is not None:
            state = call.state
        if hook is not None:
            hook(bp.index, x, state)
    return x, state


def check_tokens(x: Tensor, plan: TokenPlan) -> None:
    """Raise if the token count after embedding does not match the plan (e.g. active patch dropout)."""
    expected = plan.num_prefix_tokens + plan.num_patches
    if x.shape[1] != expected:
        raise InputError(
            f"DSM expected {expected} tokens ({plan.num_prefix_tokens} prefix + {plan.grid[0]}x{plan.grid[1]} "
            f"patches) after embedding but got {x.shape[1]}; token-dropping layers (patch dropout in training) "
            f"cannot be combined with merging: call model.eval() or remove_dsm(model)"
        )
