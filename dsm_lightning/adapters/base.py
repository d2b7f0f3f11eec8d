"""The :class:`Adapter` interface and the adapter registry (the built-in adapters register in ``__init__``)."""

from __future__ import annotations

import abc
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from ..engine import BlockArgs, BlockCall, BlockHook, check_tokens, run_blocks
from ..errors import DSMUserError
from ..merge import MergeState
from ..schedule import TokenPlan, plan_tokens
from ..state import BLOCK_ORIGINAL, patch_record, patched_adapter

__all__ = [
    "Adapter",
    "register_adapter",
    "get_adapter",
    "registered_adapters",
    "UnsupportedModelError",
    "original_class",
    "unwrap_block",
    "patched_adapter",
    "check_blocks",
]


class UnsupportedModelError(DSMUserError, TypeError):
    """Raised for a model (or a block inside it) that no adapter supports."""


#: Attributes under which common wrappers keep the module they wrap: torch's activation-checkpoint wrapper, FSDP
#: (v1) units and ``torch.compile``'s ``OptimizedModule``.
WRAPPED_MODULE_ATTRS = ("_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_orig_mod")


def unwrap_block(block: nn.Module) -> nn.Module:
    """The block inside any wrappers (:data:`WRAPPED_MODULE_ATTRS`); the block itself when it is not wrapped."""
    seen = 0
    while seen < 8:
        inner = next((block._modules[a] for a in WRAPPED_MODULE_ATTRS if a in block._modules), None)
        if inner is None:
            return block
        block, seen = inner, seen + 1
    return block


def original_class(block: nn.Module) -> type:
    """The class of ``block`` (unwrapped) before :func:`~dsm_lightning.apply_dsm` swapped it."""
    inner = unwrap_block(block)
    cls: type = type(inner).__dict__.get(BLOCK_ORIGINAL, type(inner))
    return cls


def check_blocks(
    blocks: Sequence[nn.Module],
    family: str,
    layouts: Mapping[type, Tuple[type, ...]],
    attention: Optional[Callable[[Any], Any]] = None,
) -> None:
    """The per-block check of :meth:`Adapter.check`: raise :class:`UnsupportedModelError` naming the first block
    whose class (before patching, unwrapped) is not a key of ``layouts``, or whose attention module
    (``attention(block)``, by default ``block.attn``) is not one of the types its class maps to.

    Args:
        blocks: The model's blocks (wrapped or not, patched or not).
        family: The adapter's family, named in the message (``"timm"``, ``"Eva"``, ...).
        layouts: Each supported block class and the attention classes it may hold (empty: not checked).
        attention: Reads a block's attention module.
    """
    read = attention if attention is not None else (lambda block: block.attn)
    for i, module in enumerate(blocks):
        cls = original_class(module)
        allowed = layouts.get(cls)
        if allowed is None:
            names = " and ".join(f"{c.__module__}.{c.__qualname__}" for c in layouts)
            raise UnsupportedModelError(
                f"block {i} is {cls.__module__}.{cls.__qualname__}; DSM's {family} adapter supports {names}. "
                f"Register an adapter for this block type (docs, 'Custom ViTs')"
            )
        attn = read(unwrap_block(module)) if allowed else None
        if allowed and type(attn) not in allowed:
            names = " and ".join(f"{c.__module__}.{c.__qualname__}" for c in allowed)
            raise UnsupportedModelError(
                f"block {i} uses attention {type(attn).__module__}.{type(attn).__qualname__}; DSM's {family} adapter "
                f"supports {names} in a {cls.__qualname__}. Register an adapter for it (docs, 'Custom ViTs')"
            )


