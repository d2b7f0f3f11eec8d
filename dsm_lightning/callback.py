"""DSMCallback: merge tokens during validation / test / predict, never during training.

Like Lightning's ``WeightAveraging``: patch at stage start, restore at stage end, with ``on_exception`` and
``teardown`` as safety nets. The callback's own settings travel in its ``state_dict``; nothing of DSM enters the
model's weights or checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import TYPE_CHECKING, Any, Dict, Iterator, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from .adapters import UnsupportedModelError, get_adapter
from .adaptive import BudgetKeeper
from .config import DSMConfig
from .errors import ModelAttributeError
from .guard import GUARD_MEASURES, GuardResult, QualityGuard
from .measure import StageMeter, images_of, num_classes_of, sync
from .outputs import model_outputs, output_tensor
from .patch import apply_dsm, get_config, is_patched, remove_dsm, token_plan, unpatched
from .regional import compile_blocks

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["DSMCallback", "find_vit"]

_STAGES = ("validate", "test", "predict")
_DEFAULT_CONFIG = DSMConfig()
#: Default of ``DSMCallback(min_agreement=...)``: chosen from held-out measurements (README, "Accuracy vs speed").
DEFAULT_MIN_AGREEMENT: Optional[float] = 0.97
#: Default of ``DSMCallback(guard_confidence=...)`` (README, "The quality guard").
DEFAULT_GUARD_CONFIDENCE: Optional[float] = 0.9
#: Default of ``DSMCallback(guard_audit=...)``: the fraction of a stage's batches that also run dense.
DEFAULT_GUARD_AUDIT = 0.05
#: Marks the compiled forward the callback put on the ViT (so only that one is taken off again).
_COMPILED_BY_CALLBACK = "_dsm_callback_compiled"


def find_vit(module: nn.Module, attr: Optional[str] = None) -> Tuple[str, nn.Module]:
    """Return ``(name, vit)``: ``module.<attr>`` if given, else the first supported ViT among its submodules."""
    if attr:
        target: Any = module
        for part in attr.split("."):
            if not hasattr(target, part):
                raise ModelAttributeError(f"DSMCallback(model_attr={attr!r}): {type(module).__name__} has no {part!r}")
            target = getattr(target, part)
        get_adapter(target)  # raises with the list of supported types
        return attr, target
    for name, sub in module.named_modules():
        try:
            get_adapter(sub)
        except UnsupportedModelError:
            continue
        return name, sub
    raise UnsupportedModelError(
        f"DSMCallback found no supported ViT inside {type(module).__name__}. Wrap a timm VisionTransformer or a "
        f"torchvision VisionTransformer in the LightningModule, pass model_attr='name.of.vit' (--dsm.model_attr on "
        f"the command line), or register an adapter for your model (docs/models.md, 'Custom ViTs')."
    )


def _config(config: Any, fields: Dict[str, Any]) -> DSMConfig:
    """``config``, or DSMConfig's defaults with ``fields`` (the ``DSMCallback(delay=4)`` shorthand)."""
    if config is None:
        config = DSMConfig()
    if not isinstance(config, DSMConfig):
        raise TypeError(f"DSMCallback(config=...) takes a DSMConfig, got {type(config).__name__}")
    if not fields:
        return config
    names = DSMConfig.field_names()
    unknown = sorted(set(fields) - set(names))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; DSMConfig fields are {list(names)}"
        raise TypeError(f"DSMCallback got an unexpected argument {unknown[0]!r}{hint}")
    if config != DSMConfig():
        raise ValueError(f"pass either config= or the DSMConfig fields {sorted(fields)}, not both")
    return DSMConfig.from_dict({k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _check_stages(stages: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    stages = (stages,) if isinstance(stages, str) else tuple(stages)
    bad = set(stages) - set(_STAGES)
    if bad:
        raise ValueError(f"stages must be a subset of {_STAGES}, got {sorted(bad)}")
    return stages


def _check_compile(compile: Any) -> Any:
    """``DSMCallback(compile=...)`` as stored: None, ``"blocks"`` or a dict of ``torch.compile`` arguments."""
    if compile is True:
        compile = {"fullgraph": True}
    if compile is not False and compile != "blocks" and not isinstance(compile, dict):
        raise ValueError(
            f"compile must be True, False, 'blocks' or a dict of torch.compile keyword arguments, got {compile!r}"
        )
    return compile or None


def _check_guard(
    min_agreement: Optional[float], guard_images: Optional[int], guard_confidence: Optional[float], audit: float
) -> None:
    if min_agreement is not None and not 0.0 < float(min_agreement) <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1] or None (guard off), got {min_agreement!r}")
    if guard_images is not None and guard_images < 1:
        raise ValueError(f"guard_images must be >= 1 (or None to size the guard for the target), got {guard_images}")
    if guard_confidence is not None and not 0.0 < float(guard_confidence) < 1.0:
        raise ValueError(f"guard_confidence must be in (0, 1) or None (point estimate), got {guard_confidence!r}")
    if not 0.0 <= float(audit) <= 1.0:
        raise ValueError(f"guard_audit must be a fraction of batches in [0, 1], got {audit!r}")


class DSMCallback(Callback):
    """Apply Delayed Spatial Merging to the ViT inside a LightningModule for evaluation stages.

    ``DSMCallback()`` merges with :class:`~dsm_lightning.DSMConfig`'s defaults (a proportional ``r`` chosen per
    input size for ``flops_target=0.55`` of the dense block FLOPs, about 1.8x fewer; token-feature matching with the
    most class-attended tokens protected). The schedule is one object, ``config``; as a shorthand, fields of
    :class:`~dsm_lightning.DSMConfig` may be passed by name, so ``DSMCallback(delay=4)`` is
    ``DSMCallback(DSMConfig(delay=4))`` (on the command line ``--dsm.delay=4`` is ``--dsm.config.delay=4``).
    Either way the quality guard (``min_agreement``) checks agreement with the dense model and merges less if needed.

    The callback is a lifecycle: at the start of each of its ``stages`` it binds the ViT, lets the
    :class:`~dsm_lightning.guard.QualityGuard` choose and patches; between batches it hands audits to the guard and
    applies its step-downs; at the end (and on exceptions, in ``teardown`` and before ``fit``) it restores the model
    exactly and logs what it measured through Lightning (rank zero prints).

    Args:
        config: The schedule to merge with (:class:`~dsm_lightning.DSMConfig`; every field with its default and
            docstring under ``--dsm.config.*`` on the command line).
        stages: Which of ``"validate"`` (includes validation during fit and the sanity check), ``"test"``,
            ``"predict"`` merge (one name or a sequence).
        model_attr: Dotted attribute of the ViT inside the LightningModule; default: the first supported ViT found.
        compare_dense: Also run the dense model on every batch and log top-1 agreement and dense images/s.
        log_summary: Log the per-block token/FLOP table on rank zero at stage start.
        compile: ``torch.compile`` the patched ViT's ``forward`` for the evaluation stages (``True`` for
            ``fullgraph=True`` with the default inductor backend, or a dict of ``torch.compile`` keyword arguments);
            the uncompiled model is restored at stage end. Graphs are reused across batches (the batch dimension
            becomes dynamic after the first change) and there is one per input resolution. ``"blocks"`` compiles
            each block instead (:func:`~dsm_lightning.compile_blocks`): about 40% of the cold compile time, two
            graphs whatever the input size, a little slower per batch (README, "Small batches"); the dense comparison
            (``compare_dense``) then runs through the same compiled blocks, so both sides are compiled alike.
        min_agreement: Quality guard (:class:`~dsm_lightning.guard.QualityGuard`). At each stage's start,
            ``guard_images`` images drawn at random from the whole stage (whatever its order: class folders arrive
            sorted) run dense and with the requested schedule and schedules that merge less (keeping what you fixed,
            such as ``delay``); the stage then merges with the most merging one that reaches ``min_agreement``
            (dense if none does). While the stage runs, a random ``guard_audit`` fraction of its batches also run
            dense, and the guard steps to a lighter schedule as soon as they show the target at risk. The summary
            and the ``dsm/guard_*`` and ``dsm/audit_*`` metrics say what was chosen, when and why, and what the audit
            measured. ``None`` switches the guard off. For a ViT without a classifier head (a backbone under a
            dense-prediction head, an HF encoder) agreement is the mean per-token cosine similarity of its outputs
            with dense (:func:`~dsm_lightning.outputs.token_cosine`) instead. A loader whose indices cannot be known
            before it runs (an iterable dataset) gets the guard on its first images instead.
        guard_images: Images the guard chooses on, over all processes (each DDP rank draws its share); None sizes
            it for the target (256, or twice :func:`~dsm_lightning.guard.images_needed`: 776 for 0.99).
        guard_confidence: With a classifier, the guard takes a schedule only when a one-sided binomial test on its
            images shows agreement >= ``min_agreement`` at this confidence
            (:func:`~dsm_lightning.guard.binomial_pass`), so a schedule whose true agreement is below the target
            is chosen with probability at most ``1 - guard_confidence``, and the audit steps down at the same
            level; ``None`` compares the observed agreement with the target (no guarantee, no step-down).
        guard_audit: Fraction of each stage's batches (chosen at random, alike on every rank) that also run dense
            to check the guard's choice where it is applied; 0 turns the audit off.
        adaptive: Adaptive merging (:attr:`DSMConfig.threshold <dsm_lightning.DSMConfig>`): the guard fits each
            candidate's per-block thresholds on its images (:func:`~dsm_lightning.fit_thresholds`) so that they
            spend the candidate's planned FLOPs on average, and each image then merges as much as its content
            allows. Needs the guard (``min_agreement``), or a ``config`` whose thresholds are already fitted.
            ``dsm/gflops_per_image`` is then the stage's average per image of what batches spent, padding
            included.
        keep_budget: Under adaptive merging, hold the stage's block FLOPs to the fixed plan's (the budget the
            thresholds were fitted to; within 0.5% in random and class-sorted stages in
            ``benchmarks/results/threshold_drift.md``) with a :class:`~dsm_lightning.adaptive.BudgetKeeper`: when
            the stage's images turn out more or less redundant than the ones the thresholds were fitted on, it
            shifts every threshold by one offset (a few times per stage, between batches; the audit keeps checking
            quality). The summary and ``dsm/block_flops_spent`` / ``dsm/block_flops_target`` say what the stage
            spent against the target either way; ``False`` keeps the thresholds as fitted.

        **fields: :class:`~dsm_lightning.DSMConfig` fields by name (``delay=4``), applied to ``config``'s defaults;
            not together with a non-default ``config``.

    Example:
        >>> callback = DSMCallback(delay=4, compare_dense=True)  # Trainer(callbacks=[callback])
        >>> callback.config.delay, callback.min_agreement, callback.stages
        (4, 0.97, ('validate', 'test', 'predict'))
    """

    def __init__(
        self,
        config: DSMConfig = _DEFAULT_CONFIG,
        *,
        stages: Sequence[str] = _STAGES,
        model_attr: Optional[str] = None,
        compare_dense: bool = False,
        log_summary: bool = True,
        compile: Any = False,
        min_agreement: Optional[float] = DEFAULT_MIN_AGREEMENT,
        guard_images: Optional[int] = None,
        guard_confidence: Optional[float] = DEFAULT_GUARD_CONFIDENCE,
        guard_audit: float = DEFAULT_GUARD_AUDIT,
        adaptive: bool = False,
        keep_budget: bool = True,
        **fields: Any,
    ) -> None:
        self.config = _config(config, fields)
        self.stages = _check_stages(stages)
        self.model_attr = model_attr
        self.compare_dense = compare_dense
        self.log_summary = log_summary
        self.compile = _check_compile(compile)
        _check_guard(min_agreement, guard_images, guard_confidence, guard_audit)
        self.min_agreement = None if min_agreement is None else float(min_agreement)
        self.guard_images = None if guard_images is None else int(guard_images)
        self.guard_confidence = None if guard_confidence is None else float(guard_confidence)
        self.guard_audit = float(guard_audit)
        if adaptive and self.min_agreement is None and self.config.threshold is None:
            raise ValueError(
                "adaptive=True fits its thresholds on the quality guard's images, but min_agreement=None turns the "
                "guard off; keep min_agreement, or pass config=fit_thresholds(model, images, config)"
            )
        self.adaptive = bool(adaptive)
        self.keep_budget = bool(keep_budget)
        self._keeper: Optional[BudgetKeeper] = None  # adaptive merging: holds the stage to its FLOP budget
        self._pending: Optional[DSMConfig] = None  # the keeper's shifted thresholds, applied at the batch's end
        self.quality: Optional[QualityGuard] = None  # this stage's guard (choice, audit, report)
        self._audit = _BatchAudit()  # the running batch's dense comparison, if it has one
        self._measure = "top1"  # set in setup: "cosine" for a ViT without a classifier head
        self._stage: Optional[str] = None  # the stage running now (None between stages): the one phase field
        self._trainer: Optional[Trainer] = None
        self.metrics: Dict[str, float] = {}
        self._vit: Optional[nn.Module] = None
        self._vit_name: Optional[str] = None
        self._hooks: list = []
        self._agree: Optional[Metric] = None
        self._meter = StageMeter(compare_dense)
        self._busy = False  # while the callback itself runs the model (FLOP count, dense comparison): see _itself
        self._user_config: Optional[DSMConfig] = None  # the patch a user applied before the stage, put back after

    # ------------------------------------------------------------------ setup / state
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        try:
            self._bind(pl_module)
        except (UnsupportedModelError, AttributeError):
            if not is_overridden("configure_model", pl_module, LightningModule):
                raise
            # the ViT may be made in configure_model, which Lightning calls after setup: _start looks again

    def _bind(self, pl_module: LightningModule) -> None:
        """Find the ViT and check the config against it (again at every stage start: ``configure_model`` runs after
        ``setup`` and may create or replace it)."""
        self._vit_name, self._vit = find_vit(pl_module, self.model_attr)
        adapter = get_adapter(self._vit)
        adapter.check(self._vit)
        token_plan(self._vit, self.config)  # a config impossible for this model fails here, before any work
        if self.compare_dense:
            from torchmetrics.classification import MulticlassAccuracy

            num_classes = self._num_classes("compare_dense=True measures top-1 agreement")
            self._agree = MulticlassAccuracy(num_classes=num_classes, average="micro").to(pl_module.device)
        # The guard compares top-1 predictions of a classifier, or the output tokens of a backbone (no head).
        self._measure = "top1" if num_classes_of(self._vit) is not None else "cosine"

    @property
    def state_key(self) -> str:
        """One key per ``model_attr``, so a Trainer can hold a callback per ViT (e.g. a student and a teacher)."""
        return self._generate_state_key(model_attr=self.model_attr)

    # No state_dict: the callback holds no state worth a checkpoint, and settings come from the constructor only (a
    # checkpoint must not silently replace what the user asked for).

    # ------------------------------------------------------------------ patch / restore
    def _start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages:
            return
        self._bind(pl_module)
        assert self._vit is not None
        self._stage, self._trainer = stage, trainer
        if self._agree is not None:
            self._agree = self._agree.to(pl_module.device)
        self._meter = StageMeter(self.compare_dense, self._agree)  # fresh each stage (FLOPs, timings, agreement)
        # A model the user patched runs dense for the guard and the comparison; _restore puts their patch back.
        self._user_config = get_config(self._vit)
        remove_dsm(self._vit)
        self.quality = None
        self._keeper, self._pending = None, None
        if self.min_agreement is None or trainer.sanity_checking:
            self._patch(self.config)
        else:
            self._guard_start(trainer, pl_module, stage)
        self._hooks = [
            self._vit.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self._vit.register_forward_hook(self._post_hook, with_kwargs=True),
        ]

    @property
    def guard(self) -> Optional[GuardResult]:
        """The guard's choice in the current (or last) stage, None before it chose or with the guard off."""
        return None if self.quality is None else self.quality.result

    def _guard_start(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Make the stage's :class:`QualityGuard` and let it choose on images drawn from the whole stage (or, when
        the loader cannot tell in advance what it will run, on the stage's first images as they arrive)."""
        from .sampling import sample_stage_inputs

        assert self._vit is not None and self.min_agreement is not None
        quality = QualityGuard(
            self.config,
            self.min_agreement,
            images=self.guard_images,
            confidence=self.guard_confidence,
            audit=self.guard_audit,
            measure=self._measure,
            adaptive=self.adaptive,
        )
        self.quality = quality
        if quality.too_few:
            rank_zero_warn(
                f"DSM quality guard: guard_images={quality.images} can never pass a schedule that disagrees with "
                f"dense even once: min_agreement={self.min_agreement:g}{_level(self.guard_confidence)} "
                f"needs {quality.needed} images for that; pass guard_images=None to size the guard for the target"
            )
        share = self._guard_share()
        drawn = sample_stage_inputs(trainer, pl_module, self._vit, stage, share, batch_size=self._batch_size(trainer))
        if drawn is None:
            return  # the first images run dense and _guard_step chooses on them
        images, stage_images = drawn
        where = "drawn at random from the whole stage" if images.shape[0] < stage_images else "all of the stage"
        self._choose(images, where)

    def _guard_share(self) -> int:
        """This process's share of the guard's images (each DDP rank draws its own)."""
        assert self.quality is not None and self._trainer is not None
        return math.ceil(self.quality.images / max(1, self._trainer.world_size))

    def _batch_size(self, trainer: Trainer) -> int:
        from .sampling import stage_loaders

        loaders, _ = stage_loaders(trainer, self._stage or "validate")
        return max(1, int(getattr(loaders[0], "batch_size", None) or 32)) if loaders else 32

    def _choose(self, images: torch.Tensor, where: str, dense: Optional[torch.Tensor] = None) -> None:
        """The guard chooses on ``images`` (their dense outputs computed here unless given); merge with its choice."""
        assert self._vit is not None and self._trainer is not None and self.quality is not None
        strategy = self._trainer.strategy

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(t, reduce_op="sum")

        batch = self._batch_size(self._trainer)
        with self._itself():
            if dense is None:
                dense = model_outputs(self._vit, images, batch, images.device)
            _check_outputs(self._vit, dense, self._measure)
            result = self.quality.choose(self._vit, images, dense, where=where, batch_size=batch, reduce=reduce)
        self._say(result.summary())
        if result.config is not None:
            self._patch(result.config)
        elif self._measure == "top1" and result.images < self.quality.needed:
            rank_zero_warn(
                f"DSM ran dense: the guard's {result.images} images cannot show top-1 agreement >= "
                f"{result.min_agreement:g}{_level(self.guard_confidence)} (that needs {self.quality.needed} "
                f"or more with one disagreement); with so few images, {_CALIBRATE_FIRST}"
            )

    def _patch(self, config: DSMConfig) -> None:
        """Apply ``config`` (and compile) to the ViT, and print its plan (not for the keeper's shifts)."""
        assert self._vit is not None and self._trainer is not None
        apply_dsm(self._vit, config)
        shifted = self._keeper is not None and config is self._keeper.config and self._keeper.changes > 0
        adapter = get_adapter(self._vit)
        dims, plan = adapter.dims(self._vit), token_plan(self._vit)
        if config.threshold is not None:  # adaptive: token counts follow the data, so count FLOPs per batch
            self._meter.count_tokens(list(adapter.blocks(self._vit)), dims)
            if not shifted:  # the keeper accounts for every adaptive stage; it shifts thresholds with keep_budget
                self._keeper = BudgetKeeper(config, plan.flops_ratio(*dims), hold=self.keep_budget)
        if self.compile == "blocks":
            compile_blocks(self._vit)  # remove_dsm (in _restore) takes the compiled block forwards away again
        elif self.compile is not None:
            # Compile forward only (an instance attribute shadowing the class method): the timing hooks stay eager.
            options = self.compile if config.threshold is None else {**self.compile, "fullgraph": False}
            compiled = torch.compile(self._vit.forward, **options)
            setattr(compiled, _COMPILED_BY_CALLBACK, True)
            self._vit.forward = compiled
        trainer = self._trainer
        if self.log_summary and trainer.is_global_zero and not trainer.sanity_checking and not shifted:
            self._say(f"DSM on '{self._vit_name or 'model'}' for {self._stage} ({config}):\n{plan.table(*dims)}")

    def _guard_step(self, images: torch.Tensor, output: Any) -> None:
        """Without a sample of the stage: the guard collects the first images run dense, then chooses on them."""
        logits = output_tensor(output)
        assert self._trainer is not None and self.quality is not None
        _check_outputs(self._vit, logits, self._measure)
        assert logits is not None
        first = self.quality.collect(images, logits, self._guard_share())
        if first is not None:
            self._choose(first[0], "the first of the stage, run dense", first[1])

    def _unpatch(self) -> None:
        """Take this callback's patch (and compiled forward) off the ViT; a no-op between stages."""
        self._meter.stop_counting()
        if self._vit is None or self._stage is None:
            return
        if getattr(self._vit.__dict__.get("forward"), _COMPILED_BY_CALLBACK, False):
            del self._vit.forward  # the class's forward again
        if is_patched(self._vit):  # in a stage the user's own patch is off (see _start), so this one is ours
            remove_dsm(self._vit)

    def _swap(self, config: Optional[DSMConfig]) -> None:
        """Replace this callback's patch by ``config`` (None: dense) between two batches."""
        self._unpatch()
        if config is not None:
            self._patch(config)

    def _restore(self) -> None:
        """End the stage: hooks off, the model exactly as before it (the user's own patch back on)."""
        self._audit = _BatchAudit()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._unpatch()
        self._stage = None
        if self._vit is not None and self._user_config is not None:
            apply_dsm(self._vit, self._user_config)
            self._user_config = None

    @contextlib.contextmanager
    def _itself(self) -> Iterator[None]:
        """While the callback runs the model itself (the guard's passes, FLOP counts, dense comparisons), its own
        hooks stay quiet."""
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def _end(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or self._vit is None:
            return
        self._restore()

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "validate")

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "validate")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._end(trainer, pl_module, "test")

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(trainer, pl_module, "predict")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "predict")
        self._end(trainer, pl_module, "predict")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()  # belt and braces: training never runs with this callback's patch

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restore()

    def _say(self, message: str) -> None:
        """Print on rank zero through the progress bar (so the line is not glued to the end of a live bar)."""
        trainer = self._trainer
        if trainer is None or not trainer.is_global_zero:
            return
        bar = trainer.progress_bar_callback
        bar.print(message) if bar is not None else print(message)

    # ------------------------------------------------------------------ measurement (measure.StageMeter)
    def _pre_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        if self._busy:
            return
        images = images_of(args, kwargs)
        if images is not None:
            sync(images)
        self._meter.before_forward()

    def _post_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        images = images_of(args, kwargs)
        if self._busy or images is None:
            return
        quality = self.quality
        if not is_patched(module):  # dense: the guard's first images, or a stage the guard keeps dense
            if quality is not None and quality.result is None:
                with self._itself():
                    self._guard_step(images, output)
            elif quality is not None:
                quality.ran(images.shape[0])
            return
        sync(images)
        with self._itself():  # the meter runs the model itself (FLOP count, dense comparison)
            dense = self._meter.merged_forward(module, (args, kwargs), images, output)
            fraction = self._meter.last_fraction
            if self._keeper is not None and fraction is not None and get_config(module) is self._keeper.config:
                self._pending = self._keeper.observe(fraction, images.shape[0]) or self._pending
            if quality is not None:
                quality.ran(images.shape[0], images.shape[0] if self._audit.coin else 0)
                if self._audit.now:
                    self._audit_batch(module, args, kwargs, output, dense)

    def _audit_batch(
        self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any, dense: Any
    ) -> None:
        """Compare this merged forward with dense (run here unless the meter already did) for the audit."""
        merged = output_tensor(output)
        if merged is None:
            return
        if dense is None:
            with unpatched(module), torch.no_grad():
                dense = type(module).forward(module, *args, **kwargs)
        reference = output_tensor(dense)
        if reference is None:
            return
        hits = float(GUARD_MEASURES[self._measure](merged, reference).sum())
        self._audit.hits += hits
        self._audit.images += int(merged.shape[0])

    def _batch_start(self, batch_idx: int, dataloader_idx: int) -> None:
        quality = self.quality
        merging = quality is not None and quality.current is not None
        coin = bool(merging and quality is not None and quality.audits(batch_idx, dataloader_idx))
        self._audit = _BatchAudit(now=merging and (self.compare_dense or coin), coin=coin)

    def _batch_end(self) -> None:
        """Hand the batch's audit, summed over processes, to the guard and apply a step down at once; else apply the
        budget keeper's shifted thresholds, if any."""
        pending, self._pending = self._pending, None
        audit, self._audit = self._audit, _BatchAudit()
        if audit.now and self.quality is not None and self._trainer is not None:
            totals = self._trainer.strategy.reduce(
                torch.tensor([audit.hits, audit.images], dtype=torch.float64, device=self._device()), reduce_op="sum"
            )
            hits, n = float(totals[0]), round(float(totals[1]))
            if self.quality.observe(hits, n):
                self._say("DSM quality guard: " + self.quality.steps[-1])
                self._swap(self.quality.schedule)
                return
        if pending is not None:
            self._swap(pending)

    def _device(self) -> torch.device:
        assert self._vit is not None
        param = next(self._vit.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _num_classes(self, why: str) -> int:
        n = num_classes_of(self._vit) if self._vit is not None else None
        if n is None:
            raise ValueError(f"{why}, which needs a classifier ViT (num_classes > 0) but this one has no head")
        return n

    def _collect(self) -> Dict[str, float]:
        out: Dict[str, float] = {} if self.quality is None else self.quality.metrics()
        out.update(self._meter.metrics())
        if self._keeper is not None and self._keeper.spent is not None:
            out["dsm/block_flops_spent"] = self._keeper.spent
            out["dsm/block_flops_target"] = self._keeper.target
        return out

    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        if self.quality is not None and self.guard is None:
            seen = self.quality.collected
            ranks = trainer.world_size
            rank_zero_warn(
                f"DSM did not merge: the {stage} stage ended after {seen} images on this process (of {ranks}), "
                f"fewer than its share of the quality guard's {self.quality.images} images, so every image ran dense "
                f"and no dsm/* metric was logged. Use a map-style dataset (the guard then samples the stage), "
                f"{_CALIBRATE_FIRST}, or lower guard_images"
            )
            return
        metrics = self._collect()
        if not metrics:
            return
        if "dsm/gflops_per_image" in metrics and "dsm/images_per_sec" not in metrics:
            self._say(
                "DSM: images/s and speedup are not logged: the only merged batch was the untimed warm-up "
                "(timing needs 2 or more merged batches)"
            )
        self.metrics = {k: float(v) for k, v in metrics.items()}
        self._say(self.summary(stage))
        if stage == "predict":  # self.log is not available in predict: write to the loggers directly
            if trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics(self.metrics, step=trainer.global_step)
                    logger.save()
            self._say("DSM predict: " + ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items()))
            return
        for key, value in metrics.items():
            pl_module.log(key, value, sync_dist=not key.startswith("dsm/agreement"), on_epoch=True)

    def summary(self, stage: str) -> str:
        """The stage in a few sentences: how many images merged, FLOPs, agreement, speed, and the guard's choice."""
        lines = [f"DSM {stage} summary (this process):", *self._meter.describe(self.metrics)]
        if self._keeper is not None:
            lines.append(self._keeper.report())
        if self.quality is not None:
            lines.extend(self.quality.report(every_batch=self.compare_dense))
        elif self.min_agreement is None:
            lines.append("The quality guard was off (min_agreement=None): nothing checked the merged outputs.")
        return "\n  ".join(lines)

    @override
    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._stage == "validate":
            self._batch_start(batch_idx, dataloader_idx)

    @override
    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    @override
    def on_test_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._stage == "test":
            self._batch_start(batch_idx, dataloader_idx)

    @override
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    @override
    def on_predict_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._stage == "predict":
            self._batch_start(batch_idx, dataloader_idx)

    @override
    def on_predict_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch_end()

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "test")


