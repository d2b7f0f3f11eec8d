"""The quality guard: on a stage's first images (run dense), choose the most merging schedule whose agreement with
the dense model meets a target, with an optional one-sided binomial test so the promise holds with a stated
confidence."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import DSMConfig
from .errors import ConfigError
from .outputs import model_outputs, token_cosine, top1_agreement
from .patch import apply_dsm, remove_dsm, token_plan

__all__ = [
    "GUARD_MEASURES",
    "GUARD_SCALES",
    "GUARD_TARGETS",
    "GuardResult",
    "binomial_pass",
    "guard_candidates",
    "quality_guard",
]

#: What the guard measures: top-1 agreement for classifiers, token cosine similarity for backbones (a ViT without a
#: classifier head, e.g. under a dense-prediction decoder).
GUARD_MEASURES: Dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "top1": top1_agreement,
    "cosine": token_cosine,
}
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
        measure: What agreement means: ``"top1"`` (classifiers) or ``"cosine"`` (backbones; see
            :data:`GUARD_MEASURES`).
        confidence: The confidence of the binomial test a schedule had to pass (:func:`binomial_pass`), or None
            when the observed agreement was compared with the target.
    """

    config: Optional[DSMConfig]
    agreement: float
    min_agreement: float
    images: int
    trials: List[Dict[str, Any]] = field(default_factory=list)
    measure: str = "top1"
    confidence: Optional[float] = None

    @property
    def chosen(self) -> Optional[Dict[str, Any]]:
        """The trial of the chosen schedule (None when running dense)."""
        if self.config is None:
            return None
        return next(t for t in self.trials if t["config"] == self.config.to_dict())

    @property
    def flops_ratio(self) -> float:
        """Planned block FLOPs of the choice relative to dense (1.0 when running dense)."""
        chosen = self.chosen
        return 1.0 if chosen is None else float(chosen["flops_ratio"])

    def summary(self) -> str:
        """One line per evaluated candidate, the chosen one marked."""
        chosen = self.chosen
        what = "top-1 agreement" if self.measure == "top1" else "mean token cosine similarity"
        test = "" if self.confidence is None else f" (binomial test, {self.confidence:.0%} confidence)"
        lines = [f"DSM quality guard: {what} with dense >= {self.min_agreement:.3f}{test} on {self.images} images"]
        for t in self.trials:
            mark = "->" if t is chosen else "  "
            lines.append(
                f"{mark} {t['label']:<22} block FLOPs {t['flops_ratio']:.3f}x dense  agreement {t['agreement']:.4f}"
            )
        if self.config is None:
            lines.append("-> no merging schedule met the target: running dense")
        return "\n".join(lines)

    def reason(self) -> str:
        """One sentence: what the guard chose and why."""
        what = "top-1 agreement" if self.measure == "top1" else "token cosine"
        if self.config is None:
            return f"the guard ran dense: no schedule reached {what} {self.min_agreement:.3f} on {self.images} images."
        chosen = self.chosen
        assert chosen is not None
        missed = [t for t in self.trials if t["flops_ratio"] < chosen["flops_ratio"]]
        shown = "" if self.confidence is None else f", shown at {self.confidence:.0%} confidence"
        text = (
            f"the guard chose {chosen['label']} ({what} {self.agreement:.3f} >= {self.min_agreement:.3f}{shown} "
            f"on the first {self.images} images, run dense)"
        )
        if missed:
            verb = "reached only" if self.confidence is None else "did not pass the test with"
            text += f"; schedules that merge more {verb} " + ", ".join(
                f"{t['agreement']:.3f} ({t['label']})" for t in missed
            )
        return text + "."


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
        elif isinstance(r, int):
            new = int(r * s)
        else:
            raise ConfigError(f"guard_candidates needs an int, fraction or per-block tuple r, got {r!r}")
        merges = any(new) if isinstance(new, tuple) else new > 0
        if merges and config.replace(r=new) not in out:
            out.append(config.replace(r=new))
    return out


@torch.no_grad()
def binomial_pass(hits: float, n: int, target: float, confidence: Optional[float]) -> bool:
    """Whether ``hits`` agreements out of ``n`` show an agreement of at least ``target``.

    With ``confidence=None``, the point estimate: ``hits / n >= target``. Otherwise a one-sided exact binomial test:
    pass only when seeing ``hits`` or more agreements would have probability at most ``1 - confidence`` if the
    true agreement were only ``target``, so a schedule whose true agreement is below the target passes with
    probability at most ``1 - confidence``.

    Example:
        >>> binomial_pass(125, 128, 0.97, None), binomial_pass(125, 128, 0.97, 0.9)
        (True, False)
    """
    if n <= 0 or hits < target * n:
        return False
    if confidence is None:
        return True
    if target >= 1.0:
        return hits >= n
    k0 = math.ceil(hits - 1e-9)
    log_t, log_f = math.log(target), math.log1p(-target)
    tail = sum(
        math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_t + (n - k) * log_f)
        for k in range(k0, n + 1)
    )
    return tail <= 1.0 - confidence


