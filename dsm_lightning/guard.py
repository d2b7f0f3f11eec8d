"""The quality guard: choose the most merging schedule whose agreement with the dense model meets a target, on
images drawn at random from the whole stage (a one-sided binomial test makes the promise hold with a stated
confidence), then audit a random fraction of the stage's batches and step to a lighter schedule the moment an
anytime-valid test says the target is at risk.

The pure pieces (:func:`quality_guard`, :func:`binomial_pass`, :func:`lower_bound`, :func:`evidence_below`,
:func:`images_needed`) take tensors and counts; :class:`QualityGuard` holds one stage's state; the callback and the
export command drive it."""

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
    "QualityGuard",
    "binomial_pass",
    "evidence_below",
    "guard_candidates",
    "images_needed",
    "least_hits",
    "lower_bound",
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
#: Shortfalls below the target that the audit's mixture test (:func:`evidence_below`) bets on.
AUDIT_SHORTFALLS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)


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
        where: Where the images came from, for the summary: ``"drawn at random from the whole stage"`` or
            ``"the first of the stage"``.
    """

    config: Optional[DSMConfig]
    agreement: float
    min_agreement: float
    images: int
    trials: List[Dict[str, Any]] = field(default_factory=list)
    measure: str = "top1"
    confidence: Optional[float] = None
    where: str = "the first of the stage"

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
            stop = ""
            if t.get("stopped"):
                n = t["images"]
                why = "cannot pass" if t["agreement"] < self.min_agreement else "too few images to show the target"
                stop = f"  (stopped after {n} image{'s' * (n != 1)}: {why})"
            lines.append(
                f"{mark} {t['label']:<22} block FLOPs {t['flops_ratio']:.3f}x dense  "
                f"agreement {t['agreement']:.4f}{stop}"
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
            f"on {self.images} images, {self.where})"
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
    return _binomial_tail(math.ceil(hits - 1e-9), n, target) <= 1.0 - confidence


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0 if k <= n else 0.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(
        1.0,
        sum(
            math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q)
            for i in range(k, n + 1)
        ),
    )


def lower_bound(hits: int, n: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower confidence bound on an agreement rate from ``hits`` of ``n``.

    Example:
        >>> round(lower_bound(250, 256, 0.9), 3), lower_bound(0, 10, 0.9)
        (0.959, 0.0)
    """
    if n <= 0 or hits <= 0:
        return 0.0
    lo, hi = 0.0, hits / n
    for _ in range(60):  # bisection: the tail grows with p
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _binomial_tail(hits, n, mid) > 1.0 - confidence else (mid, hi)
    return lo


def images_needed(target: float, confidence: Optional[float]) -> int:
    """Fewest images on which a schedule can pass the guard's test with one disagreement among them.

    Example:
        >>> images_needed(0.97, 0.9), images_needed(0.99, 0.9), images_needed(0.97, None)
        (129, 388, 34)
    """
    n = 2
    while not binomial_pass(n - 1, n, target, confidence):
        n += 1
    return n


