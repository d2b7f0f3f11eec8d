"""Tiny random-init RoPE families (timm ``Eva``, timm ``NaFlexVit``, Hugging Face DINOv3) shared by their tests."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

#: One tiny Eva per rope type / block variant timm's Eva builds.
EVA_VARIANTS = {
    "cat": dict(),
    "cat_rotate_half_swiglu_ls_qknorm": dict(rope_rotate_half=True, swiglu_mlp=True, init_values=0.3, qk_norm=True),
    "cat_ref_shape_offset_xy": dict(ref_feat_shape=(6, 6), rope_grid_offset=0.5, rope_grid_indexing="xy"),
    "mixed": dict(rope_type="mixed", rope_grid_indexing="xy"),
    "dinov3": dict(rope_type="dinov3", rope_rotate_half=True, class_token=True, num_reg_tokens=4, init_values=0.5),
    "mrope": dict(rope_type="mrope"),
    "post_norm_scale_mlp": dict(use_post_norm=True, scale_mlp=True, scale_attn_inner=True),
    "rope_attn_gqa": dict(attn_type="rope", qkv_fused=False, num_kv_heads=1),
    "no_cls_avg": dict(class_token=False, num_reg_tokens=1, global_pool="avg"),
    "abs_pos_only": dict(use_rot_pos_emb=False, use_abs_pos_emb=True),
}

#: Tiny NaFlexVits: plain Block with learned / factorized position embeddings, and EvaBlocks with each RoPE type.
NAFLEX_VARIANTS = {
    "learned_avg": dict(),
    "factorized_cls_token_pool": dict(pos_embed="factorized", class_token=True, global_pool="token"),
    "map_pool_layerscale": dict(global_pool="map", init_values=0.5),
    "rope_axial": dict(rope_type="axial", pos_embed="none", reg_tokens=1),
    "rope_mixed_cls_regs": dict(rope_type="mixed", pos_embed="none", class_token=True, reg_tokens=2),
    "rope_dinov3_swiglu": dict(rope_type="dinov3", rope_rotate_half=True, swiglu_mlp=True, class_token=True),
}


def _spread(model: torch.nn.Module) -> torch.nn.Module:
    """Random init leaves near-identity blocks; spread the weights so merges matter."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def tiny_eva(seed=0, img_size=16, **kwargs):
    """A random-init timm Eva: 4x4 patches of 4 px (16 px images), 4 blocks, 2 heads of 8 channels."""
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    cfg = dict(img_size=img_size, patch_size=4, embed_dim=16, depth=4, num_heads=2, num_classes=5,
               use_rot_pos_emb=True, use_abs_pos_emb=False, num_reg_tokens=2, global_pool="avg")  # fmt: skip
    return _spread(Eva(**{**cfg, **kwargs}).eval())


def tiny_naflex(seed=0, **kwargs):
    """A random-init timm NaFlexVit: 4 px patches, 32 px images (8x8 grid), 4 blocks of 32 channels."""
    from timm.models.naflexvit import NaFlexVit

    torch.manual_seed(seed)
    cfg = dict(patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=5, img_size=32,
               pos_embed_grid_size=(8, 8), global_pool="avg")  # fmt: skip
    return _spread(NaFlexVit(**{**cfg, **kwargs}).eval())


def tiny_dinov3(attn="sdpa", seed=0, backbone=False, **kwargs):
    """A random-init DINOv3 ViT: 32 px images, 4 px patches (8x8 grid), 4 register tokens, 4 layers of 32 channels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=32,
               patch_size=4, num_register_tokens=4, layerscale_value=0.5, key_bias=True)  # fmt: skip
    config = transformers.DINOv3ViTConfig(**{**cfg, **kwargs})
    config._attn_implementation = attn
    cls = transformers.DINOv3ViTBackbone if backbone else transformers.DINOv3ViTModel
    return _spread(cls(config).eval())


@contextlib.contextmanager
def centroid_rule() -> Iterator[None]:
    """While inside, the three RoPE adapters rotate each merged token at the centroid of its patches (the built-in
    ones use the destination's position); each adapter claims only its own family."""
    from dsm_lightning.adapters import (
        HuggingFaceDinov3Adapter,
        TimmEvaAdapter,
        TimmNaFlexAdapter,
        base,
        register_adapter,
    )

    adapters = [
        register_adapter(cls("centroid")) for cls in (TimmEvaAdapter, TimmNaFlexAdapter, HuggingFaceDinov3Adapter)
    ]
    try:
        yield
    finally:
        for adapter in adapters:
            base._REGISTRY.remove(adapter)
