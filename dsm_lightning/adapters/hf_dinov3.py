"""Adapter for Hugging Face ``transformers`` DINOv3 ViTs: ``DINOv3ViTModel`` and ``DINOv3ViTBackbone``.

DINOv3 rotates the patch tokens' queries and keys (never the class + register prefix tokens) by a rotary embedding
of continuous patch-centre coordinates in ``[-1, 1]``. After a merge every layer gets the ``(cos, sin)`` of the
*current* tokens (:meth:`~dsm_lightning.adapters.Adapter.block_inputs`), placed by one of the rules of
:mod:`~dsm_lightning.adapters.rope`: ``"destination"`` (default) gathers HF's own table at each token's
representative patch, ``"centroid"`` recomputes HF's angles at the size-weighted centroid of its patches. Dense layers
run HF's own forward with the table HF builds. Merging layers compute the same attention from the layer's
``q_proj``/``k_proj``/``v_proj`` through HF's attention function for the model's ``attn_implementation``
(``"sdpa"`` or ``"eager"``), with LayerScale, drop-path and the plain or gated MLP kept.

The patched ``forward`` unmerges the tokens to the dense layout before the final norm, so ``last_hidden_state``,
``pooler_output`` (the class token), ``hidden_states`` and the backbone's feature maps keep their shapes and meaning.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
from torch import Tensor, nn

from ..engine import BlockArgs, BlockCall
from ..merge import MergeState, unmerge
from ..schedule import TokenPlan
from .base import Adapter, UnsupportedModelError, original_class, patched_adapter, unwrap_block
from .hf import ATTENTION_IMPLEMENTATIONS, hf_attention_with_metric
from .rope import MergedPositions, check_rule

__all__ = ["HuggingFaceDinov3Adapter", "dinov3_rope_at"]

_MODULE = "transformers.models.dinov3_vit.modeling_dinov3_vit"
_CLASSES = ("DINOv3ViTModel", "DINOv3ViTBackbone")
_LAYER = "DINOv3ViTLayer"

Rope = Tuple[Tensor, Tensor]


def _hf_class(model: nn.Module) -> Optional[str]:
    """The supported DINOv3 class ``model`` is (patched or not), found by module and name along the MRO, so
    ``transformers`` is never imported for another model."""
    for cls in type(model).__mro__:
        if cls.__module__ == _MODULE and cls.__name__ in _CLASSES:
            return cls.__name__
    return None


def _pair(value: Any) -> Tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (tuple, list)) else (int(value), int(value))


def dinov3_rope_at(rope: Any, coords: Tensor, grid: Tuple[int, int], dtype: torch.dtype) -> Rope:
    """``(cos, sin)`` ``[B, 1, N, head_dim]`` that HF's ``DINOv3ViTRopePositionEmbedding`` gives tokens at continuous
    patch coordinates ``coords`` ``[B, N, 2]`` (row, col) on a ``grid``: HF's patch-centre mapping
    ``2 (t + 0.5) / n - 1`` (affine, so a centroid maps to the centroid of the centres), then HF's angles. At integer
    coordinates it equals HF's own table (tested)."""
    rows, cols = grid
    centre = torch.stack([(coords[..., 0] + 0.5) / rows, (coords[..., 1] + 0.5) / cols], dim=-1)
    centre = 2.0 * centre - 1.0
    angles = 2 * math.pi * centre.unsqueeze(-1) * rope.inv_freq  # [B, N, 2, head_dim / 4]
    angles = angles.flatten(-2).tile(2)
    return angles.cos().to(dtype).unsqueeze(1), angles.sin().to(dtype).unsqueeze(1)


class _RopeInputs:
    """``args_for`` of one forward pass: each layer's ``(attention_mask, (cos, sin))`` for the tokens it receives."""

    def __init__(self, rope: Any, dense: Rope, plan: TokenPlan, rule: str) -> None:
        self.rope, self.dense = rope, dense
        self.positions = MergedPositions(plan, rule)
        self.emb = dense

    def __call__(self, index: int, state: MergeState) -> Tuple[Any, ...]:
        positions = self.positions
        if positions.update(index, state):
            if positions.coords is not None:
                self.emb = dinov3_rope_at(self.rope, positions.coords, positions.plan.grid, self.dense[0].dtype)
            else:
                assert positions.rep is not None
                self.emb = (self.dense[0][positions.rep].unsqueeze(1), self.dense[1][positions.rep].unsqueeze(1))
        return (None, self.emb)


