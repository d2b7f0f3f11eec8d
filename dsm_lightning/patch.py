"""apply_dsm / remove_dsm: swap a model's class, and its blocks' classes, for DSM subclasses; restore them exactly.

The model's subclass overrides the method that runs the blocks (``forward_features`` for timm). Each block's subclass
accepts ``block(x, dsm=call)`` (run by the engine for blocks that merge or need the size bias) and otherwise runs the
original forward, so every block still executes through its own module call: forward hooks fire, and wrappers
around blocks (activation checkpointing, FSDP units) stay in the path. Patching adds no parameters or buffers:
``state_dict`` is untouched, and removing the patch restores the original classes, so outputs are bit-identical to a
model that was never patched.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type, cast

from torch import Tensor, nn

from .adapters import Adapter, get_adapter, registered_adapters
from .adapters.base import unwrap_block
from .config import DSMConfig, resolve_config
from .engine import BlockCall
from .schedule import TokenPlan, plan_tokens
from .state import BLOCK_ORIGINAL, COMPILED_MARK, PATCH_ADAPTER, PATCH_RECORD, PatchRecord, patch_record

__all__ = [
    "apply_dsm",
    "remove_dsm",
    "unpatched",
    "is_patched",
    "get_config",
    "token_plan",
]

_CLASS_CACHE: Dict[Tuple[type, Adapter], type] = {}
_BLOCK_CLASS_CACHE: Dict[Tuple[type, Adapter], type] = {}


def _patched_class(cls: type, adapter: Adapter) -> type:
    key = (cls, adapter)  # per instance: two instances of one adapter class may differ (TimmEvaAdapter rule)
    if key not in _CLASS_CACHE:
        attrs = {
            **adapter.overrides(),
            PATCH_ADAPTER: adapter,
            "__reduce_ex__": _reduce_patched,
            "__copy__": _copy_patched,
        }
        _CLASS_CACHE[key] = type(f"DSM{cls.__name__}", (cls,), attrs)
    return _CLASS_CACHE[key]


def _block_forward(self: nn.Module, x: Tensor, *args: Any, dsm: Optional[BlockCall] = None, **kwargs: Any) -> Any:
    """``forward`` of a patched block: the original forward unless the engine passes ``dsm=call``."""
    cls: Any = type(self)
    if dsm is None:
        return cls.__dict__[BLOCK_ORIGINAL].forward(self, x, *args, **kwargs)
    adapter: Adapter = getattr(cls, PATCH_ADAPTER)
    return adapter.run_block(self, x, dsm)


def _patched_block_class(cls: type, adapter: Adapter) -> type:
    key = (cls, adapter)  # per instance: two instances of one adapter class may differ (TimmEvaAdapter rule)
    if key not in _BLOCK_CLASS_CACHE:
        attrs = {
            "forward": _block_forward,
            PATCH_ADAPTER: adapter,
            BLOCK_ORIGINAL: cls,
            "__reduce_ex__": _reduce_block,
        }
        _BLOCK_CLASS_CACHE[key] = type(f"DSM{cls.__name__}", (cls,), attrs)
    return _BLOCK_CLASS_CACHE[key]


def _patch_blocks(model: nn.Module, adapter: Adapter) -> None:
    for block in adapter.blocks(model):
        inner = unwrap_block(block)
        if BLOCK_ORIGINAL not in type(inner).__dict__:
            inner.__class__ = _patched_block_class(type(inner), adapter)


def _unpatch_blocks(model: nn.Module, adapter: Adapter) -> None:
    for block in adapter.blocks(model):
        inner = unwrap_block(block)
        original = type(inner).__dict__.get(BLOCK_ORIGINAL)
        if original is not None:
            inner.__class__ = original


def _reduce_block(block: nn.Module, protocol: int) -> Tuple[Any, ...]:
    """Pickle a patched block as its original class; the model's unpickling (:func:`apply_dsm`) patches it again.
    A compiled ``forward`` (:func:`compile_blocks`) is run-time state and is left out."""
    state = {k: v for k, v in block.__dict__.items() if not (k == "forward" and hasattr(v, COMPILED_MARK))}
    return _unpickle_module, (type(block).__dict__[BLOCK_ORIGINAL], state)


def _unpickle_module(cls: Type[nn.Module], state: Dict[str, Any]) -> nn.Module:
    module = cls.__new__(cls)
    cast(Any, module).__setstate__(state)  # nn.Module's, which also fills attributes newer torch added
    return module


def _reduce_patched(model: nn.Module, protocol: int) -> Tuple[Any, ...]:
    """Pickle a patched model as its original class plus its config (the patched class is made at run time and has
    no importable name); unpickling re-applies the patch. Used by ``pickle``, ``torch.save`` and ``copy.deepcopy``."""
    record: PatchRecord = model.__dict__[PATCH_RECORD]
    state = {k: v for k, v in model.__dict__.items() if k != PATCH_RECORD}
    return _unpickle_patched, (record.original, state, record.config)


def _copy_patched(model: nn.Module) -> nn.Module:
    """``copy.copy`` of a patched model: new module objects all the way down that share the parameters and buffers
    (what a shallow copy shares), so patching or un-patching the copy's blocks leaves the original's alone. Plain
    ``copy.copy`` would share the blocks themselves, and ``remove_dsm`` on the copy would break the original."""
    copies: Dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) not in copies:
            new = module.__class__.__new__(module.__class__)
            state = dict(module.__dict__)
            for key in ("_parameters", "_buffers", "_non_persistent_buffers_set"):
                if key in state:
                    state[key] = copy.copy(state[key])
            copies[id(module)] = new
            state["_modules"] = {k: None if m is None else clone(m) for k, m in module.__dict__["_modules"].items()}
            object.__setattr__(new, "__dict__", state)
        return copies[id(module)]

    return clone(model)


def _unpickle_patched(cls: Type[nn.Module], state: Dict[str, Any], config: DSMConfig) -> nn.Module:
    return apply_dsm(_unpickle_module(cls, state), config)


def _core(model: nn.Module) -> nn.Module:
    """The module that carries the patch (:meth:`Adapter.core`): ``model`` itself unless it is a task model around a
    supported encoder; ``model`` for unsupported modules (never raises)."""
    for adapter in registered_adapters():
        if adapter.matches(model):
            return adapter.core(model)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` currently runs with DSM."""
    return patch_record(_core(model)) is not None


