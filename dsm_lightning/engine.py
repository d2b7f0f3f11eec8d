"""The block loop shared by all adapters. Every block runs through its own module call, ``block(x)`` or
``block(x, dsm=call)``, so hooks and wrappers on blocks (checkpoint wrappers, FSDP units) see every block.

Everything one forward pass needs (sizes, the patch-to-token map) lives in a :class:`~dsm_lightning.merge.MergeState`
created inside the call and threaded through the loop in a per-block :class:`BlockCall`, never stored on a module.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from .errors import InputError
from .merge import MergeState, bucket_tokens, merge_step, size_bias
from .schedule import BlockPlan, TokenPlan

__all__ = ["BlockArgs", "BlockCall", "BlockHook", "check_tokens", "run_blocks", "busy_threads"]

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

    Under adaptive merging the images of a batch keep different numbers of tokens. After each adaptive merge the
    batch is regrouped: images are sorted by their token count (rounded up to the plan's buckets) and split into
    sub-batches, each padded only to its own longest image, and every later block runs once per sub-batch. So a
    batch spends about the FLOPs its images need, not its longest image's times the batch size; where the split
    goes is chosen by :func:`_partition` (a sub-batch costs about :data:`_GROUP_TOKENS` tokens of padding in
    calls). An image's tokens do not depend on its neighbours either way (padding only ever sits behind them);
    the result is reassembled in input order, padded to the longest image.

    Args:
        blocks: The transformer blocks, in order (patched by :func:`~dsm_lightning.apply_dsm`; wrappers around them
            must pass keyword arguments through).
        x: Tokens, prefix tokens first.
        plan: The :class:`TokenPlan` for this input's grid.
        hook: Optional per-block observer (it sees the whole batch, reassembled, after every block).
        block_args: Positional arguments after the tokens that the family's blocks require (HF layers take their
            attention mask positionally: ``(None,)``).
        checkpoint: Run every block under activation checkpointing (``torch.utils.checkpoint``, non-reentrant), as
            timm's ``set_grad_checkpointing(True)`` does for the dense model.
        args_for: Computes each block's positional arguments from the state before it (replaces ``block_args``).

    Returns:
        The tokens after the last block and the final :class:`MergeState`.
    """
    groups = [_Group(x, MergeState(), None)]
    with _cpu_threads(x, plan):
        for blk, bp in zip(blocks, plan.blocks):
            groups = [_run_block(blk, bp, plan, g, block_args, checkpoint, args_for) for g in groups]
            if bp.merges and groups[0].state.lengths is not None:
                groups = _regroup(groups, plan)
            if hook is not None:
                x, state = _assemble(groups)
                hook(bp.index, x, state)
        return _assemble(groups)


def busy_threads() -> Optional[int]:
    """How many threads a merged forward's blocks run on when it runs on the CPU: None to leave torch's setting.

    A merge is many small multi-threaded ops; on a CPU that other processes also keep busy, every one of them waits
    at its thread barrier for a descheduled thread, and the merged model can end up slower than the dense one
    (beside four processes running 2-thread matmuls on 2 cores, the default ran at 0.85x of dense on 2 threads and
    1.5x on one; ``benchmarks/load_speed.py``). So when the one-minute load average exceeds 1.5 times the CPUs this
    process may use, the blocks run on one thread (and torch's setting comes back after them). The environment
    variable ``DSM_CPU_THREADS`` overrides this: ``auto`` (the default), ``off`` (never change the threads) or a
    number of threads to always use. Compiled blocks keep the threads they were compiled with.
    """
    setting = os.environ.get("DSM_CPU_THREADS", "auto").strip().lower()
    if setting == "off":
        return None
    if setting != "auto":
        try:
            return max(1, int(setting))
        except ValueError:
            raise InputError(f"DSM_CPU_THREADS must be 'auto', 'off' or a number of threads, got {setting!r}") from None
    try:
        cpus = len(os.sched_getaffinity(0))
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Linux / no load average: leave the threads alone
        return None
    return 1 if load > 1.5 * cpus else None


@contextlib.contextmanager
def _cpu_threads(x: Tensor, plan: TokenPlan) -> Iterator[None]:
    """Run the enclosed blocks on :func:`busy_threads` threads when ``x`` is on the CPU and the plan merges."""
    threads = None
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and any(b.merges for b in plan.blocks):
        threads = busy_threads()
    before = None if threads is None else torch.get_num_threads()  # never called while compiling
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        assert before is not None
        torch.set_num_threads(before)


class _Group(NamedTuple):
    """A sub-batch: its tokens, their state and which images of the batch they are (None: all, in order)."""

    x: Tensor
    state: MergeState
    rows: Optional[Tuple[int, ...]]


#: What one more sub-batch costs, in padding tokens of one image: its calls (about 20 ops a block) against the
#: per-token work saved (measured on CPU for ViT-S and ViT-B, benchmarks/adaptive_speed.py).
_GROUP_TOKENS = 16


def _run_block(
    blk: nn.Module,
    bp: BlockPlan,
    plan: TokenPlan,
    group: _Group,
    block_args: Tuple[Any, ...],
    checkpoint: bool,
    args_for: Optional[BlockArgs],
) -> _Group:
    x, state = group.x, group.state
    bias = size_bias(state, x.dtype) if bp.size_bias else None
    args = block_args if args_for is None else args_for(bp.index, state)
    call = None
    if bp.merges or bias is not None:  # host lengths stay out of the block: a compiled block would guard on them
        call = BlockCall(state if state.lengths is None else state._replace(lengths=None), bias, bp, plan, args)
    kwargs: Dict[str, Any] = {} if call is None else {"dsm": call}
    if checkpoint:
        x = activation_checkpoint(blk, x, *args, use_reentrant=False, **kwargs)
    else:
        x = blk(x, *args, **kwargs)
    if call is not None and call.state is not call.before:
        state = call.state
    return _Group(x, state, group.rows)