def _refuse_unsupported(self: Any, kwargs: Dict[str, Any]) -> bool:
    """Raise for what a merged forward cannot give; return whether every layer's hidden state is wanted."""
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        raise ValueError(
            "output_attentions=True is not available while DSM is applied (attention between merged tokens has no "
            "dense meaning); call remove_dsm(model), or pass output_attentions=False"
        )
    want = kwargs.get("output_hidden_states")
    return bool(getattr(self.config, "output_hidden_states", False)) if want is None else bool(want)


def _run(self: Any, pixel_values: Tensor, bool_masked_pos: Optional[Tensor], keep_all: bool) -> Tuple[Any, ...]:
    """Embed, run the layers with merging; returns (last tokens dense, every state dense or None, grid, prefix)."""
    adapter: HuggingFaceDinov3Adapter = patched_adapter(self)
    pixel_values = pixel_values.to(self.embeddings.patch_embeddings.weight.dtype)
    tokens = self.embeddings(pixel_values, bool_masked_pos=bool_masked_pos)
    grid = adapter.grid(self, (int(pixel_values.shape[-2]), int(pixel_values.shape[-1])))
    prefix = adapter.num_prefix_tokens(self)
    states: List[Tensor] = [tokens]

    def keep(index: int, x: Tensor, state: MergeState) -> None:
        states.append(unmerge(x, state, prefix))

    tokens, state = adapter.run(self, tokens, grid, keep if keep_all else None)
    return unmerge(tokens, state, prefix), (tuple(states) if keep_all else None), grid, prefix


def _forward(self: Any, pixel_values: Tensor, bool_masked_pos: Optional[Tensor] = None, **kwargs: Any) -> Any:
    """DSM version of ``DINOv3ViTModel.forward`` (and of the backbone's): same arguments and outputs, tokens back in
    the dense layout (``output_hidden_states=True``: the embeddings, then every layer's output unmerged)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if _hf_class(self) == "DINOv3ViTBackbone":
        if bool_masked_pos is not None:
            raise TypeError("DINOv3ViTBackbone.forward() takes no bool_masked_pos")
        return _backbone_forward(self, pixel_values, **kwargs)
    want_hidden = _refuse_unsupported(self, kwargs)
    dense, hidden, _, _ = _run(self, pixel_values, bool_masked_pos, want_hidden)
    seq = self.norm(dense)
    out = BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=seq[:, 0, :], hidden_states=hidden)
    return out if kwargs.get("return_dict", True) is not False else out.to_tuple()


def _backbone_forward(self: Any, pixel_values: Tensor, **kwargs: Any) -> Any:
    """DSM version of ``DINOv3ViTBackbone.forward``: the ``out_features`` stages read from every layer's output
    unmerged onto the dense grid, normed and reshaped as HF's own forward does."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTBackboneOutput

    want_hidden = _refuse_unsupported(self, kwargs)
    _, states, grid, prefix = _run(self, pixel_values, None, True)
    config = self.config
    maps: List[Tensor] = []
    cls_tokens: List[Tensor] = []
    last = len(self.stage_names) - 1
    sequence = None
    for idx, (stage, state) in enumerate(zip(self.stage_names, states)):
        if idx == last:
            state = sequence = self.norm(state)
        elif config.apply_layernorm:
            state = self.norm(state)
        if stage not in self.out_features:
            continue
        cls_tokens.append(state[:, 0, :])
        patches = state[:, prefix:, :]
        if config.reshape_hidden_states:
            patches = patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        maps.append(patches)
    with_cls = bool(getattr(config, "return_class_token", False))
    fields: Dict[str, Any] = dict(feature_maps=tuple(maps), hidden_states=states if want_hidden else None)
    fields["cls_tokens"] = tuple(cls_tokens) if with_cls else None
    out = DINOv3ViTBackboneOutput(**fields)
    out.last_hidden_state = sequence
    return out if kwargs.get("return_dict", True) is not False else out.to_tuple()


