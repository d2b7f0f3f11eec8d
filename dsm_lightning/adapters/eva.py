"""Adapter for timm's ``Eva`` class: EVA / EVA-02, DINOv3, Perception Encoder, NAVER RoPE-ViT, timm's SBB RoPE ViTs.

What it adds over the plain timm adapter: the rotary position embedding. Every block rotates the patch tokens'
queries and keys (never the prefix tokens: class + registers) by their position, so after a merge each block gets the
rotary embedding of the *current* tokens (:meth:`~dsm_lightning.adapters.Adapter.block_inputs`), placed by one of the
rules of :mod:`~dsm_lightning.adapters.rope` (``"destination"`` by default). Every rope type timm's ``Eva`` builds is
supported: ``RotaryEmbeddingCat`` (``rope_type="cat"``, interleaved or ``rope_rotate_half``), mixed RoPE (learned
per-block, per-head frequencies), DINOv3's continuous centred coordinates and MRoPE; so are both block types (pre-
and post-norm), both attention modules (``EvaAttention``, ``AttentionRope`` with grouped-query heads), SwiGLU / GLU
MLPs, LayerScale, q/k-norm, scale-norm and gated attention. Dense blocks run timm's own forward with the rotary
embedding as timm passes it.

Average pooling (``global_pool="avg"``, Eva's default), max and attention pooling read the tokens unmerged onto the
dense grid, so the average is size-weighted.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import BlockArgs, BlockCall
from ..merge import MergeState, class_attention
from ..schedule import TokenPlan
from .base import UnsupportedModelError, check_blocks, unwrap_block
from .rope import SUPPORTED_ROPES, MergedPositions, check_rule, gather_rope, rope_at
from .timm import TimmViTAdapter, vit_forward_features, vit_forward_intermediates

__all__ = ["TimmEvaAdapter", "rope_attention_with_metric"]


def eva_types() -> Tuple[type, Tuple[type, ...], Tuple[type, ...]]:
    from timm.layers import AttentionRope
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

    return Eva, (EvaBlock, EvaBlockPostNorm), (EvaAttention, AttentionRope)


def _qkv(attn: Any, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values ``[B, heads, N, head_dim]`` as ``EvaAttention`` / ``AttentionRope`` project them."""
    batch, n, _ = x.shape
    if attn.qkv is None:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(batch, n, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(batch, n, kv_heads, -1).transpose(1, 2)
        return q, k, v
    if getattr(attn, "q_bias", None) is None:
        qkv = attn.qkv(x)
    else:  # EvaAttention: q and v biases, a zero k bias
        bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
    q, k, v = qkv.reshape(batch, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _rotate(attn: Any, t: Tensor, rope: Optional[Tensor], like: Tensor) -> Tensor:
    """timm's RoPE step: rotate the patch tokens of ``t``, leave the prefix tokens as they are."""
    if rope is None:
        return t
    from timm.layers import apply_rot_embed_cat

    npt = attn.num_prefix_tokens
    half = bool(getattr(attn, "rotate_half", False))
    return torch.cat([t[:, :, :npt], apply_rot_embed_cat(t[:, :, npt:], rope, half=half)], dim=2).type_as(like)


def rope_attention_with_metric(
    attn: Any, x: Tensor, rope: Optional[Tensor], bias: Optional[Tensor], num_prefix: Optional[int] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """``EvaAttention`` / ``AttentionRope`` forward with an additive ``bias`` that also returns the merge metric
    (the keys per head after q/k-norm and *before* the rotation, so similarity does not depend on position) and,
    with ``num_prefix`` set, the class attention (from the rotated queries and keys the model attends with)."""
    batch, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    q, k, v = _qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    metric = k
    q, k = _rotate(attn, q, rope, v), _rotate(attn, k, rope, v)
    groups = int(getattr(attn, "num_kv_groups", 1))
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    cls_attn = None if num_prefix is None else class_attention(q, k, attn.scale, bias, num_prefix)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        out = attn.attn_drop((scores if bias is None else scores + bias).softmax(dim=-1)) @ v
    out = attn.norm(out.transpose(1, 2).reshape(batch, n, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric, cls_attn


def _scaled(gamma: Optional[Tensor], y: Tensor) -> Tensor:
    return y if gamma is None else gamma * y


def _dense_rope(model: Any, grid: Tuple[int, int]) -> Optional[Tensor]:
    """The rotary table ``Eva._pos_embed`` hands its blocks for a ``grid`` (None without RoPE)."""
    rope = model.rope
    if rope is None:
        return None
    if model.dynamic_img_size or not hasattr(rope, "feat_shape"):
        return cast(Tensor, rope.get_embed(shape=list(grid)))
    return cast(Tensor, rope.get_embed())


class RopeInputs:
    """``args_for`` of one forward pass: each block's rotary embedding for the tokens it receives (recomputed only
    after a merging block, from :class:`~dsm_lightning.adapters.rope.MergedPositions`)."""

    def __init__(self, rope: Any, dense: Tensor, plan: TokenPlan, rule: str, mixed: bool) -> None:
        self.rope, self.dense, self.mixed = rope, dense, mixed
        self.positions = MergedPositions(plan, rule)
        self.emb = dense

    @property
    def rep(self) -> Optional[Tensor]:
        """Each current token's representative patch (``"destination"`` rule, after a merge)."""
        return self.positions.rep

    def __call__(self, index: int, state: MergeState) -> Tuple[Any, ...]:
        positions = self.positions
        if positions.update(index, state):
            if positions.coords is not None:
                self.emb = rope_at(self.rope, positions.coords, positions.plan.grid, self.dense.dtype)
            else:
                assert positions.rep is not None
                self.emb = gather_rope(self.dense, positions.rep)
        emb = self.emb
        if self.mixed:
            emb = emb[index] if emb.ndim == 4 else emb[:, index]
        return (emb,)


class TimmEvaAdapter(TimmViTAdapter):
    """timm ``Eva`` (EVA-02, DINOv3, Perception Encoder, RoPE-ViT, SBB RoPE ViTs), every rope type timm ships.

    Args:
        rope_position: Where a merged token sits for its rotary embedding: ``"destination"`` (default: measured
            closer to the dense model in 14 of 15 settings, benchmarks/results/rope_positions.md) or ``"centroid"``
            (see :mod:`~dsm_lightning.adapters.rope`). Register an instance with another rule to change it:
            ``register_adapter(TimmEvaAdapter("centroid"))``.
    """

    name = "timm-eva"
    supports = "timm.models.eva.Eva (EvaBlock / EvaBlockPostNorm, EvaAttention / AttentionRope, any timm RoPE)"

    def __init__(self, rope_position: str = "destination") -> None:
        self.rope_position = check_rule(rope_position)

    def matches(self, model: nn.Module) -> bool:
        try:
            eva_cls, _, _ = eva_types()
        except ImportError:
            return False
        return isinstance(model, eva_cls)

    def check(self, model: nn.Module) -> None:
        _, block_types, attn_types = eva_types()
        eva: Any = model
        check_blocks(eva.blocks, "Eva", dict.fromkeys(block_types, attn_types))
        rope = eva.rope
        if rope is not None and type(rope).__name__ not in SUPPORTED_ROPES:
            raise UnsupportedModelError(
                f"{type(rope).__qualname__} is a rotary embedding DSM cannot place merged tokens in; supported: "
                f"{', '.join(SUPPORTED_ROPES)} (timm rope_type 'cat', 'dinov3', 'mixed', 'mrope')"
            )

    def dims(self, model: nn.Module) -> Tuple[int, int]:
        eva: Any = model
        mlp = cast(Any, unwrap_block(eva.blocks[0])).mlp
        fc1 = getattr(mlp, "fc1", None) or getattr(mlp, "fc1_x", None)
        hidden = int(fc1.out_features) if isinstance(fc1, nn.Linear) else 4 * int(eva.embed_dim)
        return int(eva.embed_dim), hidden

    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        eva: Any = model
        x: Tensor = eva.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size: NHWC
            grid = (int(x.shape[1]), int(x.shape[2]))
        else:
            rows, cols = eva.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
            grid = (int(rows), int(cols))
        x, _ = eva._pos_embed(x)  # the rotary table comes per block from block_inputs
        return eva.norm_pre(x), grid

    def block_inputs(self, model: nn.Module, plan: TokenPlan) -> Optional[BlockArgs]:
        eva: Any = model
        dense = _dense_rope(eva, plan.grid)
        if dense is None:
            return None
        return RopeInputs(eva.rope, dense, plan, self.rope_position, bool(getattr(eva, "rope_mixed", False)))

    def attend_rope(
        self, block: nn.Module, x: Tensor, rope: Optional[Tensor], bias: Optional[Tensor], prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The attention half of an Eva block (pre- or post-norm) with its residual, rotary embedding ``rope``."""
        blk: Any = block
        post_norm = not hasattr(blk, "gamma_1")
        y, metric, cls_attn = rope_attention_with_metric(blk.attn, x if post_norm else blk.norm1(x), rope, bias, prefix)
        y = blk.norm1(y) if post_norm else _scaled(blk.gamma_1, y)
        return x + blk.drop_path1(y), metric, cls_attn

    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.attend_rope(block, x, None, bias, class_attention_prefix)

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        blk: Any = block
        if not hasattr(blk, "gamma_1"):  # post-norm
            return cast(Tensor, x + blk.drop_path2(blk.norm2(blk.mlp(x))))
        return cast(Tensor, x + blk.drop_path2(_scaled(blk.gamma_2, blk.mlp(blk.norm2(x)))))

    def run_block(self, block: nn.Module, x: Tensor, call: BlockCall) -> Tensor:
        rope = call.args[0] if call.args else None
        x, metric, cls_attn = self.attend_rope(block, x, rope, call.bias, call.class_attention_prefix)
        if call.merges:
            x = call.merge(x, metric, cls_attn)
        return self.feed_forward(block, x)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return cast(Sequence[nn.Module], cast(Any, model).blocks)

    def overrides(self) -> Dict[str, Callable[..., Any]]:
        return {"forward_features": vit_forward_features, "forward_intermediates": vit_forward_intermediates}
