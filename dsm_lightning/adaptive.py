"""Adaptive merging: fit per-block similarity thresholds to a FLOP budget, and count the FLOPs images then spend.

With :attr:`DSMConfig.threshold <dsm_lightning.DSMConfig>` set, each global merging block merges, in each image,
every pair at least that similar, so the tokens an image keeps follow its content. :func:`fit_thresholds` picks the
thresholds on calibration images so that, on average over them, every block keeps the tokens the fixed plan keeps
(hence about the fixed plan's FLOPs); :func:`adaptive_flops` measures what images actually spend.
"""

from __future__ import annotations

from functools import partial
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import DSMConfig
from .errors import ConfigError
from .inspection import trace_tokens
from .merge import MergeState, fitting_thresholds
from .patch import apply_dsm, get_config, is_patched, remove_dsm, token_plan
from .schedule import block_flops

__all__ = ["fit_thresholds", "AdaptiveFlops", "adaptive_flops", "BlockTokens"]


def fit_thresholds(model: nn.Module, images: Tensor, config: Optional[DSMConfig] = None) -> DSMConfig:
    """Thresholds under which ``images`` keep, on average, the tokens of ``config``'s fixed plan in every block.

    One forward pass over ``images`` as a single batch: at each global merging block the batch's
    ``B * (tokens_in - tokens_out)`` most similar proposals merge, however they fall over the images, and the
    similarity of the last one becomes the block's threshold. Fit on images the stage will not be judged on.

    Args:
        model: A supported ViT (patched or not; it is left as it was, its patch config unchanged).
        images: Calibration batch ``[B, 3, H, W]`` at the input size the thresholds are for (64 or more images).
        config: The fixed schedule to follow (``flops_target``, ``delay``, ...); the model's config, else
            ``DSMConfig()``, when None. Its own ``threshold`` is ignored.

    Returns:
        ``config`` with ``threshold`` set, one value per block (2.0, merging nothing, where the plan merges nothing
        or the images needed no merge).

    Examples:
        >>> import timm, torch
        >>> model = timm.create_model("vit_tiny_patch16_224", num_classes=10).eval()
        >>> fitted = fit_thresholds(model, torch.randn(8, 3, 224, 224), DSMConfig(flops_target=0.6))
        >>> len(fitted.threshold), fitted.flops_target
        (12, 0.6)
    """
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"fit_thresholds needs a batch of images [B, 3, H, W] with B >= 1 (64 or more), got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"fit_thresholds needs float images, normalised as the model expects; got {images.dtype} (convert and "
            f"normalise them as the model's data transform does)"
        )
    bad = (~torch.isfinite(images.flatten(1)).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"fit_thresholds got non-finite pixels (nan/inf) in image(s) {bad[:10]}; check the data loading and "
            f"normalisation (the thresholds fitted on them would mean nothing)"
        )
    before = get_config(model) if is_patched(model) else None
    base = (config or before or DSMConfig()).replace(threshold=None)
    plan = token_plan(model, base, img_size=(images.shape[-2], images.shape[-1]))
    if not any(b.mode == "global" for b in plan.blocks):
        raise ConfigError(f"fit_thresholds: {base} merges no block globally; lower flops_target or set r")
    try:
        apply_dsm(model, base)
        with torch.no_grad(), fitting_thresholds() as chosen:
            model(images)
    finally:
        if before is None:
            remove_dsm(model)
        else:
            apply_dsm(model, before)
    return base.replace(threshold=tuple(chosen.get(i, 2.0) for i in range(plan.depth)))


class AdaptiveFlops(NamedTuple):
    """What a batch spent in the blocks, as fractions of the dense model's block FLOPs.

    Attributes:
        per_image: ``[B]`` each image's own FLOPs (its live tokens only).
        spent: The batch's FLOPs per image as run: every block call on its sub-batch (:func:`run_blocks
            <dsm_lightning.engine.run_blocks>` regroups images by token count), padding rows included.
    """

    per_image: Tensor
    spent: float


class BlockTokens:
    """Forward hooks on a model's blocks that record every block call's batch and tokens in and out: the one counter
    of the FLOPs a forward spent when its token counts follow the data (adaptive merging runs a block once per
    sub-batch, each padded to its own longest image)."""

    def __init__(self, blocks: Sequence[nn.Module], dims: Tuple[int, int]) -> None:
        self.dims = dims
        self.calls: List[Tuple[int, int, int, int]] = []  # (block, batch, tokens in, tokens out) per call
        self.handles = [block.register_forward_hook(partial(self._record, i)) for i, block in enumerate(blocks)]

    def _record(self, index: int, module: nn.Module, args: Tuple[Any, ...], output: Any) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            self.calls.append((index, args[0].shape[0], args[0].shape[1], out.shape[1]))

    def spent(self) -> Optional[Tuple[float, float]]:
        """Block GFLOPs per image of the forward recorded since the last call (analytic, as
        :class:`~dsm_lightning.TokenPlan` counts them, padding included) and of the dense model; clears the record."""
        calls, self.calls = self.calls, []
        if not calls:
            return None
        first = calls[0][0]
        images = sum(batch for block, batch, _, _ in calls if block == first)
        t0 = calls[0][2]
        spent = sum(batch * block_flops(a, b, *self.dims) for _, batch, a, b in calls) / images
        depth = len({block for block, _, _, _ in calls})
        return spent / 1e9, block_flops(t0, t0, *self.dims) * depth / 1e9

    def clear(self) -> None:
        """Forget the calls recorded so far."""
        self.calls = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def adaptive_flops(model: nn.Module, images: Tensor) -> AdaptiveFlops:
    """Count the block FLOPs of a patched model on ``images`` from the tokens each block really holds (analytic
    FLOPs: attention on the tokens entering a block, the MLP on those leaving it, as :class:`~dsm_lightning.TokenPlan`
    counts them): each image's own, and what the batch spent as run (:class:`BlockTokens`)."""
    if not is_patched(model):
        raise ValueError("adaptive_flops needs a patched model: call apply_dsm(model, ...) first")
    from .adapters import get_adapter

    adapter = get_adapter(model)
    dim, hidden = adapter.dims(model)
    live: List[Tensor] = []

    def count(index: int, tokens: Tensor, state: MergeState) -> None:
        if state.size is None:
            live.append(torch.full((tokens.shape[0],), tokens.shape[1]))
        else:
            live.append((state.size[..., 0] > 0).sum(dim=1).cpu())

    counter = BlockTokens(adapter.blocks(model), (dim, hidden))
    try:
        with torch.no_grad():
            trace = trace_tokens(model, images, count)
        spent = counter.spent()
    finally:
        counter.remove()
    assert spent is not None
    t0 = trace.plan.num_patches + trace.plan.num_prefix_tokens
    dense = block_flops(t0, t0, dim, hidden) * len(live)
    per_image = torch.zeros(images.shape[0], dtype=torch.float64)
    before = torch.full((images.shape[0],), t0)
    for after in live:
        per_image += torch.tensor([block_flops(int(a), int(b), dim, hidden) for a, b in zip(before, after)])
        before = after
    return AdaptiveFlops(per_image / dense, spent[0] * 1e9 / dense)
