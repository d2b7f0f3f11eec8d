"""calibrate(): choose the DSM schedule that stays closest to the dense model under a FLOP budget.

Calibration is training-free. Every candidate (delay x local phase x schedule family x merge options) gets the ``r``
that meets the budget, so candidates cost the same planned FLOPs and differ only in quality. Quality is *fidelity to
the dense model* (mean KL divergence of the predictions by default), never accuracy on images a head was fitted on.
The calibration images are split in two interleaved halves: candidates are ranked on the *search* half (successive
halving keeps it fast), and the finalists, ToMe and the default schedule always among them, are re-scored on the
*check* half, which played no part in the ranking. The default schedule (the best one on held-out data in our
measurements) is kept unless a finalist beats it on the check half by more than two paired standard errors, and
ToMe replaces the choice when ToMe beats it that clearly: calibration never returns a schedule that is measurably
worse than ToMe on data it did not choose on. ``stable`` says whether the check half ranks the search winner first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .config import DSMConfig
from .outputs import collect_batches, model_outputs
from .patch import apply_dsm, get_config, is_patched, remove_dsm, token_plan

__all__ = ["CalibrationResult", "calibrate", "default_search_space"]

#: Merge options every schedule family is tried with: ToMe's keys, and token features with protected tokens.
MERGE_OPTIONS: Tuple[Dict[str, Any], ...] = ({"metric": "keys", "protect": 0.0}, {"metric": "tokens", "protect": 0.2})
_TOME = {"delay": 0, "local_blocks": 0, "schedule": "constant", "metric": "keys", "protect": 0.0, "matching": "tome"}


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate`.

    Attributes:
        config: The chosen schedule, with the explicit ``r`` chosen at the calibration input size.
        score: Its top-1 agreement with dense (accuracy with ``metric="accuracy"``) on the check half, images
            that played no part in the ranking.
        flops_ratio: Its planned block FLOPs relative to dense.
        metric: ``"kl"``, ``"agreement"`` or ``"accuracy"``: what candidates were ranked by.
        seconds: Wall time of the whole search, dense pass included.
        images: Calibration images used (both halves).
        candidates: One dict per candidate: config fields, ``r``, ``flops_ratio``; search-half ``kl``,
            ``agreement``, ``score`` and ``images``; for finalists also ``check_kl``, ``check_agreement``,
            ``check_score``.
        stable: Whether the check half ranks the search winner first among the finalists as well.
        fell_back_to_tome: True when ToMe beat the choice on the check half by more than two paired standard
            errors and was returned instead.
    """

    config: DSMConfig
    score: float
    flops_ratio: float
    metric: str
    seconds: float
    images: int
    candidates: List[Dict[str, Any]] = field(default_factory=list)
    stable: bool = True
    fell_back_to_tome: bool = False

    def table(self) -> str:
        """Printable ranking of the candidates (``->`` marks the chosen one; check-half columns for finalists)."""
        lines = [
            f"   {'delay':>5} {'local':>5} {'schedule':>12} {'metric':>6} {'prot':>4} {'r':>7} {'FLOPs':>6} "
            f"{'KL':>7} {'agree':>6} {'images':>6} {'check KL':>8} {'check agree':>11}"
        ]
        chosen = self.config.replace(r=None).to_dict()
        for c in sorted(self.candidates, key=lambda c: (-c["images"], c["kl"])):
            mark = "->" if c["config"] == chosen else "  "
            check = f"{c['check_kl']:>8.4f} {c['check_agreement']:>11.4f}" if "check_kl" in c else ""
            lines.append(
                f"{mark} {c['delay']:>5} {c['local_blocks']:>5} {c['schedule']:>12} {c['metric']:>6} "
                f"{c['protect']:>4.2f} {c['r']:>7.4g} {c['flops_ratio']:>6.3f} {c['kl']:>7.4f} "
                f"{c['agreement']:>6.4f} {c['images']:>6} {check}"
            )
        lines.append(
            f"ranked on the search half, checked on {self.images // 2} other images: "
            f"{'stable' if self.stable else 'unstable (the check half ranks another finalist first)'}"
            f"{'; ToMe beat the choice there by > 2 paired SE and was returned' if self.fell_back_to_tome else ''}"
        )
        return "\n".join(lines)


