"""Adapter for ``timm.models.vision_transformer.VisionTransformer`` and its subclasses (DeiT distilled, ...).

Kept from timm's own block: LayerScale (``ls1``/``ls2``), drop-path, q/k-norm, scale-norm and gated attention, the
fused SDPA path (the log-size bias goes in as ``attn_mask``) and timm's non-fused path when fused attention is off.
Dense blocks, and merging blocks' MLPs, call timm's modules unchanged.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union, cast

import torch.nn.functional as F
from torch import Tensor, nn

from ..merge import MergeState, class_attention, unmerge
from .base import Adapter, check_blocks, patched_adapter, unwrap_block

__all__ = ["TimmViTAdapter", "attention_with_metric"]

# timm's modules are reached by attribute (``blocks``, ``patch_embed``, ``ls1`` ...), which ``nn.Module.__getattr__``
# types as ``Tensor | Module``; the family code below therefore reads them through ``Any``.


def timm_types() -> Tuple[type, type, type]:
    from timm.models.vision_transformer import Block, VisionTransformer

    try:
        from timm.layers import Attention
    except ImportError:  # timm < 1.0 kept Attention in vision_transformer
        from timm.models.vision_transformer import Attention
    return VisionTransformer, Block, Attention


def attention_with_metric(
    attn: Any, x: Tensor, bias: Optional[Tensor], num_prefix: Optional[int] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """timm ``Attention`` forward that also returns the merge metric (the keys per head, ``[B, heads, N, head_dim]``).

    Same ops as ``Attention.forward`` (q/k-norm, fused SDPA with ``attn_mask=bias``, scale-norm, gate, projection);
    a test checks it against timm's own forward. With ``num_prefix`` set it also returns the class attention
    ``[B, N]`` (:func:`~dsm_lightning.merge.class_attention`), else None.
    """
    batch, n, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
    qkv = attn.qkv(x).reshape(batch, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    cls_attn = None if num_prefix is None else class_attention(q, k, attn.scale, bias, num_prefix)
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, dropout_p=attn.attn_drop.p if attn.training else 0.0
        )
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        out = attn.attn_drop(scores.softmax(dim=-1)) @ v
    out = out.transpose(1, 2).reshape(batch, n, attn_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k, cls_attn  # per-head keys: averaged over heads only when metric='keys' uses them


def vit_forward_features(self: Any, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """DSM version of ``VisionTransformer.forward_features``: tokens come back in the dense layout."""
    if attn_mask is not None or is_causal:
        raise ValueError("a DSM-patched model takes no attn_mask/is_causal; call remove_dsm(model) to use them")
    adapter: Adapter = patched_adapter(self)
    tokens, grid = adapter.embed(self, x)
    tokens, state = adapter.run(self, tokens, grid)
    return unmerge(self.norm(tokens), state, self.num_prefix_tokens)


def vit_forward_intermediates(
    self: Any,
    x: Tensor,
    indices: Optional[Union[int, List[int]]] = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
    attn_mask: Optional[Tensor] = None,
    is_causal: bool = False,
) -> Any:
    """DSM version of timm's ``forward_intermediates`` (same arguments and outputs): every intermediate, and the
    final features, come back unmerged onto the dense patch grid, so dense-prediction necks and heads get the shapes
    they expect. Intermediates of dense (delayed) blocks equal the dense model's. ``stop_early`` is accepted; all
    blocks run (the merge plan covers the whole depth)."""
    from timm.models._features import feature_take_indices

    if output_fmt not in ("NCHW", "NLC"):
        raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    if attn_mask is not None or is_causal:
        raise ValueError("a DSM-patched model takes no attn_mask/is_causal; call remove_dsm(model) to use them")
    take_indices, _ = feature_take_indices(len(self.blocks), indices)
    adapter: Adapter = patched_adapter(self)
    prefix = self.num_prefix_tokens
    taken: Dict[int, Tensor] = {}

    def keep(index: int, tokens: Tensor, state: MergeState) -> None:
        if index in take_indices:  # the norm is per token, so norm-then-unmerge equals unmerge-then-norm
            taken[index] = unmerge(self.norm(tokens) if norm else tokens, state, prefix)

    batch = x.shape[0]
    tokens, grid = adapter.embed(self, x)
    tokens, state = adapter.run(self, tokens, grid, keep)
    intermediates = [taken[i] for i in take_indices]
    prefix_tokens = [y[:, :prefix] for y in intermediates] if prefix else None
    if prefix:
        intermediates = [y[:, prefix:] for y in intermediates]
    if output_fmt == "NCHW":
        intermediates = [y.reshape(batch, grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
    final = unmerge(self.norm(tokens), state, prefix)
    if output_dict:
        result: Dict[str, Any] = {"image_intermediates": intermediates}
        if prefix_tokens is not None and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefix_tokens
        if not intermediates_only:
            result["image_features"] = final
        return result
    out: List[Any] = list(intermediates)
    if return_prefix_tokens and prefix_tokens is not None:
        out = list(zip(intermediates, prefix_tokens))
    if intermediates_only:
        return out
    return final, out


class TimmViTAdapter(Adapter):
    """timm ``VisionTransformer`` (ViT, DeiT incl. distilled, AugReg, MAE, CLIP, DINOv2 incl. registers)."""

    name = "timm"
    supports = "timm.models.vision_transformer.VisionTransformer and subclasses with timm Block + Attention"
    model_type = "timm.models.vision_transformer.VisionTransformer"
    blocks_at, prefix_tokens = "blocks", "num_prefix_tokens"

    def check(self, model: nn.Module) -> None:
        _, block_cls, attn_cls = timm_types()
        check_blocks(cast(Any, model).blocks, "timm", {block_cls: (attn_cls,)})

    def grid(self, model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        pe: Any = cast(Any, model).patch_embed
        rows, cols = pe.grid_size if img_size is None else pe.dynamic_feat_size(tuple(img_size))
        return int(rows), int(cols)

    def dims(self, model: nn.Module) -> Tuple[int, int]:
        vit: Any = model
        dim = int(vit.embed_dim)
        fc1 = getattr(cast(Any, unwrap_block(vit.blocks[0])).mlp, "fc1", None)
        hidden = int(fc1.out_features) if isinstance(fc1, nn.Linear) else 4 * dim
        return dim, hidden

    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        vit: Any = model
        x: Tensor = vit.patch_embed(images)
        if x.ndim == 4:  # dynamic_img_size: NHWC
            grid = (int(x.shape[1]), int(x.shape[2]))
        else:
            rows, cols = vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
            grid = (int(rows), int(cols))
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
        return x, grid

    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        blk: Any = block
        y, metric, cls_attn = attention_with_metric(blk.attn, blk.norm1(x), bias, class_attention_prefix)
        return x + blk.drop_path1(blk.ls1(y)), metric, cls_attn

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        blk: Any = block
        out: Tensor = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return out

    def overrides(self) -> Dict[str, Callable[..., Any]]:
        return {"forward_features": vit_forward_features, "forward_intermediates": vit_forward_intermediates}