class HuggingFaceDinov3Adapter(Adapter):
    """Hugging Face ``transformers`` ``DINOv3ViTModel`` and ``DINOv3ViTBackbone`` (RoPE, registers, LayerScale,
    plain or gated MLP; ``attn_implementation`` ``"sdpa"`` or ``"eager"``).

    Args:
        rope_position: Where a merged token sits for its rotary embedding, ``"destination"`` (default) or
            ``"centroid"`` (:mod:`~dsm_lightning.adapters.rope`); ``register_adapter(HuggingFaceDinov3Adapter(
            "centroid"))`` changes it.
    """

    name = "transformers-dinov3"
    supports = "transformers " + ", ".join(_CLASSES) + " (transformers>=5.18,<6)"

    def __init__(self, rope_position: str = "destination") -> None:
        self.rope_position = check_rule(rope_position)

    def matches(self, model: nn.Module) -> bool:
        return _hf_class(model) is not None

    def check(self, model: nn.Module) -> None:
        for i, module in enumerate(self.blocks(model)):
            cls = original_class(module)
            if cls.__name__ != _LAYER or cls.__module__ != _MODULE:
                raise UnsupportedModelError(
                    f"layer {i} is {cls.__module__}.{cls.__qualname__}; DSM's DINOv3 adapter supports "
                    f"{_MODULE}.{_LAYER}. Register an adapter for this layer type (docs, 'Custom ViTs')"
                )
            impl = cast(Any, unwrap_block(module)).attention.config._attn_implementation
            if impl not in ATTENTION_IMPLEMENTATIONS:
                raise UnsupportedModelError(
                    f"DINOv3 runs attn_implementation={impl!r}; merging needs an additive attention mask: load the "
                    f"model with attn_implementation='sdpa' (fused) or 'eager'"
                )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return cast(Sequence[nn.Module], cast(Any, model).model.layer)

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 1 + int(cast(Any, model).config.num_register_tokens)

    def grid(self, model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        config: Any = cast(Any, model).config
        ph, pw = _pair(config.patch_size)
        height, width = _pair(config.image_size) if img_size is None else img_size
        return int(height) // ph, int(width) // pw

    def dims(self, model: nn.Module) -> Tuple[int, int]:
        config: Any = cast(Any, model).config
        return int(config.hidden_size), int(config.intermediate_size)

    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        hf: Any = model
        tokens: Tensor = hf.embeddings(images.to(hf.embeddings.patch_embeddings.weight.dtype))
        return tokens, self.grid(model, (int(images.shape[-2]), int(images.shape[-1])))

    def dense_rope(self, model: nn.Module, grid: Tuple[int, int]) -> Rope:
        """HF's own ``(cos, sin)`` ``[N0, head_dim]`` for a ``grid`` (its rope module reads only the input's shape,
        device and dtype)."""
        hf: Any = model
        ph, pw = _pair(hf.config.patch_size)
        weight = hf.embeddings.patch_embeddings.weight
        shape = (1, 0, grid[0] * ph, grid[1] * pw)
        return cast(Rope, hf.rope_embeddings(torch.empty(shape, dtype=weight.dtype, device=weight.device)))

    def block_inputs(self, model: nn.Module, plan: TokenPlan) -> Optional[BlockArgs]:
        return _RopeInputs(
            cast(Any, model).rope_embeddings, self.dense_rope(model, plan.grid), plan, self.rope_position
        )

    def attend_rope(
        self, block: nn.Module, x: Tensor, rope: Optional[Rope], bias: Optional[Tensor], prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The attention half of a DINOv3 layer with its residual, rotary embedding ``rope``."""
        layer: Any = block
        y, metric, cls_attn = hf_attention_with_metric(layer.attention, layer.norm1(x), bias, prefix, rope)
        return x + layer.drop_path(layer.layer_scale1(y)), metric, cls_attn

    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.attend_rope(block, x, None, bias, class_attention_prefix)

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        layer: Any = block
        return cast(Tensor, x + layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))))

    def run_block(self, block: nn.Module, x: Tensor, call: BlockCall) -> Tensor:
        rope = call.args[1] if len(call.args) > 1 else None
        x, metric, cls_attn = self.attend_rope(block, x, rope, call.bias, call.class_attention_prefix)
        if call.merges:
            x = call.merge(x, metric, cls_attn)
        return self.feed_forward(block, x)

    def overrides(self) -> Dict[str, Callable[..., Any]]:
        return {"forward": _forward}
