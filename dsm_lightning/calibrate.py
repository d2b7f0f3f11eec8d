"""calibrate(): pick the DSM schedule that keeps the most accuracy (or agreement with dense) under a FLOP budget.

The search runs on a few calibration batches, training-free: every candidate schedule (delay x local phase) gets the
smallest constant ``r`` that meets the budget, so all candidates cost the same planned FLOPs and only the quality
differs. ToMe's schedule (``delay=0, local_blocks=0``) is always a candidate, so the result is never worse than ToMe
at the same budget on the calibration data. Successive halving keeps it fast: every candidate is scored on the first
quarter of the images, the best few on all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import DSMConfig
from .patch import apply_dsm, get_config, is_patched, remove_dsm
from .schedule import token_plan

__all__ = ["calibrate", "CalibrationResult", "default_search_space", "quality_guard", "GuardResult", "guard_candidates"]


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes:
        config: The best schedule, with the explicit ``r`` chosen at the calibration input size.
        score: Its score (accuracy or agreement with the dense model) on all calibration images.
        flops_ratio: Its planned block FLOPs relative to dense.
        metric: ``"accuracy"`` or ``"agreement"``.
        seconds: Wall time of the whole search, dense pass included.
        images: Calibration images used.
        candidates: One dict per candidate (config, r, flops_ratio, score on the images it saw, images).
    """

    config: DSMConfig
    score: float
    flops_ratio: float
    metric: str
    seconds: float
    images: int
    candidates: List[Dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        """Printable ranking of the candidates."""
        lines = [f"{'delay':>5} {'local':>5} {'schedule':>12} {'r':>7} {'FLOPs':>6} {self.metric:>9} {'KL':>7} "
                 f"{'images':>6}"]
        for c in sorted(self.candidates, key=lambda c: (-c["images"], -c["score"], c["kl"])):
            lines.append(f"{c['delay']:>5} {c['local_blocks']:>5} {c['schedule']:>12} {c['r']:>7.4g} "
                         f"{c['flops_ratio']:>6.3f} {c['score']:>9.4f} {c['kl']:>7.4f} {c['images']:>6}")
        return "\n".join(lines)


def default_search_space(depth: int) -> List[Dict[str, Any]]:
    """Delays 0..depth/4 x local phase {none, 2 blocks of 2x2 windows} x schedule {constant, proportional}.

    ``delay=0, local_blocks=0, schedule="constant"`` is ToMe.
    """
    space = []
    for delay in range(0, max(1, depth // 4) + 1):
        for local_blocks in (0, 2):
            for schedule in ("constant", "proportional"):
                space.append({"delay": delay, "local_blocks": local_blocks, "windows": 4, "schedule": schedule})
    return space


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


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    out = []
    for i in range(0, images.shape[0], batch_size):
        out.append(model(images[i:i + batch_size].to(device)).float().cpu())
    return torch.cat(out)


def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    target: float = 0.55,
    *,
    metric: str = "auto",
    max_images: int = 256,
    batch_size: int = 32,
    search_space: Optional[Sequence[Dict[str, Any]]] = None,
    keep: int = 3,
    prop_attn: bool = True,
    verbose: bool = False,
) -> CalibrationResult:
    """Choose delay / local phase / schedule / r for ``model`` under a FLOP budget, from a few calibration batches.

    Candidates are ranked by the metric, ties broken by the mean KL divergence from the dense model's predictions
    (so a saturated metric, e.g. accuracy on the head's own training images, still separates them). Successive
    halving: all candidates see the first eighth of the images, the best ``keep`` (and ToMe) all of them.

    Args:
        model: A supported ViT classifier (patched or not; it is left as it was).
        dataloader: Yields images, ``(images, labels)`` or dicts with ``image``/``target``.
        target: Budget as a fraction of the dense model's block FLOPs (0.55 = 1.8x fewer).
        metric: ``"accuracy"`` (needs labels), ``"agreement"`` (top-1 agreement with the dense model), or
            ``"auto"`` (accuracy when labels exist).
        max_images: Calibration images to use.
        batch_size: Batch size of the search's forward passes.
        search_space: Dicts of :class:`DSMConfig` fields (without ``r``); default :func:`default_search_space`.
        keep: Candidates kept for the full-set round of successive halving.
        prop_attn: Proportional attention in every candidate.
        verbose: Print progress.

    Returns:
        A :class:`CalibrationResult`; ``result.config`` goes straight into ``apply_dsm`` or ``DSMCallback``.
    """
    start = time.perf_counter()
    was = get_config(model)
    if is_patched(model):
        remove_dsm(model)
    device = next(model.parameters()).device
    images, labels = collect_batches(dataloader, max_images)
    if metric == "auto":
        metric = "accuracy" if labels is not None else "agreement"
    if metric == "accuracy" and labels is None:
        raise ValueError("metric='accuracy' needs labels from the dataloader; use metric='agreement'")
    if metric not in ("accuracy", "agreement"):
        raise ValueError(f"metric must be 'auto', 'accuracy' or 'agreement', got {metric!r}")
    model.eval()
    try:
        dense_logits = _logits(model, images, batch_size, device)
        dense_logp = dense_logits.log_softmax(-1)
        reference = labels if metric == "accuracy" else dense_logits.argmax(-1)
        from .adapters import get_adapter

        adapter = get_adapter(model)
        depth = adapter.depth(model)
        img_size = tuple(images.shape[-2:])
        space = list(search_space) if search_space is not None else default_search_space(depth)
        def is_tome(c: Dict[str, Any]) -> bool:
            return c.get("delay", 0) == 0 and c.get("local_blocks", 0) == 0 and \
                c.get("schedule", DSMConfig.schedule) == "constant"

        if not any(is_tome(c) for c in space):
            space.append({"delay": 0, "local_blocks": 0, "windows": 4, "schedule": "constant"})  # ToMe competes
        candidates = []
        for fields in space:
            try:
                cfg = DSMConfig(**{**fields, "r": None, "flops_target": target, "prop_attn": prop_attn})
                plan = token_plan(model, cfg, img_size=img_size)
            except ValueError:
                continue
            fixed = cfg.replace(r=plan.r)
            candidates.append({"config": fixed, "delay": fixed.delay, "local_blocks": fixed.local_blocks,
                               "windows": fixed.windows, "schedule": fixed.schedule, "r": plan.r,
                               "flops_ratio": plan.flops_ratio(*adapter.dims(model)), "score": float("nan"),
                               "kl": float("nan"), "images": 0, "_hits": 0.0, "_kl": 0.0})
        if not candidates:
            raise ValueError("no candidate schedule fits this model and input size; widen the search space")

        def score(cand: Dict[str, Any], start: int, stop: int) -> None:
            """Add images[start:stop] to the candidate's running score (metric, then KL to dense as tie-break)."""
            apply_dsm(model, cand["config"])
            try:
                logits = _logits(model, images[start:stop], batch_size, device)
            finally:
                remove_dsm(model)
            cand["_hits"] += float((logits.argmax(-1) == reference[start:stop]).sum())
            cand["_kl"] += float(torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logp[start:stop],
                                                            log_target=True, reduction="sum"))
            cand["images"] = stop
            cand["score"] = cand["_hits"] / stop
            cand["kl"] = cand["_kl"] / stop
            if verbose:
                print(f"  delay={cand['delay']} local={cand['local_blocks']} {cand['schedule']} r={cand['r']}: "
                      f"{metric}={cand['score']:.4f} kl={cand['kl']:.4f} on {stop} images", flush=True)

        def rank(c: Dict[str, Any]) -> Tuple[float, float]:
            return (c["score"], -c["kl"])

        total = images.shape[0]
        first = max(1, total // 8)
        for cand in candidates:
            score(cand, 0, first)
        finalists = sorted(candidates, key=rank, reverse=True)[:keep]
        tome = next((c for c in candidates if c["delay"] == 0 and c["local_blocks"] == 0
                     and c["schedule"] == "constant"), None)
        if tome is not None and tome not in finalists:
            finalists.append(tome)
        if total > first:
            for cand in finalists:
                score(cand, first, total)
        best = max(finalists, key=rank)
    finally:
        if was is not None:
            apply_dsm(model, was)
    return CalibrationResult(best["config"], best["score"], best["flops_ratio"], metric,
                             time.perf_counter() - start, int(images.shape[0]),
                             [{k: v for k, v in c.items() if k != "config" and not k.startswith("_")}
                              for c in candidates])


# ---------------------------------------------------------------------------------------------- quality guard
GUARD_TARGETS = (0.6, 0.65, 0.7, 0.75, 0.8, 0.9)
GUARD_SCALES = (1.0, 0.75, 0.5, 0.25)


@dataclass
class GuardResult:
    """Outcome of :func:`quality_guard`.

    Attributes:
        config: The most-merging candidate whose agreement met the target, or None when only the dense model did.
        agreement: Its top-1 agreement with the dense model (1.0 for dense).
        min_agreement: The target.
        images: Images the agreement was measured on (summed over processes).
        trials: The candidates evaluated, in order: ``label``, ``flops_ratio``, ``agreement``.
    """

    config: Optional[DSMConfig]
    agreement: float
    min_agreement: float
    images: int
    trials: List[Dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        """One line per evaluated candidate, the chosen one marked."""
        chosen = self.config.to_dict() if self.config is not None else None
        lines = [f"DSM quality guard: top-1 agreement with dense >= {self.min_agreement:.3f} on {self.images} images"]
        for t in self.trials:
            mark = "->" if t["config"] == chosen else "  "
            lines.append(f"{mark} {t['label']:<22} block FLOPs {t['flops_ratio']:.3f}x dense  agreement "
                         f"{t['agreement']:.4f}")
        if self.config is None:
            lines.append("-> no merging schedule met the target: running dense")
        return "\n".join(lines)


def guard_candidates(config: DSMConfig) -> List[DSMConfig]:
    """The schedules the guard may choose from, most merging first, keeping every field the user fixed.

    With ``r=None`` the FLOP budget relaxes from ``config.flops_target`` through :data:`GUARD_TARGETS`; with an
    explicit ``r`` it is scaled by :data:`GUARD_SCALES`.
    """
    if config.r is None:
        targets = sorted({config.flops_target, *(t for t in GUARD_TARGETS if t > config.flops_target)})
        return [config.replace(flops_target=t) for t in targets]
    out: List[DSMConfig] = []
    for s in GUARD_SCALES:
        r = config.r
        if isinstance(r, tuple):
            new: Any = tuple(int(v * s) for v in r)
        elif isinstance(r, float):
            new = max(r * s, 1 / 256)
        else:
            new = int(r * s)
        merges = any(new) if isinstance(new, tuple) else new > 0
        if merges and config.replace(r=new) not in out:
            out.append(config.replace(r=new))
    return out


@torch.no_grad()
def quality_guard(
    model: nn.Module,
    images: torch.Tensor,
    dense_logits: torch.Tensor,
    config: DSMConfig,
    min_agreement: float,
    *,
    batch_size: int = 32,
    reduce: Optional[Any] = None,
) -> GuardResult:
    """Choose the most merging schedule whose top-1 agreement with the dense model stays >= ``min_agreement``.

    Candidates come from :func:`guard_candidates` (what the user fixed, e.g. ``delay``, is kept); agreement falls as
    merging grows, so a bisection over them needs about log2(len) evaluations on ``images``. The model is left
    unpatched.

    Args:
        model: A supported ViT classifier (unpatched).
        images: Calibration images on the model's device.
        dense_logits: The dense model's logits for ``images``.
        config: The schedule the user asked for (the most merging candidate).
        min_agreement: Target in (0, 1].
        batch_size: Batch size of the evaluation passes.
        reduce: Optional ``fn(tensor) -> tensor`` summing over processes (DDP), so every rank chooses alike.
    """
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement}")
    device = images.device
    reference = dense_logits.argmax(-1).cpu()
    candidates = guard_candidates(config)
    dims = None
    trials: List[Dict[str, Any]] = []
    total = float(images.shape[0])
    if reduce is not None:
        total = float(reduce(torch.tensor(total, device=device)))

    def agreement(cfg: DSMConfig) -> float:
        nonlocal dims
        apply_dsm(model, cfg)
        try:
            from .adapters import get_adapter

            adapter = get_adapter(model)
            plan = token_plan(model, img_size=tuple(images.shape[-2:]))
            logits = _logits(model, images, batch_size, device)
        finally:
            remove_dsm(model)
        hits = torch.tensor(float((logits.argmax(-1) == reference).sum()), device=device)
        if reduce is not None:
            hits = reduce(hits)
        value = float(hits) / total
        label = f"flops_target={cfg.flops_target:g}" if config.r is None else f"r={plan.r if plan.r is not None else cfg.r}"
        trials.append({"label": label, "config": cfg.to_dict(), "flops_ratio": plan.flops_ratio(*adapter.dims(model)),
                       "agreement": value})
        return value

    lo, hi = 0, len(candidates)  # candidates[hi:] pass (index len = dense); find the first passing index
    scores: Dict[int, float] = {}
    while lo < hi:
        mid = (lo + hi) // 2
        scores[mid] = agreement(candidates[mid])
        if scores[mid] >= min_agreement:
            hi = mid
        else:
            lo = mid + 1
    if lo == len(candidates):
        return GuardResult(None, 1.0, min_agreement, int(total), trials)
    return GuardResult(candidates[lo], scores[lo], min_agreement, int(total), trials)
