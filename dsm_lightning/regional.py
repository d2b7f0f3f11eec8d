"""Regional compilation: ``torch.compile`` each block's ``forward`` instead of the whole model.

The compiled forward is an instance attribute shadowing the block class's ``forward``, so ``__call__`` and hooks stay
eager; :mod:`dsm_lightning.patch` drops compiled forwards once a block's class changes (they were traced through the
old one).
"""

from __future__ import annotations

import contextlib
import types
import weakref
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from .adapters import get_adapter
from .adapters.base import unwrap_block
from .patch import compiled_blocks, get_config
from .state import COMPILED_MARK

__all__ = ["compile_blocks", "uncompile_blocks", "eager_blocks"]

#: Per model, its own copy of :func:`_call_block_forward` (see :func:`_block_entry`).
_BLOCK_ENTRIES: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()


def compile_blocks(model: nn.Module, **options: Any) -> nn.Module:
    """Regional compilation: ``torch.compile`` each block's ``forward`` instead of the whole model; returns ``model``.

    All blocks of a model run the same code, so they share one set of compiled graphs: with ``dynamic=True`` (the
    default here) a merging model needs two graphs (the first merging block, which has no size bias yet, and every
    later one, whatever its token count or the input size; one more where a block is left with a single unmerged
    token, a size Dynamo always specialises) instead of one specialised copy of every block, which cuts cold compile
    time to about 40% (README, "torch.compile"). The rest of the model (embedding, unmerge, norm, head) stays eager, and
    so do hooks on blocks: only ``forward`` is compiled, as an instance attribute. Works patched or not (compile the
    dense model the same way for a like-for-like baseline), but compile *after* :func:`apply_dsm`: a compiled forward
    was traced through its block's class, so :func:`apply_dsm` and :func:`remove_dsm` drop it once that class
    changes (re-configuring a patched model keeps it). :func:`uncompile_blocks` takes it away; pickling leaves it
    out. Each model has a graph cache of its own (Dynamo's ``recompile_limit`` counts per model), and a model compiled
    again reuses its graphs.

    Under adaptive merging (:attr:`DSMConfig.threshold <dsm_lightning.DSMConfig>`) each merge reads its output length
    back to the host, so the merge runs eager between compiled graphs (``fullgraph=False``); the token counts are
    rounded to :attr:`~DSMConfig.buckets` levels and the graphs are dynamic, so a stage at one input size and one
    batch size (plus a smaller last batch) compiles 5 graphs (tested on timm's ViT); batch size 1 specialises
    them further.

    Args:
        model: A supported ViT.
        **options: ``torch.compile`` keyword arguments; defaults ``fullgraph=True`` (``False`` under adaptive
            merging), ``dynamic=True``.
    """
    config = get_config(model)
    adaptive = config is not None and config.threshold is not None  # its merge reads a count back: a graph break
    options = {"fullgraph": not adaptive, "dynamic": True, **options}
    uncompile_blocks(model)
    entry = _block_entry(model)
    for block in get_adapter(model).blocks(model):
        inner = unwrap_block(block)
        compiled = torch.compile(types.MethodType(entry, inner), **options)
        setattr(compiled, COMPILED_MARK, type(inner))
        inner.__dict__["forward"] = compiled  # shadows the class's forward; __call__ (and its hooks) stay eager
    return model


def _call_block_forward(block: nn.Module, x: Tensor, *args: Any, **kwargs: Any) -> Any:
    """What a compiled block runs: its class's ``forward`` (patched or not; the instance attribute is bypassed)."""
    return type(block).forward(block, x, *args, **kwargs)


def _block_entry(model: nn.Module) -> Any:
    """``model``'s own copy of :func:`_call_block_forward`, with a code object of its own.

    ``torch.compile`` keeps its graphs, and counts recompilations against ``recompile_limit`` (8), per code object.
    Sharing one entry across models would pile every model's and config's graphs onto it, and ``fullgraph=True``
    turns the ninth into a hard error; a copy per model keeps each model's graphs apart, while a model compiled again
    (every validation epoch) still finds its own.
    """
    entry = _BLOCK_ENTRIES.get(model)
    if entry is None:
        code = _call_block_forward.__code__.replace()  # a new code object, hence a graph cache of its own
        entry = types.FunctionType(code, _call_block_forward.__globals__, code.co_name)
        _BLOCK_ENTRIES[model] = entry
    return entry


def uncompile_blocks(model: nn.Module) -> nn.Module:
    """Undo :func:`compile_blocks` (a no-op where no block is compiled) and return ``model``."""
    for block in compiled_blocks(model):
        del block.__dict__["forward"]
    return model


@contextlib.contextmanager
def eager_blocks(model: nn.Module) -> Iterator[nn.Module]:
    """Run the blocks uncompiled inside the ``with`` block (for FLOP counting, whose dispatch mode compiled code
    refuses); the compiled forwards of :func:`compile_blocks` are put back after."""
    blocks = compiled_blocks(model)
    forwards = [block.__dict__.pop("forward") for block in blocks]
    try:
        yield model
    finally:
        for block, forward in zip(blocks, forwards):
            block.__dict__["forward"] = forward