class Adapter(abc.ABC):
    """Protocol of a model family. Subclass it, declare where the model keeps its parts, implement the five
    abstract methods (:meth:`grid`, :meth:`embed`, :meth:`attend`, :meth:`feed_forward`, :meth:`overrides`), and
    :func:`register_adapter` it.

    Four methods follow from declarations (override the method instead where a declaration cannot say it):
    :attr:`model_type` gives :meth:`matches`, :attr:`blocks_at` gives :meth:`blocks`, :attr:`prefix_tokens` gives
    :meth:`num_prefix_tokens`, :attr:`mlp_at` gives :meth:`dims`. The optional hooks (:meth:`check`, :meth:`core`,
    :meth:`block_inputs`, :meth:`run_block`, :attr:`block_args`) cover families that need more, such as RoPE.
    """

    #: Short family name, shown in errors and summaries.
    name: str = "custom"
    #: Human-readable list of the model types this adapter supports (for error messages).
    supports: str = ""
    #: Positional arguments the family's blocks take after the tokens (HF layers: their attention mask, ``None``).
    block_args: Tuple[Any, ...] = ()
    #: The model class this adapter runs: a class, a dotted name ``"package.module.Class"`` (compared along the
    #: model's class hierarchy, so the package is never imported to answer), or a tuple of them.
    model_type: Any = None
    #: Dotted attribute of the model's block list, e.g. ``"blocks"`` or ``"encoder.layers"``.
    blocks_at: Optional[str] = None
    #: Tokens before the patch tokens (class, distillation, registers), never merged: a number, or a dotted
    #: attribute of the model that holds it (``"num_prefix_tokens"``).
    prefix_tokens: Union[int, str, None] = None
    #: Dotted attribute, inside a block, of its MLP: its first ``nn.Linear`` gives ``(embed_dim, mlp_hidden)``.
    mlp_at: Optional[str] = None

    def matches(self, model: nn.Module) -> bool:
        """Whether this adapter handles ``model`` (by default: an instance of :attr:`model_type`)."""
        wanted = self.model_type if isinstance(self.model_type, tuple) else (self.model_type,)
        names = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
        return any(w in names if isinstance(w, str) else isinstance(model, w) for w in wanted)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        """The transformer blocks in execution order (by default: the model's :attr:`blocks_at`)."""
        return cast(Sequence[nn.Module], _attribute(model, cast(str, self.blocks_at)))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        """Tokens before the patch tokens (cls, distillation, registers) that are never merged (by default:
        :attr:`prefix_tokens`)."""
        count = self.prefix_tokens
        return int(_attribute(model, count) if isinstance(count, str) else cast(int, count))

    @abc.abstractmethod
    def grid(self, model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        """Patch grid (rows, cols) for an input of ``img_size`` pixels (the model's default size when None)."""

    def dims(self, model: nn.Module) -> Tuple[int, int]:
        """``(embed_dim, mlp_hidden_dim)``, for FLOP estimates (by default: the input and output widths of the
        first ``nn.Linear`` of the first block's :attr:`mlp_at`)."""
        mlp = _attribute(unwrap_block(self.blocks(model)[0]), cast(str, self.mlp_at))
        linear = next((m for m in mlp.modules() if isinstance(m, nn.Linear)), None)
        if linear is None:
            raise UnsupportedModelError(f"{self.name} adapter: block 0's {self.mlp_at} holds no nn.Linear")
        return int(linear.in_features), int(linear.out_features)

    @abc.abstractmethod
    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The attention half of ``block`` with its residual: returns ``(x + attn(x), metric, cls_attn)``.

        ``bias`` (``[B, 1, 1, T]`` log-sizes, or None) is added to the attention logits. ``metric`` is what ToMe's
        ``"keys"`` metric matches on: the keys per head ``[B, heads, T, head_dim]`` (averaged over heads only when that
        metric is used) or already averaged ``[B, T, D]``. When ``class_attention_prefix`` is an
        int, also return the class token's attention ``[B, T]``
        (:func:`~dsm_lightning.merge.class_attention` computes it from q and k), else None.
        """

    @abc.abstractmethod
    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        """The MLP half of ``block`` with its residual: ``x + mlp(x)``."""

    def run_block(self, block: nn.Module, x: Tensor, call: BlockCall) -> Tensor:
        """Attention, then the merge (in a merging block), then the MLP: what a patched block runs when it is called
        as ``block(x, dsm=call)``."""
        x, metric, cls_attn = self.attend(block, x, call.bias, call.class_attention_prefix)
        if call.merges:
            x = call.merge(x, metric, cls_attn)
        return self.feed_forward(block, x)

    @abc.abstractmethod
    def overrides(self) -> Dict[str, Callable[..., Any]]:
        """Methods the patched subclass overrides, e.g. ``{"forward_features": fn}``."""

    def core(self, model: nn.Module) -> nn.Module:
        """The module whose class :func:`~dsm_lightning.apply_dsm` swaps and which holds the config: ``model``
        itself, or, for a task model that holds an encoder (an HF ``...ForImageClassification``), that encoder."""
        return model

    def check(self, model: nn.Module) -> None:
        """Raise :class:`UnsupportedModelError` naming any block or attention type this adapter cannot run."""
        return None

    def block_inputs(self, model: nn.Module, plan: TokenPlan) -> Optional[BlockArgs]:
        """Hook for families whose blocks take per-token inputs that follow the merge (RoPE: the rotary embedding of
        the current tokens): a function ``(block_index, state) -> args`` giving each block's positional arguments
        after the tokens, from the :class:`~dsm_lightning.merge.MergeState` before it. None (the default): every
        block gets :attr:`block_args`. A merging block finds them in ``call.args``."""
        return None

    def depth(self, model: nn.Module) -> int:
        """Number of blocks."""
        return len(self.blocks(model))

    def plan(self, model: nn.Module, grid: Tuple[int, int]) -> TokenPlan:
        """The :class:`TokenPlan` of ``model``'s current config for a patch grid (cached per grid)."""
        record = patch_record(self.core(model))
        assert record is not None, "plan() of an unpatched model"
        config = record.config
        return plan_tokens(
            self.depth(model), (int(grid[0]), int(grid[1])), self.num_prefix_tokens(model), config, self.dims(model)
        )

    @abc.abstractmethod
    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        """Images ``[B, 3, H, W]`` to tokens ``[B, prefix + N, C]`` ready for the first block, and the patch grid."""

    def run(
        self,
        model: nn.Module,
        x: Tensor,
        grid: Tuple[int, int],
        hook: Optional[BlockHook] = None,
        plan: Optional[TokenPlan] = None,
    ) -> Tuple[Tensor, MergeState]:
        """Run the blocks of ``model`` on embedded tokens ``x`` with merging; returns merged ``(tokens, state)``.

        ``plan`` replaces the model's own plan for ``grid`` (:func:`~dsm_lightning.fit_thresholds` passes
        :meth:`TokenPlan.fitting() <dsm_lightning.TokenPlan.fitting>`). Blocks run under activation checkpointing
        when the model asks for it (timm's ``grad_checkpointing``, set by ``set_grad_checkpointing(True)``) and
        gradients are on, as the unpatched forward does."""
        plan = self.plan(model, grid) if plan is None else plan
        check_tokens(x, plan)
        if self.core(model).training and torch.is_grad_enabled() and any(b.merges for b in plan.blocks):
            warnings.warn(
                "a DSM-patched model is running merged in training mode; DSM is made for inference (DSMCallback "
                "removes its patch before fit). Call remove_dsm(model) before training, or model.eval() to evaluate",
                UserWarning,
                stacklevel=4,
            )
        checkpoint = bool(getattr(model, "grad_checkpointing", False)) and torch.is_grad_enabled()
        args_for = self.block_inputs(model, plan)
        return run_blocks(self.blocks(model), x, plan, hook, self.block_args, checkpoint, args_for)


def _attribute(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


#: Each method that follows from a declaration, and that declaration.
_DECLARED = {"matches": "model_type", "blocks": "blocks_at", "num_prefix_tokens": "prefix_tokens", "dims": "mlp_at"}

_REGISTRY: List[Adapter] = []


def register_adapter(adapter: Adapter, *, first: bool = True) -> Adapter:
    """Register an adapter instance. ``first=True`` lets it take precedence over built-in ones (for subclasses).
    An adapter that neither declares a part (:attr:`Adapter.model_type`, ...) nor overrides its method is refused
    here, naming both."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter expects an Adapter instance, got {type(adapter).__name__}")
    for method, declaration in _DECLARED.items():
        inherited = getattr(type(adapter), method) is getattr(Adapter, method)
        if inherited and getattr(adapter, declaration) is None:
            raise TypeError(
                f"{type(adapter).__name__} declares no {declaration}: set {declaration} = ... on the class, or "
                f"override {method}() (docs, 'Custom ViTs')"
            )
    if first:
        _REGISTRY.insert(0, adapter)
    else:
        _REGISTRY.append(adapter)
    return adapter


def registered_adapters() -> List[Adapter]:
    """The registered adapters, in lookup order."""
    return list(_REGISTRY)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for ``model``; raises :class:`UnsupportedModelError` listing what is supported."""
    for adapter in registered_adapters():
        if adapter.matches(model):
            return adapter
    supported = "; ".join(f"{a.name}: {a.supports}" for a in _REGISTRY)
    raise UnsupportedModelError(
        f"DSM has no adapter for {type(model).__module__}.{type(model).__qualname__}. Supported: {supported}. "
        f"For another ViT, subclass dsm_lightning.adapters.Adapter and call register_adapter() "
        f"(docs/models.md, 'Custom ViTs')."
    )
