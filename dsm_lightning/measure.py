"""What DSMCallback measures in a stage: merged and dense images/s, GFLOPs per image, top-1 agreement.

Kept apart from patching so each reads on its own: the callback's forward hooks hand every merged forward to a
:class:`StageMeter`, which times it, counts FLOPs once per input shape, and (with ``compare_dense``) runs the dense
model on the same batch right after it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .adaptive import BlockTokens
from .outputs import logits_of
from .patch import unpatched
from .regional import eager_blocks

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["StageMeter", "Throughput", "images_of", "num_classes_of", "sync"]


def sync(tensor: torch.Tensor) -> None:
    """Wait for the device that holds ``tensor`` (CUDA only), so wall-clock timing covers the work."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)


def num_classes_of(model: nn.Module) -> Optional[int]:
    """Outputs of the classifier head of a timm / torchvision / Hugging Face ViT, or None for a backbone without one."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and not isinstance(n, bool) and n > 0:
        return n
    head = (
        getattr(model, "head", None)
        or getattr(getattr(model, "heads", None), "head", None)
        or getattr(model, "classifier", None)  # transformers' ...ForImageClassification
    )
    return head.out_features if isinstance(head, nn.Linear) else None


def images_of(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[torch.Tensor]:
    """The image batch of a model call: the first positional argument, or ``pixel_values=`` (Hugging Face style)."""
    images = args[0] if args else kwargs.get("pixel_values", kwargs.get("x"))
    return images if isinstance(images, torch.Tensor) else None


class Throughput:
    """Forward-time accounting of one model variant (seconds and images); the first ``warmup`` calls are not timed
    (allocator, kernel selection and lazy initialisation make a cold first batch several times slower)."""

    def __init__(self, warmup: int = 1) -> None:
        self.seconds = 0.0
        self.images = 0
        self.warmup = warmup

    def add(self, seconds: float, images: int) -> None:
        if self.warmup > 0:
            self.warmup -= 1
            return
        self.seconds += seconds
        self.images += images

    @property
    def per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def count_flops_pair(module: nn.Module, image: torch.Tensor) -> Tuple[float, float]:
    """GFLOPs of one image through a patched ``module``, merged and dense (``torch.utils.flop_counter``), using the
    class forward and eager blocks so nothing compiled is traced."""
    from .flops import count_flops

    def eager(x: torch.Tensor) -> Any:
        return type(module).forward(module, x)

    with torch.no_grad(), eager_blocks(module):
        merged = count_flops(eager, image) / 1e9
        with unpatched(module):
            dense = count_flops(eager, image) / 1e9
    return merged, dense


class StageMeter:
    """Measurements of one stage. ``agreement`` is a torchmetrics accuracy (synced across DDP ranks) or None."""

    def __init__(self, compare_dense: bool, agreement: Optional[Metric] = None) -> None:
        self.compare_dense = compare_dense
        self.agreement = agreement
        self.merged = Throughput()
        self.dense = Throughput()
        self.merged_images = 0  # every merged image, the untimed warm-up batch included
        self.flops: Dict[Tuple[int, ...], Tuple[float, float]] = {}
        self.tokens: Optional[BlockTokens] = None  # adaptive merging: FLOPs from each batch's own token counts
        self.spent: List[Tuple[float, int]] = []  # (block GFLOPs saved per image, images) per merged batch
        self.last_fraction: Optional[float] = None  # adaptive: the last merged batch's block FLOPs / dense
        self._t0 = 0.0  # when the forward being timed started
        if agreement is not None:
            agreement.reset()

    def count_tokens(self, blocks: List[nn.Module], dims: Tuple[int, int]) -> None:
        """Count FLOPs per batch from the blocks' token counts (adaptive merging) instead of once per input shape."""
        self.stop_counting()
        self.tokens = BlockTokens(blocks, dims)

    def stop_counting(self) -> None:
        if self.tokens is not None:
            self.tokens.remove()
            self.tokens = None

    def before_forward(self) -> None:
        """Start timing the next forward; forget token counts recorded outside it (dense runs of the guard)."""
        if self.tokens is not None:
            self.tokens.clear()
        self._t0 = time.perf_counter()

    def merged_forward(
        self,
        module: nn.Module,
        call: Tuple[Tuple[Any, ...], Dict[str, Any]],
        images: torch.Tensor,
        output: Any,
    ) -> Optional[torch.Tensor]:
        """Account one merged forward, timed from :meth:`before_forward` to now (call it once its outputs are
        ready; ``call`` = its ``(args, kwargs)``), count FLOPs for a new input shape, compare with dense if asked;
        return the dense logits when they were computed."""
        self.merged.add(time.perf_counter() - self._t0, images.shape[0])
        self.merged_images += images.shape[0]
        spent = self.tokens.spent() if self.tokens is not None else None
        self.last_fraction = None if spent is None else spent[0] / spent[1]
        if spent is not None:
            self.spent.append((spent[1] - spent[0], images.shape[0]))
        shape = tuple(images.shape[1:])
        if shape not in self.flops:
            with torch.no_grad():
                self.flops[shape] = count_flops_pair(module, images[:1])
            if self.tokens is not None:
                self.tokens.clear()
        logits = logits_of(output)
        if not (self.compare_dense and logits is not None):
            return None
        args, kwargs = call
        with unpatched(module), torch.no_grad():
            t0 = time.perf_counter()
            dense = logits_of(type(module).forward(module, *args, **kwargs))  # the class forward, never a compiled one
            sync(images)
            self.dense.add(time.perf_counter() - t0, images.shape[0])
        if self.agreement is not None and dense is not None and logits.ndim == 2:
            self.agreement.update(logits.detach(), dense.argmax(dim=-1))
        return dense

    def metrics(self) -> Dict[str, float]:
        """``dsm/*`` metrics measured so far (those that could be measured)."""
        out: Dict[str, float] = {}
        if self.merged.images:
            out["dsm/images_per_sec"] = self.merged.per_second
        if self.flops:
            merged, dense = next(iter(self.flops.values()))
            if self.spent:  # adaptive: dense minus the block FLOPs the stage's batches saved, on average per image
                merged = dense - sum(saved * n for saved, n in self.spent) / sum(n for _, n in self.spent)
            out["dsm/gflops_per_image"] = merged
            out["dsm/dense_gflops_per_image"] = dense
            out["dsm/flops_reduction"] = dense / merged
        if self.compare_dense and self.merged.images and self.dense.images:
            out["dsm/dense_images_per_sec"] = self.dense.per_second
            out["dsm/speedup"] = self.merged.per_second / self.dense.per_second
        if self.compare_dense and self.agreement is not None and self.agreement.update_count:
            out["dsm/agreement_top1"] = float(self.agreement.compute())
        return out

    def describe(self, metrics: Dict[str, float]) -> List[str]:
        """What :meth:`metrics` measured, in sentences a person can read (one per line)."""
        lines = [f"{self.merged_images} images ran merged."]
        if "dsm/flops_reduction" in metrics:
            lines.append(
                f"FLOPs: {metrics['dsm/gflops_per_image']:.2f} GFLOPs per image against "
                f"{metrics['dsm/dense_gflops_per_image']:.2f} dense ({metrics['dsm/flops_reduction']:.2f}x fewer)"
                + (", the average over the merged batches, padding included (adaptive merging)." if self.spent else ".")
            )
        if "dsm/agreement_top1" in metrics:
            lines.append(
                f"Top-1 agreement with the dense model on the merged images: {metrics['dsm/agreement_top1']:.3f}."
            )
        if "dsm/speedup" in metrics:
            lines.append(
                f"Speed: {metrics['dsm/images_per_sec']:.2f} images/s merged against "
                f"{metrics['dsm/dense_images_per_sec']:.2f} dense on the same batches ({metrics['dsm/speedup']:.2f}x; "
                f"{self.merged.images} images timed, the first batch left out as warm-up)."
            )
        return lines