@dataclasses.dataclass
class _BatchAudit:
    """One batch's dense comparison: whether it runs (the guard's coin, or ``compare_dense``), whether the guard's
    own coin picked it (what the guard's cost counts), and the agreements and images it found on this process."""

    now: bool = False
    coin: bool = False
    hits: float = 0.0
    images: int = 0


def _check_outputs(vit: Optional[nn.Module], outputs: Any, measure: str) -> None:
    """The guard compares ``[batch, classes]`` logits (top-1) or ``[batch, ...]`` features (cosine)."""
    if not isinstance(outputs, torch.Tensor) or outputs.ndim < 2 or (measure == "top1" and outputs.ndim != 2):
        what = "[batch, classes] logits" if measure == "top1" else "a [batch, ...] tensor of features"
        raise ValueError(
            f"the quality guard (min_agreement) compares {what}, but {type(vit).__name__} returned "
            f"{type(outputs).__name__}; pass min_agreement=None to merge without the guard"
        )


#: What the guard's warnings suggest when a stage has too few images to choose on.
_CALIBRATE_FIRST = (
    "calibrate a config once on images like these (dsm_lightning.calibrate(); README, 'The quality guard') and pass "
    "it as DSMCallback(config) (--dsm.config on the command line)"
)


def _level(confidence: Optional[float]) -> str:
    return "" if confidence is None else f" at {confidence:.0%} confidence"
