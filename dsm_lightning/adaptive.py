"""Adaptive merging: fit per-block similarity thresholds to a FLOP budget, and count the FLOPs images then spend.

With :attr:`DSMConfig.threshold <dsm_lightning.DSMConfig>` set, each global merging block merges, in each image,
every pair at least that similar, so the tokens an image keeps follow its content. :func:`fit_thresholds` picks the
thresholds on calibration images so that, on average over them, every block keeps the tokens the fixed plan keeps
(hence about the fixed plan's FLOPs); :func:`adaptive_flops` measures what images actually spend, and
:class:`BudgetKeeper` holds a stage to that budget when its images are more (or less) redundant than the ones the
thresholds were fitted on.
"""

from __future__ import annotations

import math
import statistics
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .config import DSMConfig
from .errors import ConfigError
from .inspection import trace_tokens
from .merge import MergeState
from .patch import apply_dsm, get_config, is_patched, remove_dsm, token_plan
from .schedule import block_flops

__all__ = ["fit_thresholds", "AdaptiveFlops", "adaptive_flops", "BlockTokens", "BudgetKeeper", "shift_thresholds"]

#: Prior slope of a stage's block-FLOP fraction against a common shift of every threshold (d fraction / d shift),
#: measured on the DINOv2 ViT-S/14 and CLIP ViT-B/16 references at 1.8x (``benchmarks/threshold_drift.py``); the
#: keeper replaces it by the slope it observes as soon as it has two shifts to compare.
_PRIOR_SLOPE = 0.24
#: How much the prior slope counts in the keeper's fit (as offsets spread by +-0.1 would), and the largest shift one
#: check may make (a noisy check never swings the thresholds far).
_PRIOR_WEIGHT = 0.1**2
_MAX_STEP = 0.3
#: Each check corrects this share of what it sees (a slope up to 4x steeper than believed still converges).
_DAMPING = 0.5


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
    from .adapters import get_adapter

    chosen: Dict[int, float] = {}

    def record(index: int, tokens: Tensor, state: MergeState) -> None:
        if state.threshold is not None and fitting.blocks[index].fit:
            chosen[index] = state.threshold

    try:
        apply_dsm(model, base)
        adapter = get_adapter(model)
        with torch.no_grad():
            tokens, grid = adapter.embed(model, images)
            fitting = adapter.plan(model, grid).fitting()
            adapter.run(model, tokens, grid, record, plan=fitting)
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
        tokens: The last block's output ``[B, T, C]`` (merged tokens, before the model's final norm), so that one
            pass gives both the FLOPs and the output (``model.forward_head(model.norm(tokens))`` on timm).
    """

    per_image: Tensor
    spent: float
    tokens: Optional[Tensor] = None


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
    return AdaptiveFlops(per_image / dense, spent[0] * 1e9 / dense, trace.tokens)


def _standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (infinite for fewer than two: one batch shows no spread)."""
    if len(values) < 2:
        return float("inf")
    return statistics.stdev(values) / math.sqrt(len(values))


def shift_thresholds(config: DSMConfig, shift: float) -> DSMConfig:
    """``config`` with every per-block threshold moved by ``shift`` on a log scale of the cosine distance: a
    threshold ``t`` becomes ``1 - (1 - t) * exp(-shift)`` (``shift > 0`` raises it and merges less), within
    ``[-1, 1]``. Near-duplicate tokens (flat backgrounds) sit at similarities within ``1e-4`` of 1, so an additive
    shift would jump over all of them at once; this one moves a threshold of 0.9999 as gently, relatively, as one of
    0.5. Blocks that merge nothing (threshold above 1) stay as they are."""
    if config.threshold is None:
        raise ConfigError("shift_thresholds needs an adaptive config (threshold set, e.g. by fit_thresholds)")
    values = config.threshold if isinstance(config.threshold, tuple) else (config.threshold,)
    factor = math.exp(-shift)
    moved = tuple(v if v > 1.0 else max(-1.0, 1.0 - (1.0 - v) * factor) for v in values)
    return config.replace(threshold=moved if isinstance(config.threshold, tuple) else moved[0])