def quality_guard(
    model: nn.Module,
    images: torch.Tensor,
    dense_logits: torch.Tensor,
    config: DSMConfig,
    min_agreement: float,
    *,
    batch_size: int = 32,
    reduce: Optional[Any] = None,
    measure: str = "top1",
    confidence: Optional[float] = None,
    adaptive: bool = False,
) -> GuardResult:
    """Choose the most merging schedule whose agreement with the dense model stays >= ``min_agreement``: top-1
    agreement for a classifier, or (``measure="cosine"``) the mean per-token cosine similarity of a backbone's
    outputs.

    Candidates come from :func:`guard_candidates` (what the user fixed, e.g. ``delay``, is kept); agreement falls as
    merging grows, so a bisection over them needs about log2(len) evaluations on ``images``. The model is left
    unpatched.

    Args:
        model: A supported ViT classifier (unpatched).
        images: Calibration images on the model's device.
        dense_logits: The dense model's outputs for ``images`` (logits, or a backbone's features).
        config: The schedule the user asked for (the most merging candidate).
        min_agreement: Target in (0, 1].
        batch_size: Batch size of the evaluation passes.
        reduce: Optional ``fn(tensor) -> tensor`` summing over processes (DDP), so every rank chooses alike.
        measure: A key of :data:`GUARD_MEASURES`.
        confidence: For ``measure="top1"``, choose a schedule only if a one-sided binomial test shows its agreement
            is at least ``min_agreement`` with this confidence (:func:`binomial_pass`); None compares the point
            estimate. Ignored for ``"cosine"``, whose scores are not counts.
        adaptive: Adaptive merging: before a candidate is measured, its thresholds are fitted on ``images``
            (:func:`~dsm_lightning.fit_thresholds`; similarities only, no outputs) so that these images spend its
            planned FLOPs on average; with ``reduce``, the thresholds are averaged over processes.
    """
    if not 0.0 < min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1], got {min_agreement}")
    if measure not in GUARD_MEASURES:
        raise ValueError(f"measure must be one of {sorted(GUARD_MEASURES)}, got {measure!r}")
    trials = _Trials(model, images, dense_logits, config, batch_size, reduce, measure, adaptive)
    candidates = guard_candidates(config)
    lo, hi = 0, len(candidates)  # candidates[hi:] pass (index len = dense); find the first passing index
    level = confidence if measure == "top1" else None
    while lo < hi:
        mid = (lo + hi) // 2
        if binomial_pass(trials.agreement(candidates[mid]) * trials.total, round(trials.total), min_agreement, level):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(candidates):
        return GuardResult(None, 1.0, min_agreement, int(trials.total), trials.records, measure, level)
    chosen = trials.measured[candidates[lo]]
    return GuardResult(chosen[0], chosen[1], min_agreement, int(trials.total), trials.records, measure, level)


class _Trials:
    """Measures candidates for :func:`quality_guard` on its images and keeps the record of each."""

    def __init__(
        self,
        model: nn.Module,
        images: torch.Tensor,
        dense: torch.Tensor,
        requested: DSMConfig,
        batch_size: int,
        reduce: Optional[Any],
        measure: str,
        adaptive: bool,
    ) -> None:
        from .adapters import get_adapter

        self.model, self.images, self.reference = model, images, dense.float().cpu()
        self.requested, self.batch_size, self.reduce, self.adaptive = requested, batch_size, reduce, adaptive
        self.score = GUARD_MEASURES[measure]
        self.dims = get_adapter(model).dims(model)
        self.total = self._sum(float(images.shape[0]))
        self.records: List[Dict[str, Any]] = []
        self.measured: Dict[DSMConfig, Tuple[DSMConfig, float]] = {}  # candidate -> (config run, agreement)

    def _sum(self, value: float) -> float:
        if self.reduce is None:
            return value
        return float(self.reduce(torch.tensor(value, device=self.images.device)))

    def agreement(self, candidate: DSMConfig) -> float:
        """Agreement with dense of ``candidate`` (its thresholds fitted first under adaptive merging)."""
        size = self.images.shape[-2:]
        plan = token_plan(self.model, candidate, img_size=(int(size[0]), int(size[1])))
        cfg = _fit(self.model, self.images, candidate, self.reduce) if self.adaptive else candidate
        apply_dsm(self.model, cfg)
        try:
            outputs = model_outputs(self.model, self.images, self.batch_size, self.images.device)
        finally:
            remove_dsm(self.model)
        value = self._sum(float(self.score(outputs, self.reference).sum())) / self.total
        r = plan.r if plan.r is not None else cfg.r
        label = f"flops_target={cfg.flops_target:g}" if self.requested.r is None else f"r={r}"
        self.records.append(
            {"label": label, "config": cfg.to_dict(), "flops_ratio": plan.flops_ratio(*self.dims), "agreement": value}
        )
        self.measured[candidate] = (cfg, value)
        return value


def _fit(model: nn.Module, images: torch.Tensor, config: DSMConfig, reduce: Optional[Any]) -> DSMConfig:
    """``config`` with thresholds fitted on ``images`` (averaged over processes when ``reduce`` sums over them)."""
    from .adaptive import fit_thresholds

    fitted = fit_thresholds(model, images, config)
    if reduce is None:
        return fitted
    values = torch.tensor(fitted.threshold, dtype=torch.float64, device=images.device)
    count = reduce(torch.ones((), dtype=torch.float64, device=images.device))
    return fitted.replace(threshold=tuple((reduce(values) / count).tolist()))
