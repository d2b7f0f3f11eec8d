"""Shared fixtures: tiny random-init ViTs (fast on CPU)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# merged forwards drop to one thread on a busy CPU (engine.busy_threads); tests compare outputs bit for bit across
# calls, so they keep torch's threads whatever else runs on the machine (tests/test_engine.py checks the policy)
os.environ.setdefault("DSM_CPU_THREADS", "off")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=7)


def tiny_vit(**kwargs):
    """A tiny timm VisionTransformer (8x8 patch grid, 6 blocks), eval mode, seeded."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(kwargs.pop("seed", 0))
    cfg = {**TINY, **kwargs}
    model = VisionTransformer(**cfg).eval()
    _randomise(model)
    return model


def tiny_distilled(**kwargs):
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    model = VisionTransformerDistilled(**{**TINY, **kwargs}).eval()
    _randomise(model)
    return model


def tiny_torchvision(**kwargs):
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    cfg = dict(image_size=32, patch_size=4, num_layers=6, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=7)
    model = VisionTransformer(**{**cfg, **kwargs}).eval()
    _randomise(model)
    return model


#: Tiny ``transformers`` models per supported class: 32x32 images, 4x4 patches (8x8 grid), 6 layers.
HF_CLASSES = {
    "ViTModel": "ViTConfig",
    "ViTForImageClassification": "ViTConfig",
    "DeiTModel": "DeiTConfig",
    "DeiTForImageClassification": "DeiTConfig",
    "DeiTForImageClassificationWithTeacher": "DeiTConfig",
    "Dinov2Model": "Dinov2Config",
    "Dinov2ForImageClassification": "Dinov2Config",
    "Dinov2WithRegistersModel": "Dinov2WithRegistersConfig",
    "Dinov2WithRegistersForImageClassification": "Dinov2WithRegistersConfig",
    "CLIPVisionModel": "CLIPVisionConfig",
    "CLIPVisionModelWithProjection": "CLIPVisionConfig",
    "SiglipVisionModel": "SiglipVisionConfig",
}


def tiny_hf(name="ViTForImageClassification", attn="sdpa", **kwargs):
    """A tiny random-init ``transformers`` vision model of class ``name`` (see :data:`HF_CLASSES`), eval mode."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(kwargs.pop("seed", 0))
    config_cls = getattr(transformers, HF_CLASSES[name])
    cfg = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, image_size=32, patch_size=4, num_labels=7)
    if "Dinov2" in name:
        cfg.update(mlp_ratio=2, layerscale_value=0.5)
        if "Registers" in name:
            cfg.update(num_register_tokens=3)
    else:
        cfg.update(intermediate_size=64)
    if "CLIP" in name:
        cfg.update(projection_dim=16)
    cfg.update(kwargs)
    config = config_cls(**cfg)
    config._attn_implementation = attn
    model = getattr(transformers, name)(config).eval()
    _randomise(model)
    return model


def _randomise(model):
    """Random init leaves heads / LayerScale / biases at zero; give every parameter signal so outputs differ."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(("ln.weight", "ln_1.weight", "ln_2.weight")):
                continue
            if p.abs().sum() == 0 or name.endswith("gamma"):
                p.normal_(0, 0.2)


VARIANTS = {
    "cls": lambda: tiny_vit(),
    "avgpool_no_cls": lambda: tiny_vit(class_token=False, global_pool="avg"),
    "distilled": lambda: tiny_distilled(),
    "registers": lambda: tiny_vit(reg_tokens=3, no_embed_class=True),
    "layerscale": lambda: tiny_vit(init_values=0.5),
    "qk_norm": lambda: tiny_vit(qk_norm=True),
    "map_pool": lambda: tiny_vit(global_pool="map", class_token=False),
    "torchvision": lambda: tiny_torchvision(),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param, VARIANTS[request.param]()


def images(batch=2, size=(32, 32), seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *size, generator=g)


@pytest.fixture
def centroid_rule():
    """The RoPE adapters rotate merged tokens at their patches' centroid while the test runs (tests/rope_models.py)."""
    from tests.rope_models import centroid_rule as rule

    with rule():
        yield