def evidence_below(hits: float, n: int, target: float) -> float:
    """Evidence (an e-value) that the true agreement is below ``target``, from ``hits`` agreements of ``n`` audited
    images: the mean over :data:`AUDIT_SHORTFALLS` of the likelihood ratio of ``target - shortfall`` against
    ``target``. Were the agreement ``>= target``, the value would ever reach ``1 / alpha`` with probability at most
    ``alpha``, however often it is looked at (Ville's inequality), so the audit may test after every batch.

    Example:
        >>> evidence_below(100, 100, 0.97) < 1 < evidence_below(80, 100, 0.97)
        True
    """
    misses = max(float(n) - hits, 0.0)
    ratios = [
        math.exp(hits * math.log(q / target) + misses * math.log((1 - q) / (1 - target)))
        for q in (target - s for s in AUDIT_SHORTFALLS)
        if q > 0.0 and target < 1.0
    ]
    return sum(ratios) / len(ratios) if ratios else 0.0


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
    level = confidence if measure == "top1" else None
    trials = _Trials(model, images, dense_logits, config, batch_size, reduce, measure, adaptive)
    trials.least_hits = least_hits(round(trials.total), min_agreement, level) if measure == "top1" else None
    candidates = guard_candidates(config)
    lo, hi = 0, len(candidates)  # candidates[hi:] pass (index len = dense); find the first passing index
    while lo < hi:
        mid = (lo + hi) // 2
        agreement = trials.agreement(candidates[mid])
        stopped = trials.records[-1]["stopped"]
        if not stopped and binomial_pass(agreement * trials.total, round(trials.total), min_agreement, level):
            hi = mid
        else:
            lo = mid + 1
    if lo == len(candidates):
        return GuardResult(None, 1.0, min_agreement, int(trials.total), trials.records, measure, level)
    chosen = trials.measured[candidates[lo]]
    return GuardResult(chosen[0], chosen[1], min_agreement, int(trials.total), trials.records, measure, level)


def least_hits(n: int, target: float, confidence: Optional[float]) -> int:
    """Fewest agreements of ``n`` that pass :func:`binomial_pass` (``n + 1`` when none do).

    Example:
        >>> least_hits(258, 0.97, 0.9), least_hits(258, 0.97, None)
        (255, 251)
    """
    return next(
        (h for h in range(math.ceil(target * n - 1e-9), n + 1) if binomial_pass(h, n, target, confidence)), n + 1
    )


#: Chunks a candidate's evaluation runs in (the same on every process, so their sums stay in step); after each, a
#: candidate that has already missed more images than a pass allows stops.
_CHUNKS = 8


