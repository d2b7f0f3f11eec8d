"""DSMCallback: merge tokens during validation / test / predict, never during training.

Like Lightning's ``WeightAveraging``: patch at stage start, restore at stage end, with ``on_exception`` and
``teardown`` as safety nets. The callback's own settings travel in its ``state_dict``; nothing of DSM enters the
model's weights or checkpoints.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from .adapters import UnsupportedModelError, get_adapter
from .config import DSMConfig
from .errors import ModelAttributeError
from .guard import GuardResult, quality_guard
from .measure import StageMeter, images_of, num_classes_of, sync
from .outputs import output_tensor
from .patch import apply_dsm, get_config, is_patched, remove_dsm, token_plan
from .regional import compile_blocks

if TYPE_CHECKING:
    from torchmetrics import Metric

__all__ = ["DSMCallback", "find_vit"]

_STAGES = ("validate", "test", "predict")
#: Default of ``DSMCallback(min_agreement=...)``: chosen from held-out measurements (README, "Accuracy vs speed").
DEFAULT_MIN_AGREEMENT: Optional[float] = 0.97
#: Default of ``DSMCallback(guard_confidence=...)`` (README, "Small folders and the quality guard").
DEFAULT_GUARD_CONFIDENCE: Optional[float] = 0.9


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
        f"torchvision VisionTransformer in the LightningModule, pass model_attr='name.of.vit', or register an "
        f"adapter for your model (README, 'Custom ViTs')."
    )


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


def _check_guard(min_agreement: Optional[float], guard_images: int, guard_confidence: Optional[float]) -> None:
    if min_agreement is not None and not 0.0 < float(min_agreement) <= 1.0:
        raise ValueError(f"min_agreement must be in (0, 1] or None (guard off), got {min_agreement!r}")
    if guard_images < 1:
        raise ValueError(f"guard_images must be >= 1, got {guard_images}")
    if guard_confidence is not None and not 0.0 < float(guard_confidence) < 1.0:
        raise ValueError(f"guard_confidence must be in (0, 1) or None (point estimate), got {guard_confidence!r}")


class DSMCallback(Callback):
    """Apply Delayed Spatial Merging to the ViT inside a LightningModule for evaluation stages.

    ``DSMCallback()`` merges with :class:`~dsm_lightning.DSMConfig`'s defaults (a proportional ``r`` chosen per
    input size for ``flops_target=0.55`` of the dense block FLOPs, about 1.8x fewer; token-feature matching with the
    most class-attended tokens protected). ``DSMCallback(delay=4)`` keeps the first 4 blocks dense. Either way the
    quality guard (``min_agreement``) first checks agreement with the dense model and merges less if needed.

    Args:
        delay: Leading blocks that stay dense (:attr:`DSMConfig.delay <dsm_lightning.DSMConfig>`, as are the
            next eight fields, with the same defaults).
        r: Tokens merged per merging block (int, fraction, per-block list, or None for ``flops_target``).
        windows: Local windows (a perfect square or ``(rows, cols)``).
        local_blocks: Merging blocks that merge inside windows first.
        prop_attn: Proportional attention.
        flops_target: Fraction of the dense block FLOPs to aim for when ``r`` is None.
        schedule: ``"proportional"`` or ``"constant"`` family when ``r`` is None.
        metric: ``"tokens"`` or ``"keys"``: what pairs are matched on.
        protect: Fraction of the most class-attended tokens that never merge.
        matching: ``"dsm"`` or ``"tome"``: the bipartite sets and the order of unmerged tokens (``"tome"`` is
            official ToMe's).
        config: A full :class:`~dsm_lightning.DSMConfig` instead of the fields above (they must then keep their
            defaults).
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
        min_agreement: Quality guard. The first ``guard_images`` images of each stage run dense (their outputs
            are exact); on them the callback measures the top-1 agreement with dense of the requested schedule and
            of schedules that merge less (keeping what you fixed, such as ``delay``), then merges with the most
            merging one that reaches ``min_agreement`` for the rest of the stage (dense if none does), and logs
            what it chose and measured. ``None`` switches the guard off. For a ViT without a classifier head (a
            backbone under a dense-prediction head, an HF encoder) agreement is the mean per-token cosine
            similarity of its outputs with dense (:func:`~dsm_lightning.outputs.token_cosine`) instead.
        guard_images: Images (per process) the guard measures on.
        guard_confidence: With a classifier, the guard takes a schedule only when a one-sided binomial test on its
            images shows agreement >= ``min_agreement`` at this confidence
            (:func:`~dsm_lightning.guard.binomial_pass`), so a schedule whose true agreement is below the target
            is chosen with probability at most ``1 - guard_confidence``; ``None`` compares the observed agreement
            with the target (faster, no guarantee: README, "Small folders and the quality guard").
        adaptive: Adaptive merging (:attr:`DSMConfig.threshold <dsm_lightning.DSMConfig>`): the guard fits each
            candidate's per-block thresholds on its images (:func:`~dsm_lightning.fit_thresholds`) so that they
            spend the candidate's planned FLOPs on average, and each image then merges as much as its content
            allows. Needs the guard (``min_agreement``), or a ``config`` whose thresholds are already fitted.
            ``dsm/gflops_per_image`` is then the stage's average per image of what batches spent, padding
            included.

    Example:
        >>> callback = DSMCallback(delay=4, compare_dense=True)  # Trainer(callbacks=[callback])
        >>> callback.config.delay, callback.min_agreement, callback.stages
        (4, 0.97, ('validate', 'test', 'predict'))
    """

    def __init__(
        self,
        delay: int = DSMConfig.delay,
        r: Union[int, float, List[int], None] = None,
        windows: Union[int, Tuple[int, int]] = DSMConfig.windows,
        local_blocks: int = DSMConfig.local_blocks,
        prop_attn: bool = DSMConfig.prop_attn,
        flops_target: float = DSMConfig.flops_target,
        schedule: str = DSMConfig.schedule,
        metric: str = DSMConfig.metric,
        protect: float = DSMConfig.protect,
        matching: str = DSMConfig.matching,
        *,
        config: Optional[DSMConfig] = None,
        stages: Sequence[str] = _STAGES,
        model_attr: Optional[str] = None,
        compare_dense: bool = False,
        log_summary: bool = True,
        compile: Any = False,
        min_agreement: Optional[float] = DEFAULT_MIN_AGREEMENT,
        guard_images: int = 256,
        guard_confidence: Optional[float] = DEFAULT_GUARD_CONFIDENCE,
        adaptive: bool = False,
    ) -> None:
        fields = dict(
            delay=delay,
            r=tuple(r) if isinstance(r, list) else r,
            windows=windows,
            local_blocks=local_blocks,
            prop_attn=prop_attn,
            flops_target=flops_target,
            schedule=schedule,
            metric=metric,
            protect=protect,
            matching=matching,
        )
        changed = sorted(k for k, v in fields.items() if v != getattr(DSMConfig, k))
        if config is not None and changed:
            raise ValueError(f"pass either config= or the fields {changed}, not both")
        self.config = config if config is not None else DSMConfig.from_dict(fields)
        self.stages = _check_stages(stages)
        self.model_attr = model_attr
        self.compare_dense = compare_dense
        self.log_summary = log_summary
        self.compile = _check_compile(compile)
        _check_guard(min_agreement, guard_images, guard_confidence)
        self.min_agreement = None if min_agreement is None else float(min_agreement)
        self.guard_images = int(guard_images)
        self.guard_confidence = None if guard_confidence is None else float(guard_confidence)
        if adaptive and self.min_agreement is None and self.config.threshold is None:
            raise ValueError(
                "adaptive=True fits its thresholds on the quality guard's images, but min_agreement=None turns the "
                "guard off; keep min_agreement, or pass config=fit_thresholds(model, images, config)"
            )
        self.adaptive = bool(adaptive)
        self.guard: Optional[GuardResult] = None
        self._measure = "top1"  # set in setup: "cosine" for a ViT without a classifier head
        self._guard_inputs: list = []
        self._guard_outputs: list = []
        self._stage: Optional[str] = None
        self._trainer: Optional[Trainer] = None
        self.metrics: Dict[str, float] = {}
        self._vit: Optional[nn.Module] = None
        self._vit_name: Optional[str] = None
        self._hooks: list = []
        self._agree: Optional[Metric] = None
        self._meter = StageMeter(compare_dense)
        self._t0 = 0.0
        self._busy = False  # set while the callback itself runs the model (FLOP count, dense comparison)
        self._compiled = False
        self._user_config: Optional[DSMConfig] = None  # the patch a user applied before the stage, put back after
        self._applied = False  # whether the ViT carries this callback's patch now

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
        self._hooks = [
            self._vit.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self._vit.register_forward_hook(self._post_hook, with_kwargs=True),
        ]
        self.guard = None
        self._guard_inputs, self._guard_outputs = [], []
        if self.min_agreement is None or trainer.sanity_checking:
            self._patch(self.config)
        # else: the first guard_images images run dense; _guard_step chooses the schedule

    def _patch(self, config: DSMConfig) -> None:
        """Apply ``config`` (and compile) to the ViT, and print its plan."""
        assert self._vit is not None and self._trainer is not None
        apply_dsm(self._vit, config)
        self._applied = True
        if config.threshold is not None:  # adaptive: token counts follow the data, so count FLOPs per batch
            adapter = get_adapter(self._vit)
            self._meter.count_tokens(list(adapter.blocks(self._vit)), adapter.dims(self._vit))
        if self.compile == "blocks":
            compile_blocks(self._vit)  # remove_dsm (in _restore) takes the compiled block forwards away again
        elif self.compile is not None:
            # Compile forward only (an instance attribute shadowing the class method): the timing hooks stay eager.
            options = self.compile if config.threshold is None else {**self.compile, "fullgraph": False}
            self._vit.forward = torch.compile(self._vit.forward, **options)
            self._compiled = True
        trainer = self._trainer
        if self.log_summary and trainer.is_global_zero and not trainer.sanity_checking:
            plan = token_plan(self._vit)
            dims = get_adapter(self._vit).dims(self._vit)
            self._say(f"DSM on '{self._vit_name or 'model'}' for {self._stage} ({config}):\n{plan.table(*dims)}")

    def _guard_step(self, images: torch.Tensor, output: Any) -> None:
        """Collect dense inputs and outputs; once enough are seen, choose and apply the schedule."""
        if self.guard is not None:
            return
        logits = output_tensor(output)
        if logits is None or logits.ndim < 2 or (self._measure == "top1" and logits.ndim != 2):
            what = "[batch, classes] logits" if self._measure == "top1" else "a [batch, ...] tensor of features"
            raise ValueError(
                f"the quality guard (min_agreement) compares {what}, but {type(self._vit).__name__} returned "
                f"{type(output).__name__}; pass min_agreement=None to merge without the guard"
            )
        self._guard_inputs.append(images.detach())
        self._guard_outputs.append(logits.detach())
        if sum(x.shape[0] for x in self._guard_inputs) < self.guard_images:
            return
        assert self._vit is not None and self._trainer is not None and self.min_agreement is not None
        strategy = self._trainer.strategy

        def reduce(t: torch.Tensor) -> torch.Tensor:
            return strategy.reduce(t, reduce_op="sum")

        images_all, dense = torch.cat(self._guard_inputs), torch.cat(self._guard_outputs)
        self._guard_inputs, self._guard_outputs = [], []
        self.guard = quality_guard(
            self._vit,
            images_all,
            dense,
            self.config,
            self.min_agreement,
            batch_size=max(1, images.shape[0]),
            reduce=reduce,
            measure=self._measure,
            confidence=self.guard_confidence,
            adaptive=self.adaptive,
        )
        self._say(self.guard.summary())
        if self.guard.config is not None:
            self._patch(self.guard.config)

    def _restore(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._meter.stop_counting()
        if self._vit is not None:
            if self._compiled:
                self._vit.__dict__.pop("forward", None)  # drop the compiled forward
                self._compiled = False
            if self._applied:
                remove_dsm(self._vit)
                self._applied = False
            if self._user_config is not None:
                apply_dsm(self._vit, self._user_config)
                self._user_config = None

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
        self._t0 = time.perf_counter()

    def _post_hook(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], output: Any) -> None:
        images = images_of(args, kwargs)
        if self._busy or images is None:
            return
        if not is_patched(module):  # dense: the guard's images (or a stage that stays dense)
            if self.min_agreement is not None and self.guard is None:
                self._busy = True
                try:
                    self._guard_step(images, output)
                finally:
                    self._busy = False
            return
        sync(images)
        seconds = time.perf_counter() - self._t0
        self._busy = True  # the meter runs the model itself (FLOP count, dense comparison): hooks stay quiet
        try:
            self._meter.merged_forward(module, (args, kwargs), images, output, seconds)
        finally:
            self._busy = False

    def _num_classes(self, why: str) -> int:
        n = num_classes_of(self._vit) if self._vit is not None else None
        if n is None:
            raise ValueError(f"{why}, which needs a classifier ViT (num_classes > 0) but this one has no head")
        return n

    def _collect(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        if self.guard is not None:
            out["dsm/guard_agreement"] = self.guard.agreement
            out["dsm/guard_flops_ratio"] = self.guard.flops_ratio
        out.update(self._meter.metrics())
        return out

    def _log_epoch(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage not in self.stages or trainer.sanity_checking:
            return
        if self.min_agreement is not None and self.guard is None:
            seen = sum(x.shape[0] for x in self._guard_inputs)
            rank_zero_warn(
                f"DSM did not merge: the {stage} stage ended after {seen} images, fewer than the quality guard's "
                f"guard_images={self.guard_images}, so every image ran dense and no dsm/* metric was logged. For "
                f"a small folder, calibrate a config once on images like it (dsm_lightning.calibrate(); README, 'Small "
                f"folders and the quality guard') and pass it with --dsm.config, or lower guard_images"
            )
            self._guard_inputs, self._guard_outputs = [], []
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
        if self.guard is not None:
            reason = self.guard.reason()
            lines.append(reason[0].upper() + reason[1:])
        elif self.min_agreement is None:
            lines.append("The quality guard was off (min_agreement=None): nothing checked the merged outputs.")
        return "\n  ".join(lines)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "validate")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_epoch(trainer, pl_module, "test")
