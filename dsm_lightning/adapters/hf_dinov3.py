"""Adapter for Hugging Face ``transformers`` DINOv3 ViTs: ``DINOv3ViTModel`` and ``DINOv3ViTBackbone``.

DINOv3 rotates the patch tokens' queries and keys (never the class + register prefix tokens) by a rotary embedding
of continuous patch-centre coordinates in ``[-1, 1]``. After a merge every layer gets the ``(cos, sin)`` of the
*current* tokens (:meth:`~dsm_lightning.adapters.Adapter.block_inputs`), placed by one of the rules of
:mod:`~dsm_lightning.adapters.rope`: ``"destination"`` (default) gathers HF's own table at each token's
representative patch, ``"centroid"`` recomputes HF's angles at the size-weighted centroid of its patches. Dense layers
run HF's own forward with the table HF builds. Merging layers compute the same attention from the layer's
``q_proj``/``k_proj``/``v_proj`` through HF's attention function for the model's ``attn_implementation``
(``"sdpa"`` or ``"eager"``), with LayerScale, drop-path and the plain or gated MLP kept.

The family is two declarations of the transformers adapter's table (the same forward, unmerging the tokens to the
dense layout before the final norm, so ``last_hidden_state``, ``pooler_output``, ``hidden_states`` and the
backbone's feature maps keep their shapes and meaning) plus its hooks: the rotary inputs of every layer and the
backbone's output.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Tuple, cast

import torch
from torch import Tensor, nn

from ..engine import BlockArgs, BlockCall
from ..merge import MergeState
from ..schedule import TokenPlan
from .hf import Family, HuggingFaceViTAdapter, Layer
from .rope import MergedPositions, check_rule

__all__ = ["HuggingFaceDinov3Adapter", "dinov3_rope_at"]

_MODULE = "transformers.models.dinov3_vit.modeling_dinov3_vit"
_LAYOUT = Layer("attention", ("norm1", "norm2"), ("layer_scale1", "layer_scale2"), "drop_path")
_COMMON: Any = dict(registers=True, cast_pixels=True, pixels="embeddings.patch_embeddings.weight", interpolate=False,
                    mlp_in="up_proj")  # fmt: skip
_FAMILIES = (
    Family("DINOv3ViTModel", _MODULE, "DINOv3ViTLayer", _LAYOUT, "model.layer", masked_pos=True, final_norm="norm",
            pool="class", **_COMMON),
    Family("DINOv3ViTBackbone", _MODULE, "DINOv3ViTLayer", _LAYOUT, "model.layer", backbone=True, **_COMMON),
)  # fmt: skip

Rope = Tuple[Tensor, Tensor]


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


class HuggingFaceDinov3Adapter(HuggingFaceViTAdapter):
    """Hugging Face ``transformers`` ``DINOv3ViTModel`` and ``DINOv3ViTBackbone`` (RoPE, registers, LayerScale,
    plain or gated MLP; ``attn_implementation`` ``"sdpa"`` or ``"eager"``).

    Args:
        rope_position: Where a merged token sits for its rotary embedding, ``"destination"`` (default) or
            ``"centroid"`` (:mod:`~dsm_lightning.adapters.rope`); ``register_adapter(HuggingFaceDinov3Adapter(
            "centroid"))`` changes it.
    """

    name = "transformers-dinov3"
    supports = "transformers " + ", ".join(f.encoder for f in _FAMILIES) + " (transformers>=5.18,<6)"
    families = _FAMILIES

    def __init__(self, rope_position: str = "destination") -> None:
        self.rope_position = check_rule(rope_position)

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

    def run_block(self, block: nn.Module, x: Tensor, call: BlockCall) -> Tensor:
        rope = call.args[1] if len(call.args) > 1 else None
        x, metric, cls_attn = self.attend_rope(block, x, rope, call.bias, call.class_attention_prefix)
        if call.merges:
            x = call.merge(x, metric, cls_attn)
        return self.feed_forward(block, x)

    def backbone_output(
        self, backbone: nn.Module, states: List[Tensor], grid: Tuple[int, int], hidden: Optional[Tuple[Tensor, ...]]
    ) -> Any:
        """``DINOv3ViTBackbone``'s output: the ``out_features`` stages of the dense-layout states, normed (the last
        always) and reshaped as HF's own forward does, with the class tokens when the config asks for them."""
        from transformers.models.dinov3_vit.modeling_dinov3_vit import DINOv3ViTBackboneOutput

        hf: Any = backbone
        config, prefix = hf.config, self.num_prefix_tokens(backbone)
        maps: List[Tensor] = []
        cls_tokens: List[Tensor] = []
        for idx, (stage, state) in enumerate(zip(hf.stage_names, states)):
            if idx == len(hf.stage_names) - 1 or config.apply_layernorm:
                state = hf.norm(state)
            if stage not in hf.out_features:
                continue
            cls_tokens.append(state[:, 0, :])
            patches = state[:, prefix:, :]
            if config.reshape_hidden_states:
                patches = patches.reshape(patches.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            maps.append(patches)
        fields: Any = dict(feature_maps=tuple(maps), hidden_states=hidden)
        fields["cls_tokens"] = tuple(cls_tokens) if getattr(config, "return_class_token", False) else None
        return DINOv3ViTBackboneOutput(**fields)
