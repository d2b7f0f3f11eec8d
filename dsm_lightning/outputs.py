"""What a model returned, as tensors: logits from any output type (tensor, tuple, dict, ``transformers`` output),
batches of images from any dataloader, and per-image fidelity measures against the dense model."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import torch
from torch import nn

from .errors import InputError

__all__ = ["collect_batches", "logits_of", "model_outputs", "output_tensor", "token_cosine", "top1_agreement"]


def collect_batches(dataloader: Iterable, max_images: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``max_images`` images (and labels, None when absent or negative) of a dataloader yielding images,
    ``(images, labels)`` or dicts with ``image`` / ``target``."""
    xs, ys = [], []
    seen = 0
    for batch in dataloader:
        if isinstance(batch, dict):
            x, y = batch["image"], batch.get("target")
        elif isinstance(batch, (tuple, list)):
            x, y = batch[0], batch[1] if len(batch) > 1 else None
        else:
            x, y = batch, None
        xs.append(x)
        if y is not None and torch.is_tensor(y):
            ys.append(y)
        seen += x.shape[0]
        if seen >= max_images:
            break
    if not xs:
        raise ValueError("calibrate got an empty dataloader")
    images = torch.cat(xs)[:max_images]
    labels = torch.cat(ys)[:max_images] if len(ys) == len(xs) else None
    if labels is not None and (labels < 0).any():
        labels = None
    return images, labels


def _field(output: Any, name: str) -> Any:
    """``output[name]`` of a dict or ``output.name`` of a (Hugging Face) output object; None when absent."""
    return output.get(name) if isinstance(output, dict) else getattr(output, name, None)


def logits_of(output: Any) -> Optional[torch.Tensor]:
    """The logits in a model's output: the output itself if it is a tensor, else its ``logits`` (a Hugging Face
    ``ImageClassifierOutput`` or a dict); None when there are none."""
    if isinstance(output, torch.Tensor):
        return output
    logits = _field(output, "logits")
    return logits if isinstance(logits, torch.Tensor) else None


def output_tensor(output: Any) -> Optional[torch.Tensor]:
    """What the quality guard compares: :func:`logits_of` the output, else a Hugging Face backbone's
    ``feature_maps`` (as tokens) or an encoder's ``last_hidden_state``; None when there is none of these."""
    logits = logits_of(output)
    if logits is not None:
        return logits
    maps = _field(output, "feature_maps")
    if maps:  # an HF backbone's NCHW feature maps, as tokens [B, sum(H * W), C]
        return torch.cat([m.flatten(2).transpose(1, 2) if m.ndim == 4 else m for m in maps], dim=1)
    hidden = _field(output, "last_hidden_state")
    return hidden if isinstance(hidden, torch.Tensor) else None


@torch.no_grad()
def model_outputs(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Outputs of ``model`` on ``images`` in batches, as one float32 CPU tensor (see :func:`output_tensor`)."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        logits = output_tensor(model(images[i : i + batch_size].to(device)))
        if logits is None:
            raise InputError(
                f"{type(model).__name__} returns no tensor, .logits or .last_hidden_state; calibration and the "
                f"quality guard compare those"
            )
        out.append(logits.float().cpu())
    return torch.cat(out)


def top1_agreement(outputs: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Per image, 1.0 where the top-1 class of ``outputs`` ``[B, classes]`` equals the dense model's."""
    return (outputs.argmax(-1) == dense.argmax(-1)).float()


def token_cosine(outputs: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Per image, the cosine similarity with the dense output along the feature (last) axis, averaged over tokens:
    ``[B, D]`` pooled features or ``[B, T, C]`` tokens (a patched backbone returns them in the dense layout)."""
    cos = torch.nn.functional.cosine_similarity(outputs.float(), dense.float(), dim=-1)
    return cos.reshape(cos.shape[0], -1).mean(dim=1)