def default_search_space(depth: int) -> List[Dict[str, Any]]:
    """Delays 0..depth/4 x local phase {none, 2 blocks of 2x2 windows} x :data:`MERGE_OPTIONS`, proportional r,
    plus official ToMe (delay 0, no local phase, constant r, keys, ToMe's matching order)."""
    space = [dict(_TOME)]
    for delay in range(0, max(1, depth // 4) + 1):
        for local_blocks in (0, 2):
            for options in MERGE_OPTIONS:
                space.append({"delay": delay, "local_blocks": local_blocks, "schedule": "proportional", **options})
    return space


@dataclass(eq=False)
class _Candidate:
    """One schedule under evaluation: its config (``r`` chosen for the budget), planned FLOPs and running scores."""

    fields: Dict[str, Any]  # the DSMConfig fields shown in the table (r=None: chosen per input size)
    fixed: DSMConfig  # the config with the explicit r that meets the budget at the calibration size
    flops_ratio: float
    sums: Tuple[float, float, float] = (0.0, 0.0, 0.0)  # search half: hits, agreements, KL
    images: int = 0
    check: Optional[Dict[str, float]] = None  # check half: score, agreement, kl
    loss: Optional[torch.Tensor] = None  # check half, per image (paired comparisons)

    def add(self, hits: torch.Tensor, agree: torch.Tensor, kl: torch.Tensor) -> None:
        """Add search-half images."""
        self.sums = tuple(a + float(b.sum()) for a, b in zip(self.sums, (hits, agree, kl)))  # type: ignore[assignment]
        self.images += int(hits.numel())

    def mean(self, index: int) -> float:
        return self.sums[index] / self.images

    def rank(self, metric: str) -> Tuple[float, float]:
        """Sort key on the search half: KL, or (−score, KL)."""
        kl = self.mean(2)
        return (kl, 0.0) if metric == "kl" else (-self.mean(0), kl)

    def as_dict(self) -> Dict[str, Any]:
        """The public record in :attr:`CalibrationResult.candidates`."""
        out = {**self.fields, "config": self.fixed.replace(r=None).to_dict(), "r": self.fixed.r, "images": self.images}
        out.update(flops_ratio=self.flops_ratio, score=self.mean(0), agreement=self.mean(1), kl=self.mean(2))
        if self.check is not None:
            out.update({f"check_{k}": v for k, v in self.check.items()})
        return out


class _Scorer:
    """Runs a candidate on calibration images and scores it against the dense model, per image."""

    def __init__(
        self, model: nn.Module, images: torch.Tensor, dense: torch.Tensor, reference: torch.Tensor, batch_size: int
    ) -> None:
        self.model, self.images, self.batch_size = model, images, batch_size
        self.device = next(model.parameters()).device
        self.dense_logp, self.dense_top1, self.reference = dense.log_softmax(-1), dense.argmax(-1), reference

    def __call__(self, cand: _Candidate, idx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per image of ``images[idx]``: hit vs the reference, top-1 agreement with dense, KL to dense."""
        apply_dsm(self.model, cand.fixed)
        try:
            logits = model_outputs(self.model, self.images[idx], self.batch_size, self.device)
        finally:
            remove_dsm(self.model)
        top1 = logits.argmax(-1)
        kl = torch.nn.functional.kl_div(
            logits.log_softmax(-1), self.dense_logp[idx], log_target=True, reduction="none"
        ).sum(-1)
        return (top1 == self.reference[idx]).float(), (top1 == self.dense_top1[idx]).float(), kl


def calibrate(
    model: nn.Module,
    dataloader: Iterable,
    target: float = 0.55,
    *,
    metric: str = "kl",
    max_images: int = 256,
    batch_size: int = 32,
    search_space: Optional[Sequence[Dict[str, Any]]] = None,
    keep: int = 3,
    prop_attn: bool = True,
    verbose: bool = True,
) -> CalibrationResult:
    """Choose delay / local phase / schedule / merge options / r for ``model`` under a FLOP budget.

    Args:
        model: A supported ViT classifier (patched or not; it is left as it was).
        dataloader: Yields images, ``(images, labels)`` or dicts with ``image``/``target``. Labels are only used
            with ``metric="accuracy"``.
        target: Budget as a fraction of the dense model's block FLOPs (0.55 = 1.8x fewer).
        metric: ``"kl"`` (mean KL divergence of the merged predictions from the dense ones, lower is better),
            ``"agreement"`` (top-1 agreement with dense; ties broken by KL) or ``"accuracy"`` (needs labels; only
            meaningful on images nothing was fitted on).
        max_images: Calibration images to use (split into a search and a check half).
        batch_size: Batch size of the search's forward passes.
        search_space: Dicts of :class:`DSMConfig` fields (without ``r``); default :func:`default_search_space`.
            ToMe is added when missing.
        keep: Candidates kept after the first half of the search half (ToMe and the default are always kept).
        prop_attn: Proportional attention in every candidate.
        verbose: Progress bar (tqdm) over candidate evaluations.

    Returns:
        A :class:`CalibrationResult`; ``result.config`` goes straight into ``apply_dsm`` or ``DSMCallback``.
    """
    start = time.perf_counter()
    _check_arguments(metric, target)
    was = get_config(model)
    if is_patched(model):
        remove_dsm(model)
    images, labels = collect_batches(dataloader, max_images)
    model.eval()
    try:
        scorer = _scorer(model, images, labels, metric, batch_size)
        candidates = _candidates(model, search_space, target, prop_attn, tuple(images.shape[-2:]))
        finalists, incumbent, tome = _search(candidates, scorer, metric, keep, verbose)
        best, fell_back = _choose(finalists, incumbent, tome)
    finally:
        if was is not None:
            apply_dsm(model, was)
    assert best.check is not None
    stable = min(finalists, key=lambda c: float(c.loss.mean())) is finalists[0]  # type: ignore[union-attr]
    return CalibrationResult(
        best.fixed,
        best.check["score"] if metric != "kl" else best.check["agreement"],
        best.flops_ratio,
        metric,
        time.perf_counter() - start,
        int(images.shape[0]),
        [c.as_dict() for c in candidates],
        stable,
        fell_back,
    )


def _check_arguments(metric: str, target: float) -> None:
    if metric not in ("kl", "agreement", "accuracy"):
        raise ValueError(f"metric must be 'kl', 'agreement' or 'accuracy', got {metric!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
        raise ValueError(
            f"target={target!r}: the budget is a fraction of the dense block FLOPs in (0, 1], e.g. 0.55 "
            f"for 1.8x fewer FLOPs"
        )


def _scorer(
    model: nn.Module, images: torch.Tensor, labels: Optional[torch.Tensor], metric: str, batch_size: int
) -> _Scorer:
    """Run the dense model once on the calibration images, check what it gives, and build the scorer."""
    if metric == "accuracy" and labels is None:
        raise ValueError("metric='accuracy' needs labels from the dataloader; use metric='kl' (no labels needed)")
    if images.shape[0] < 2:
        raise ValueError(f"calibrate needs at least 2 images (a search and a check half), got {images.shape[0]}")
    dense = model_outputs(model, images, batch_size, next(model.parameters()).device)
    bad = (~torch.isfinite(dense).all(dim=-1)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"the dense model gives non-finite outputs (nan/inf) for calibration image(s) {bad[:10]} "
            f"(0-based, in loader order); check those inputs"
        )
    classes = dense.shape[-1]
    if metric == "accuracy" and labels is not None and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(
            f"labels must be class indices in [0, {classes}) for this model's {classes} outputs, got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    reference = labels if metric == "accuracy" and labels is not None else dense.argmax(-1)
    return _Scorer(model, images, dense, reference, batch_size)


def _candidates(
    model: nn.Module,
    search_space: Optional[Sequence[Dict[str, Any]]],
    target: float,
    prop_attn: bool,
    img_size: Tuple[int, ...],
) -> List[_Candidate]:
    """Every schedule of the search space (ToMe added) that fits the model, each with the r meeting ``target``."""
    from .adapters import get_adapter

    adapter = get_adapter(model)
    space = list(search_space) if search_space is not None else default_search_space(adapter.depth(model))
    if not any(_matches(c, _TOME) for c in space):
        space.append(dict(_TOME))
    shown = ("delay", "local_blocks", "windows", "schedule", "metric", "protect", "matching")
    out = []
    for fields in space:
        try:
            cfg = DSMConfig(**{**fields, "r": None, "flops_target": target, "prop_attn": prop_attn})
            plan = token_plan(model, cfg, img_size=(int(img_size[0]), int(img_size[1])))
        except ValueError:
            continue
        ratio = plan.flops_ratio(*adapter.dims(model))
        out.append(_Candidate({k: getattr(cfg, k) for k in shown}, cfg.replace(r=plan.r), ratio))
    if not out:
        raise ValueError("no candidate schedule fits this model and input size; widen the search space")
    return out


def _search(
    candidates: List[_Candidate], scorer: _Scorer, metric: str, keep: int, verbose: bool
) -> Tuple[List[_Candidate], Optional[_Candidate], _Candidate]:
    """Successive halving on the search half, then the finalists on the check half; returns the finalists
    (search-half order), the default schedule's candidate (None if not searched) and ToMe's."""
    from tqdm.auto import tqdm

    order = torch.arange(scorer.images.shape[0])
    search, check = order[0::2], order[1::2]
    quick = search[: max(1, search.numel() // 2)]
    rest = search[quick.numel() :]
    tome = next(c for c in candidates if _matches(c.fields, _TOME))
    default = DSMConfig().to_dict()
    incumbent = next((c for c in candidates if _matches(c.fields, {k: default[k] for k in _TOME})), None)
    total = len(candidates) + 2 * min(len(candidates), keep + 2)
    with tqdm(total=total, desc="calibrate", unit="candidate", disable=not verbose) as bar:
        for cand in candidates:
            cand.add(*scorer(cand, quick))
            bar.update()
        finalists = sorted(candidates, key=lambda c: c.rank(metric))[:keep]
        finalists += [c for c in (incumbent, tome) if c is not None and c not in finalists]
        for cand in finalists if rest.numel() else ():
            cand.add(*scorer(cand, rest))
            bar.update()
        finalists.sort(key=lambda c: c.rank(metric))
        for cand in finalists:
            hits, agree, kl = scorer(cand, check)
            cand.check = {"score": float(hits.mean()), "agreement": float(agree.mean()), "kl": float(kl.mean())}
            cand.loss = kl if metric == "kl" else 1.0 - hits
            bar.update()
    return finalists, incumbent, tome


def _choose(finalists: List[_Candidate], incumbent: Optional[_Candidate], tome: _Candidate) -> Tuple[_Candidate, bool]:
    """The default schedule (measured best on held-out data) stays unless a finalist beats it on the check half by
    more than two paired standard errors; ToMe replaces the choice when it does the same. Returns the choice and
    whether ToMe replaced it."""
    check_winner = min(finalists, key=lambda c: float(c.loss.mean()))  # type: ignore[union-attr]
    best = incumbent if incumbent is not None else finalists[0]
    if check_winner is not best and _beats(check_winner.loss, best.loss):  # type: ignore[arg-type]
        best = check_winner
    if best is not tome and _beats(tome.loss, best.loss):  # type: ignore[arg-type]
        return tome, True
    return best, False


def _beats(loss_a: torch.Tensor, loss_b: torch.Tensor, z: float = 2.0) -> bool:
    """Whether per-image losses ``a`` are lower than ``b`` by more than ``z`` paired standard errors."""
    diff = loss_b - loss_a
    if diff.numel() < 2:
        return bool(diff.mean() > 0)
    return bool(diff.mean() > z * diff.std(unbiased=True) / diff.numel() ** 0.5)


def _matches(c: Dict[str, Any], fields: Dict[str, Any]) -> bool:
    """Whether candidate fields ``c`` (missing ones at DSMConfig's defaults) equal ``fields``."""
    return all(c.get(k, getattr(DSMConfig, k)) == v for k, v in fields.items())