def _partition(levels: Sequence[int], call_cost: int) -> List[Tuple[int, int]]:
    """Split ``levels`` (token counts, sorted longest first) into runs ``[i, j)`` that minimise the padded tokens
    ``(j - i) * levels[i]`` summed over runs, plus ``call_cost`` per run (an exact dynamic programme). A run holds
    two images or more when the batch does: Dynamo specialises a batch of one, so compiled blocks would need graphs
    of their own for it."""
    least = 2 if len(levels) > 1 else 1
    best, cut = [0] + [2**62] * len(levels), [0] * (len(levels) + 1)
    for j in range(least, len(levels) + 1):
        for i in range(j - least + 1):
            cost = best[i] + (j - i) * levels[i] + call_cost
            if cost < best[j]:
                best[j], cut[j] = cost, i
    runs, j = [], len(levels)
    while j:
        runs.append((cut[j], j))
        j = cut[j]
    return runs[::-1]


def _regroup(groups: List[_Group], plan: TokenPlan) -> List[_Group]:
    """Regroup the batch by its images' token counts after an adaptive merge (host ints only: no read back)."""
    p, n, buckets = plan.num_prefix_tokens, plan.num_patches, plan.config.buckets
    images = [  # (level, group, row in group), longest first; ties keep batch order
        (p + bucket_tokens(length - p, n, buckets), gi, i)
        for gi, g in enumerate(groups)
        for i, length in enumerate(g.state.lengths or ())
    ]
    images.sort(key=lambda item: -item[0])
    runs = _partition([level for level, _, _ in images], _GROUP_TOKENS)
    if len(runs) == len(groups) == 1 and images[0][0] == groups[0].x.shape[1]:
        return groups  # one sub-batch, already as short as it can be (always so at batch size 1)
    out = []
    for i, j in runs:
        members = images[i:j]
        length = members[0][0]
        parts = []
        for gi, g in enumerate(groups):
            mine = [row for _, gj, row in members if gj == gi]
            if mine:
                parts.append(_take(g, mine, length))
        out.append(parts[0] if len(parts) == 1 else _concat(parts))
    return out


def _take(group: _Group, rows: List[int], length: int) -> _Group:
    """``rows`` of ``group``, cut to ``length`` tokens."""
    x, state = group.x, group.state
    assert state.size is not None and state.pos is not None and state.lengths is not None
    index = None if rows == list(range(x.shape[0])) else torch.tensor(rows, device=x.device)

    def pick(t: Tensor) -> Tensor:
        return t if index is None else t.index_select(0, index)

    ids = group.rows if group.rows is not None else tuple(range(x.shape[0]))
    lengths = tuple(state.lengths[r] for r in rows)
    return _Group(
        pick(x[:, :length]),
        MergeState(pick(state.size[:, :length]), pick(state.pos), lengths),
        tuple(ids[r] for r in rows),
    )


def _concat(parts: List[_Group], length: Optional[int] = None) -> _Group:
    """Sub-batches stacked along the batch axis, padded to ``length`` tokens (their longest when None)."""
    length = max(g.x.shape[1] for g in parts) if length is None else length
    pad = [length - g.x.shape[1] for g in parts]
    xs, sizes, pos = [], [], []
    for g, k in zip(parts, pad):
        assert g.state.size is not None and g.state.pos is not None  # sub-batches exist only after a merge
        xs.append(g.x if k == 0 else F.pad(g.x, (0, 0, 0, k)))
        sizes.append(g.state.size if k == 0 else F.pad(g.state.size, (0, 0, 0, k)))
        pos.append(g.state.pos)
    lengths = tuple(n for g in parts for n in (g.state.lengths or ()))
    rows = tuple(r for g in parts for r in (g.rows or ()))
    state = MergeState(torch.cat(sizes), torch.cat(pos), lengths or None)
    return _Group(torch.cat(xs), state, rows)


def _assemble(groups: List[_Group]) -> Tuple[Tensor, MergeState]:
    """The whole batch in input order, padded to its longest image."""
    if len(groups) == 1 and groups[0].rows is None:
        return groups[0].x, groups[0].state
    x, state, rows = _concat(groups)
    size, pos, lengths = state.size, state.pos, state.lengths
    assert rows is not None and size is not None and pos is not None
    rank = sorted(range(len(rows)), key=rows.__getitem__)
    order = torch.tensor(rank, device=x.device)
    lengths = None if lengths is None else tuple(lengths[i] for i in rank)
    return x.index_select(0, order), MergeState(size.index_select(0, order), pos.index_select(0, order), lengths)


def check_tokens(x: Tensor, plan: TokenPlan) -> None:
    """Raise if the token count after embedding does not match the plan (e.g. active patch dropout)."""
    expected = plan.num_prefix_tokens + plan.num_patches
    if x.shape[1] != expected:
        raise InputError(
            f"DSM expected {expected} tokens ({plan.num_prefix_tokens} prefix + {plan.grid[0]}x{plan.grid[1]} "
            f"patches) after embedding but got {x.shape[1]}; token-dropping layers (patch dropout in training) "
            f"cannot be combined with merging: call model.eval() or remove_dsm(model)"
        )