class _Trials:
    """Measures candidates for :func:`quality_guard` on its images and keeps the record of each; a top-1 candidate
    stops as soon as its disagreements make a pass impossible, which is where most of the guard's cost goes."""

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
        self.least_hits: Optional[int] = None  # agreements a pass needs (top-1 only)

    def _sum(self, value: float) -> float:
        return self._sums([value])[0]

    def _sums(self, values: List[float]) -> List[float]:
        if self.reduce is None:
            return values
        return [float(v) for v in self.reduce(torch.tensor(values, dtype=torch.float64, device=self.images.device))]

    def agreement(self, candidate: DSMConfig) -> float:
        """Agreement with dense of ``candidate`` (its thresholds fitted first under adaptive merging)."""
        size = self.images.shape[-2:]
        plan = token_plan(self.model, candidate, img_size=(int(size[0]), int(size[1])))
        cfg = _fit(self.model, self.images, candidate, self.reduce) if self.adaptive else candidate
        step = max(1, math.ceil(self.images.shape[0] / _CHUNKS))
        score, seen, stopped = 0.0, 0.0, False
        apply_dsm(self.model, cfg)
        try:
            for k in range(_CHUNKS):
                chunk = self.images[k * step : (k + 1) * step]
                part = 0.0
                if chunk.shape[0]:
                    outputs = model_outputs(self.model, chunk, self.batch_size, self.images.device)
                    part = float(self.score(outputs, self.reference[k * step : (k + 1) * step]).sum())
                totals = self._sums([part, float(chunk.shape[0])])
                score, seen = score + totals[0], seen + totals[1]
                if self.least_hits is not None and seen - score > self.total - self.least_hits:
                    stopped = k + 1 < _CHUNKS or seen < self.total
                    break
        finally:
            remove_dsm(self.model)
        value = score / seen if seen else 0.0
        r = plan.r if plan.r is not None else cfg.r
        label = f"flops_target={cfg.flops_target:g}" if self.requested.r is None else f"r={r}"
        self.records.append(
            {
                "label": label,
                "config": cfg.to_dict(),
                "flops_ratio": plan.flops_ratio(*self.dims),
                "agreement": value,
                "images": int(seen),
                "stopped": stopped,
            }
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


class QualityGuard:
    """The quality guard of one stage: choose on a sample, audit while the stage runs, step down when at risk.

    1. :meth:`choose`: on images drawn at random from the whole stage (run dense by the caller), pick the most
       merging candidate of :func:`guard_candidates` that :func:`quality_guard` accepts.
    2. While the stage runs, the caller runs the batches :meth:`audits` picks (a random fraction ``audit``, decided
       per batch index so every DDP rank picks alike) dense as well and hands the agreements, summed over ranks, to
       :meth:`observe`. When the evidence that the current schedule's agreement is below the target reaches
       ``1 / (1 - confidence)`` (:func:`evidence_below`, valid however often it is tested), the guard steps to the
       next lighter candidate (or dense) and the caller applies :attr:`config`.
    3. :meth:`metrics` and :meth:`report` say what was chosen when and why, the agreement the audit measured over the
       stage with its confidence bound, and what the guard's own passes cost.

    Args:
        config: The schedule asked for (the most merging candidate).
        min_agreement: The target, in (0, 1].
        images: Images the choice is made on, over all processes; None sizes the guard for the target: at least
            256, and twice :func:`images_needed` (e.g. 776 for ``min_agreement=0.99`` at 90% confidence).
        confidence: Confidence of the choice's binomial test and of the audit's test; None compares point estimates
            and never steps down.
        audit: Fraction of the stage's batches run dense as well, to check the choice where it is applied.
        measure: ``"top1"`` or ``"cosine"`` (:data:`GUARD_MEASURES`); the audit tests only ``"top1"``.
        adaptive: Adaptive merging (thresholds fitted on the guard's images for each candidate).
        seed: Seed of the audit's choice of batches.

    Example:
        >>> guard = QualityGuard(DSMConfig(), 0.99)
        >>> guard.images, guard.audits(0) in (True, False)
        (776, True)
    """

    def __init__(
        self,
        config: DSMConfig,
        min_agreement: float = 0.97,
        *,
        images: Optional[int] = None,
        confidence: Optional[float] = 0.9,
        audit: float = 0.05,
        measure: str = "top1",
        adaptive: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 < min_agreement <= 1.0:
            raise ConfigError(f"min_agreement must be in (0, 1], got {min_agreement!r}")
        if confidence is not None and not 0.0 < confidence < 1.0:
            raise ConfigError(f"guard_confidence must be in (0, 1) or None (point estimate), got {confidence!r}")
        if not 0.0 <= audit <= 1.0:
            raise ConfigError(f"guard_audit must be a fraction of batches in [0, 1], got {audit!r}")
        if images is not None and images < 1:
            raise ConfigError(f"guard_images must be >= 1 (or None to size the guard for the target), got {images}")
        self.config, self.min_agreement, self.confidence = config, float(min_agreement), confidence
        needed = images_needed(self.min_agreement, confidence) if self.min_agreement < 1 else 256
        self.images = int(images) if images is not None else max(256, 2 * needed)
        self.too_few = images is not None and images < needed  # then a single disagreement fails every schedule
        self.needed = needed
        self.audit, self.measure, self.adaptive, self.seed = float(audit), measure, adaptive, int(seed)
        self.candidates = guard_candidates(config)
        self.result: Optional[GuardResult] = None
        self.current: Optional[int] = None  # index into candidates; None = dense (or not chosen yet)
        self._chosen_index: Optional[int] = None
        self._fit: Optional[Callable[[DSMConfig], DSMConfig]] = None
        self._ratios: List[float] = []
        self._since = [0.0, 0]  # audited agreements / images under the current schedule (all ranks)
        self.audit_hits, self.audit_images = 0.0, 0  # over the whole stage, all ranks
        self.steps: List[str] = []
        self._cost = [0.0, 0]  # this process: block-FLOP image equivalents spent, stage images
        self._first: List[Tuple[torch.Tensor, torch.Tensor]] = []  # collect(): the stage's first images, dense

    # ------------------------------------------------------------------ choose
    @property
    def schedule(self) -> Optional[DSMConfig]:
        """What should run now: the chosen (or stepped-down) schedule, None for dense."""
        if self.current is None or self.result is None:
            return None
        if self.current == self._chosen_index:
            return self.result.config
        candidate = self.candidates[self.current]
        return self._fit(candidate) if self._fit is not None else candidate

    def choose(
        self,
        model: nn.Module,
        images: torch.Tensor,
        dense: torch.Tensor,
        *,
        where: str,
        batch_size: int = 32,
        reduce: Optional[Any] = None,
    ) -> GuardResult:
        """Choose on ``images`` (this process's share; ``dense`` their dense outputs); the model is left unpatched."""
        from .adapters import get_adapter

        result = quality_guard(
            model,
            images,
            dense,
            self.config,
            self.min_agreement,
            batch_size=batch_size,
            reduce=reduce,
            measure=self.measure,
            confidence=self.confidence,
            adaptive=self.adaptive,
        )
        result.where = where
        self.result = result
        size = (int(images.shape[-2]), int(images.shape[-1]))
        dims = get_adapter(model).dims(model)
        self._ratios = [token_plan(model, c, img_size=size).flops_ratio(*dims) for c in self.candidates]
        self._chosen_index = next(
            (i for i, c in enumerate(self.candidates) if result.config is not None and _same(c, result.config)), None
        )
        self.current = self._chosen_index
        if self.adaptive:
            self._fit = lambda c: _fit(model, images, c, reduce)
        local = float(images.shape[0])
        total = max(1, result.images)
        self._cost[0] += local * (
            1.0 + sum(float(t["flops_ratio"]) * t.get("images", total) / total for t in result.trials)
        )
        return result

    def collect(
        self, images: torch.Tensor, dense: torch.Tensor, share: int
    ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Without a sample of the stage (a loader that cannot say in advance what it runs): keep the stage's first
        ``images`` and their ``dense`` outputs as they run; once this process has ``share`` of them, return them all
        (to :meth:`choose` on) and forget them."""
        self._first.append((images.detach(), dense.detach()))
        if self.collected < share:
            return None
        kept, self._first = self._first, []
        return torch.cat([i for i, _ in kept]), torch.cat([d for _, d in kept])

    @property
    def collected(self) -> int:
        """Images :meth:`collect` holds (0 once it handed them over)."""
        return sum(int(i.shape[0]) for i, _ in self._first)

    # ------------------------------------------------------------------ audit
    def audits(self, batch_idx: int, dataloader_idx: int = 0) -> bool:
        """Whether batch ``batch_idx`` is audited: a coin with probability ``audit``, the same on every process."""
        if self.audit <= 0.0:
            return False
        if self.audit >= 1.0:
            return True
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + dataloader_idx * 7_919 + batch_idx)
        return bool(torch.rand((), generator=g) < self.audit)

    def ran(self, images: int, audited: int = 0) -> None:
        """Account ``images`` of this process run with the current schedule, ``audited`` of them run dense too."""
        ratio = 1.0 if self.current is None else self._ratios[self.current]
        self._cost[0] += images * ratio + audited
        self._cost[1] += images

    def observe(self, hits: float, n: int) -> bool:
        """Add ``hits`` agreements among ``n`` audited images (summed over processes) of the current schedule;
        return True when the guard stepped down (apply :attr:`schedule` before the next batch)."""
        if n <= 0 or self.current is None:
            return False
        self.audit_hits += hits
        self.audit_images += n
        self._since[0] += hits
        self._since[1] += n
        if self.measure != "top1" or self.confidence is None:
            return False
        evidence = evidence_below(self._since[0], int(self._since[1]), self.min_agreement)
        if evidence < 1.0 / (1.0 - self.confidence):
            return False
        old = self._label(self.current)
        agreement = self._since[0] / self._since[1]
        self.current = self.current + 1 if self.current + 1 < len(self.candidates) else None
        self.steps.append(
            f"after {self.audit_images} audited images, {old} agreed {agreement:.3f} on {int(self._since[1])} of "
            f"them (evidence {evidence:.0f} against >= {self.min_agreement:.3f}): stepped to "
            f"{self._label(self.current)}"
        )
        self._since = [0.0, 0]
        return True

    def _label(self, index: Optional[int]) -> str:
        if index is None:
            return "dense"
        c = self.candidates[index]
        return f"flops_target={c.flops_target:g}" if self.config.r is None else f"r={c.r}"

    # ------------------------------------------------------------------ report
    @property
    def cost_ratio(self) -> Optional[float]:
        """Block FLOPs this process spent on the stage, the guard's dense and candidate passes and the audit's dense
        passes included, relative to running the stage dense (None before any stage image ran)."""
        return self._cost[0] / self._cost[1] if self._cost[1] else None

    def metrics(self) -> Dict[str, float]:
        """``dsm/guard_*`` and ``dsm/audit_*`` metrics."""
        out: Dict[str, float] = {}
        if self.result is not None:
            out["dsm/guard_agreement"] = self.result.agreement
            out["dsm/guard_flops_ratio"] = self.result.flops_ratio
            out["dsm/guard_images"] = float(self.result.images)
            out["dsm/guard_steps_down"] = float(len(self.steps))
        if self.audit_images:
            out["dsm/audit_images"] = float(self.audit_images)
            out["dsm/audit_agreement"] = self.audit_hits / self.audit_images
            if self.measure == "top1" and self.confidence is not None:
                out["dsm/audit_agreement_lower"] = lower_bound(
                    round(self.audit_hits), self.audit_images, self.confidence
                )
        if self.cost_ratio is not None:
            out["dsm/stage_cost_ratio"] = self.cost_ratio
        return out

    def report(self, every_batch: bool = False) -> List[str]:
        """Sentences for the stage summary: the choice, each step down, the audit's verdict and the guard's cost
        (``every_batch``: the caller compared every merged batch with dense, not only the audit's)."""
        if self.result is None:
            return []
        reason = self.result.reason()
        lines = [reason[0].upper() + reason[1:], *(s[0].upper() + s[1:] + "." for s in self.steps)]
        what = "top-1 agreement" if self.measure == "top1" else "token cosine"
        if self.audit_images:
            rate = self.audit_hits / self.audit_images
            how = "every merged batch (compare_dense)" if every_batch else f"{self.audit:.0%} of the batches, at random"
            text = f"Audit: {self.audit_images} merged images, {how}, also ran dense: {what} {rate:.3f}"
            if self.measure == "top1" and self.confidence is not None:
                low = lower_bound(round(self.audit_hits), self.audit_images, self.confidence)
                verdict = "confirmed" if low >= self.min_agreement else "not enough evidence to confirm"
                if rate < self.min_agreement:
                    verdict = "below the target"
                text += f" (>= {low:.3f} at {self.confidence:.0%} confidence: {verdict} >= {self.min_agreement:.3f})"
            lines.append(text + ".")
        elif self.current is not None and self.audit > 0:
            lines.append("Audit: no merged batch was drawn for the audit in this stage (too few batches).")
        if self.cost_ratio is not None:
            extra = " (not compare_dense's dense passes)" if every_batch else ""
            lines.append(
                f"Cost: counting the guard's passes and its {self.audit:.0%} audit{extra}, the stage spent "
                f"{self.cost_ratio:.2f}x the block FLOPs of running it dense (this process)."
            )
        return lines


def _same(a: DSMConfig, b: DSMConfig) -> bool:
    """Whether ``b`` is candidate ``a`` (``b`` may carry fitted thresholds)."""
    return a == b or a == b.replace(threshold=a.threshold)
