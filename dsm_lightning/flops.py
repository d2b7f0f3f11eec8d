"""FLOP counting with ``torch.utils.flop_counter`` (measured on the real forward, merge ops included)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

__all__ = ["count_flops", "gflops_per_image"]


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _native_mha_flop(query_shape, key_shape, value_shape, embed_dim, num_heads, *args, out_shape=None, **kwargs) -> int:
    # nn.MultiheadAttention's inference fast path (torchvision ViT): in-projection, attention, out-projection.
    batch, tokens, dim = query_shape
    head_dim = dim // num_heads
    proj = 2 * batch * tokens * dim * 3 * dim + 2 * batch * tokens * dim * dim
    return proj + sdpa_flop_count(
        (batch, num_heads, tokens, head_dim), (batch, num_heads, tokens, head_dim), (batch, num_heads, tokens, head_dim)
    )


def _custom_mapping() -> Dict[Any, Callable[..., int]]:
    # torch's counter knows the CUDA SDPA kernels; the CPU flash kernel needs the same formula.
    mapping: Dict[Any, Callable[..., int]] = {}
    op = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        mapping[op] = _cpu_sdpa_flop
    op = getattr(aten, "_native_multi_head_attention", None)
    if op is not None:
        mapping[op] = _native_mha_flop
    return mapping


def count_flops(model: Union[nn.Module, Callable[[torch.Tensor], object]], images: torch.Tensor) -> int:
    """Total FLOPs of ``model(images)`` (a module or any callable), as counted by
    :class:`torch.utils.flop_counter.FlopCounterMode`.

    Counts matmuls, convolutions and attention (CPU fused attention included); elementwise ops are not counted.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        model(images)
    return int(counter.get_total_flops())


def gflops_per_image(
    model: nn.Module, img_size: Tuple[int, int] = (224, 224), batch: int = 1, device: str = "cpu"
) -> float:
    """GFLOPs per image of ``model`` at ``img_size`` (a random input; FLOPs do not depend on pixel values)."""
    images = torch.randn(batch, 3, *img_size, device=device)
    return count_flops(model, images) / batch / 1e9
