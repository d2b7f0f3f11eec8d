"""Adapter for ``torchvision.models.VisionTransformer`` (``vit_b_16`` and friends).

torchvision's blocks use ``nn.MultiheadAttention``. Dense blocks call it unchanged (keeping its native fast path).
Merging blocks, and blocks that need the log-size bias, compute the same attention from the module's own
``in_proj``/``out_proj`` weights with ``F.scaled_dot_product_attention`` (fused, with ``attn_mask``), because
``nn.MultiheadAttention`` neither returns keys nor takes a per-key float bias without leaving its fast path.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..merge import class_attention, unmerge
from .base import Adapter, UnsupportedModelError, check_blocks, patched_adapter, unwrap_block

__all__ = ["TorchvisionViTAdapter", "mha_with_metric"]

# torchvision's modules are reached by attribute (``encoder.layers``, ``ln_1`` ...), which ``nn.Module.__getattr__``
# types as ``Tensor | Module``, and torchvision ships no type information; the family code reads them through ``Any``.


def mha_with_metric(
    mha: nn.MultiheadAttention, x: Tensor, bias: Optional[Tensor], num_prefix: Optional[int] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Self-attention of a ``batch_first`` ``nn.MultiheadAttention`` with an additive bias; also returns the metric
    (the keys per head, ``[B, heads, N, head_dim]``) and, with ``num_prefix`` set, the class attention ``[B, N]``
    (else None)."""
    batch, n, dim = x.shape
    heads = mha.num_heads
    head_dim = dim // heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).reshape(batch, n, 3, heads, head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    cls_attn = None if num_prefix is None else class_attention(q, k, head_dim**-0.5, bias, num_prefix)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=mha.dropout if mha.training else 0.0)
    out = mha.out_proj(out.transpose(1, 2).reshape(batch, n, dim))
    return out, k, cls_attn  # per-head keys: averaged over heads only when metric='keys' uses them


def _forward(self: Any, x: Tensor) -> Tensor:
    """DSM version of torchvision ``VisionTransformer.forward``."""
    adapter: Adapter = patched_adapter(self)
    tokens, grid = adapter.embed(self, x)
    tokens, state = adapter.run(self, tokens, grid)
    tokens = unmerge(self.encoder.ln(tokens), state, 1)
    out: Tensor = self.heads(tokens[:, 0])
    return out


class TorchvisionViTAdapter(Adapter):
    """torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``, ``vit_h_14``)."""

    name = "torchvision"
    supports = "torchvision.models.VisionTransformer with EncoderBlock + nn.MultiheadAttention"
    model_type = "torchvision.models.vision_transformer.VisionTransformer"
    blocks_at, prefix_tokens, mlp_at = "encoder.layers", 1, "mlp"

    def check(self, model: nn.Module) -> None:
        from torchvision.models.vision_transformer import EncoderBlock

        vit: Any = model
        check_blocks(vit.encoder.layers, "torchvision", {EncoderBlock: ()})
        for i, module in enumerate(vit.encoder.layers):
            mha = cast(Any, unwrap_block(module)).self_attention
            if not (
                isinstance(mha, nn.MultiheadAttention)
                and mha.batch_first
                and mha._qkv_same_embed_dim
                and mha.in_proj_weight is not None
                and mha.bias_k is None
                and not mha.add_zero_attn
            ):
                raise UnsupportedModelError(
                    f"encoder layer {i}: self_attention must be a batch_first nn.MultiheadAttention with a packed "
                    f"in_proj and no bias_k/add_zero_attn"
                )

    def grid(self, model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        vit: Any = model
        h, w = img_size if img_size is not None else (vit.image_size, vit.image_size)
        return int(h) // int(vit.patch_size), int(w) // int(vit.patch_size)

    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        vit: Any = model
        grid = self.grid(model, (int(images.shape[-2]), int(images.shape[-1])))
        x: Tensor = vit._process_input(images)
        x = torch.cat([vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = vit.encoder.dropout(x + vit.encoder.pos_embedding)
        return x, grid

    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        blk: Any = block
        y, metric, cls_attn = mha_with_metric(blk.self_attention, blk.ln_1(x), bias, class_attention_prefix)
        return x + blk.dropout(y), metric, cls_attn

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        blk: Any = block
        out: Tensor = x + blk.mlp(blk.ln_2(x))
        return out

    def overrides(self) -> Dict[str, Callable[..., Any]]:
        return {"forward": _forward}