def get_config(model: nn.Module) -> Optional[DSMConfig]:
    """The :class:`DSMConfig` of a patched model, else None."""
    core = _core(model)
    record = patch_record(core)
    return None if record is None else record.config


def apply_dsm(model: nn.Module, config: Optional[DSMConfig] = None, **overrides: Any) -> nn.Module:
    """Patch ``model`` in place with Delayed Spatial Merging and return it.

    Applying again re-configures: the new config starts from ``config`` if given, else from the model's current
    config, and keyword ``overrides`` go on top.

    Args:
        model: A supported ViT (see :func:`dsm_lightning.adapters.get_adapter`).
        config: A :class:`DSMConfig`.
        **overrides: Fields of :class:`DSMConfig` (``delay``, ``r``, ``windows``, ``local_blocks``, ...).

    Returns:
        The same ``model`` object.

    Raises:
        UnsupportedModelError: For a model or block type no adapter supports.
        ValueError: For a config that cannot work on this model at its default input size.

    Examples:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
        >>> x = torch.randn(2, 3, 64, 64)
        >>> dense = model(x)
        >>> model = apply_dsm(model, r=4)  # 16 patch tokens -> 12 after the first block
        >>> is_patched(model), tuple(model(x).shape)
        (True, (2, 1000))
        >>> torch.equal(remove_dsm(model)(x), dense)  # removed: bit-identical to never patched
        True
    """
    adapter = get_adapter(model)
    adapter.check(model)
    base = config if config is not None else get_config(model)
    config = resolve_config(base, **overrides)
    # Validate now, at the model's default input size, so errors surface at apply time rather than mid-epoch.
    plan_tokens(
        adapter.depth(model), adapter.grid(model), adapter.num_prefix_tokens(model), config, adapter.dims(model)
    )
    core = adapter.core(model)  # the model, or the encoder inside a task model
    record = patch_record(core)
    original = core.__class__ if record is None else record.original
    core.__class__ = _patched_class(original, adapter)
    _patch_blocks(model, adapter)  # idempotent: also after unpickling, which restores blocks unpatched
    _drop_stale_compiled(model)
    core.__dict__[PATCH_RECORD] = PatchRecord(original, config)
    return model