class BudgetKeeper:
    """Holds an adaptive stage to its block-FLOP target by shifting every threshold by one common offset.

    Thresholds fitted on some images spend another budget on others (more redundant images merge more). The keeper
    watches what each merged batch spends (block FLOPs as a fraction of dense, padding included: what the stage
    pays) and, each time the images seen grow by ``growth`` (``first``, ``1.5 first``, ``2.25 first``, ...; two
    batches at least), compares the segment since its last check with the target. When the stage is off by more than
    ``tolerance`` (relative) and by more than twice the segment's standard error (batch-to-batch noise), it moves the
    offset so that the next segment lands the stage's running total on the target, by the slope of a least-squares
    line through the checked segments' spend against their offsets, shrunk towards the prior ``slope``, and damped.
    Changes are rare (a logarithmic number per stage, so compiled blocks recompile rarely) and the offset stays
    within ``max_shift``. What the stage then spends against its target, and the drift of the first segment, are in
    :meth:`report`; ``hold=False`` only accounts and reports.

    Example:
        >>> from dsm_lightning import DSMConfig
        >>> keeper = BudgetKeeper(DSMConfig(threshold=0.8), target=0.5, first=8)
        >>> keeper.observe(0.61, 4) is None  # one batch: nothing decided yet
        True
        >>> keeper.observe(0.59, 4) is not None  # the first 8 images spent 20% too much: thresholds come down
        True
        >>> keeper.offset < 0
        True
    """

    def __init__(
        self,
        config: DSMConfig,
        target: float,
        *,
        first: int = 64,
        tolerance: float = 0.01,
        max_shift: float = 2.0,
        slope: float = _PRIOR_SLOPE,
        hold: bool = True,
        growth: float = 1.5,
    ) -> None:
        if config.threshold is None:
            raise ConfigError("BudgetKeeper needs an adaptive config (threshold set, e.g. by fit_thresholds)")
        if not 0 < target <= 1:
            raise ValueError(f"BudgetKeeper target is a fraction of dense block FLOPs in (0, 1], got {target!r}")
        self.fitted = config
        self.config = config
        self.target = float(target)
        self.offset = 0.0
        self.changes = 0
        self.first_drift: Optional[float] = None  # the first segment's spend against the target, relative
        self._tolerance = tolerance
        self._max_shift = max_shift
        self._slope = slope
        self.hold = hold  # False: account and report only, never shift
        if growth <= 1:
            raise ValueError(f"BudgetKeeper growth is the factor between checks, > 1; got {growth!r}")
        self._growth = float(growth)
        self._next = max(1, first)
        self._seen = 0
        self._total = 0.0  # sum of images x fraction over the stage
        self._segment = [0.0, 0]  # (sum of images x fraction, images) since the last check
        self._batches: List[float] = []  # the segment's per-batch fractions (their spread is the noise)
        self._history: List[Tuple[float, float, int]] = []  # (offset, segment mean, images) per checked segment

    @property
    def spent(self) -> Optional[float]:
        """The stage's block FLOPs so far, per image, as a fraction of dense (None before the first batch)."""
        return self._total / self._seen if self._seen else None

    def observe(self, fraction: float, images: int) -> Optional[DSMConfig]:
        """Account one merged batch (its block-FLOP ``fraction`` of dense, ``images`` images); return the config to
        run from the next batch on when the thresholds move, else None."""
        self._seen += images
        self._total += fraction * images
        self._segment[0] += fraction * images
        self._segment[1] += images
        self._batches.append(fraction)
        if self._seen < self._next or len(self._batches) < 2:  # a segment of one batch shows no spread
            return None
        self._next = max(self._seen + 1, int(self._growth * self._seen))
        mean, count = self._segment[0] / self._segment[1], int(self._segment[1])
        noise = _standard_error(self._batches)
        self._segment, self._batches = [0.0, 0], []
        if self.first_drift is None:
            self.first_drift = mean / self.target - 1
        self._history.append((self.offset, mean, count))
        running = self._total / self._seen
        off = max(abs(running - self.target), abs(mean - self.target))
        # on target, or what is off is batch-to-batch noise
        if not self.hold or off <= max(self._tolerance * self.target, 2 * noise):
            return None
        # the next segment aims to land the running total on the target (within 5% of it)
        g = self._growth  # the next segment has (g - 1) x the images seen so far
        aim = min(1.05 * self.target, max(0.95 * self.target, (g * self.target - running) / (g - 1)))
        step = min(_MAX_STEP, max(-_MAX_STEP, _DAMPING * (aim - mean) / self._observed_slope()))
        offset = round(min(self._max_shift, max(-self._max_shift, self.offset + step)), 3)
        if offset == self.offset:
            return None
        self.offset = offset
        self.changes += 1
        self.config = shift_thresholds(self.fitted, offset)
        return self.config

    def _observed_slope(self) -> float:
        """d fraction / d offset: a least-squares line through the checked segments (weighted by their images),
        shrunk towards the prior slope as if it had been seen at offsets +-0.1, kept within 4x of the prior."""
        total = sum(n for _, _, n in self._history)
        x0 = sum(o * n for o, _, n in self._history) / total
        y0 = sum(m * n for _, m, n in self._history) / total
        cov = sum(n / total * (o - x0) * (m - y0) for o, m, n in self._history)
        var = sum(n / total * (o - x0) ** 2 for o, _, n in self._history)
        prior = _PRIOR_WEIGHT
        slope = (cov + prior * self._slope) / (var + prior)
        return min(4 * self._slope, max(self._slope / 4, slope))

    def report(self) -> str:
        """One sentence: what the stage spent against its target, and what the keeper did."""
        spent = self.spent
        if spent is None:
            return "Adaptive budget: no merged batch was counted."
        text = (
            f"Adaptive budget: block FLOPs {spent:.3f}x dense against a target of {self.target:.3f}x "
            f"({(spent / self.target - 1) * 100:+.1f}%)"
        )
        if self.first_drift is not None:
            text += f"; the fitted thresholds spent {self.first_drift * 100:+.1f}% on the stage's first images"
        if self.changes:
            text += f"; thresholds shifted {self.changes} time(s), now by {self.offset:+.3f}"
        return text + "."