def remove_dsm(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_dsm` (a no-op on an unpatched model) and return ``model``."""
    if is_patched(model):
        adapter = get_adapter(model)
        core = adapter.core(model)
        _unpatch_blocks(model, adapter)
        _drop_stale_compiled(model)
        core.__class__ = core.__dict__.pop(PATCH_RECORD).original
    return model


@contextlib.contextmanager
def unpatched(model: nn.Module) -> Iterator[nn.Module]:
    """Run a patched model dense for a moment: its original class is swapped back inside the ``with`` block and the
    patch is put back after, without re-validating the config (cheap enough for every batch)."""
    core = _core(model)
    record = patch_record(core)
    if record is None:
        yield model
        return
    patched = core.__class__
    core.__class__ = record.original
    try:
        yield model
    finally:
        core.__class__ = patched


def token_plan(
    model: Any = None,
    config: Optional[DSMConfig] = None,
    *,
    depth: Optional[int] = None,
    grid: Optional[Tuple[int, int]] = None,
    img_size: Optional[Tuple[int, int]] = None,
    num_prefix_tokens: Optional[int] = None,
    dims: Optional[Tuple[int, int]] = None,
    **overrides: Any,
) -> TokenPlan:
    """Plan per block: mode (dense / local / global), r, tokens in and out.

    Pure Python, no tensors. Either pass a supported model (its depth, prefix tokens, dims and default grid are
    read by its adapter; ``img_size=(H, W)`` in pixels plans another input size), or ``depth`` + ``grid`` (patch
    rows, cols) + ``num_prefix_tokens``.

    Args:
        model: A supported ViT (patched or not). If patched and ``config`` is None, its current config is used.
        config: A :class:`DSMConfig`; keyword ``overrides`` are applied on top.
        depth: Number of blocks (without a model).
        grid: Patch grid (rows, cols) (without a model, or to override the model's).
        img_size: Input (H, W) in pixels, turned into a grid by the model's adapter.
        num_prefix_tokens: cls + distillation + register tokens (without a model).
        dims: ``(embed_dim, mlp_hidden_dim)``, needed for ``r=None`` without a model.

    Returns:
        The :class:`TokenPlan`.

    Raises:
        ValueError: With the limit that was broken (delay >= depth, r too large, too many windows, ...).

    Examples:
        >>> plan = token_plan(depth=12, grid=(14, 14), num_prefix_tokens=1, config=DSMConfig.tome(16))
        >>> tokens = [b.tokens_out for b in plan.blocks]
        >>> tokens[:3], plan.tokens_out
        ([180, 164, 148], 10)
    """
    if model is not None:
        adapter = get_adapter(model)
        if config is None:
            config = get_config(model)
        depth = adapter.depth(model)
        num_prefix_tokens = adapter.num_prefix_tokens(model)
        dims = adapter.dims(model)
        if grid is None:
            grid = adapter.grid(model, img_size)
    config = resolve_config(config, **overrides)
    if depth is None or grid is None or num_prefix_tokens is None:
        raise ValueError("token_plan needs a model, or depth=, grid= and num_prefix_tokens=")
    return plan_tokens(
        int(depth),
        (int(grid[0]), int(grid[1])),
        int(num_prefix_tokens),
        config,
        (int(dims[0]), int(dims[1])) if dims is not None else None,
    )


def compiled_blocks(model: nn.Module) -> List[nn.Module]:
    """The (unwrapped) blocks of ``model`` whose ``forward`` :func:`compile_blocks` compiled."""
    inner = [unwrap_block(block) for block in get_adapter(model).blocks(model)]
    return [block for block in inner if hasattr(block.__dict__.get("forward"), COMPILED_MARK)]


def _drop_stale_compiled(model: nn.Module) -> None:
    """Drop compiled block forwards traced through a class the block no longer has (after (un)patching): their
    graphs belong to the old class, and keeping them would only pile recompilations onto the model's cache."""
    for block in compiled_blocks(model):
        if getattr(block.__dict__["forward"], COMPILED_MARK) is not type(block):
            del block.__dict__["forward"]
