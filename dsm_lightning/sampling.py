"""Images drawn at random from a whole evaluation stage, for the quality guard, without touching the stage's run.

Lightning does not shuffle validation, test or predict loaders, and class-folder datasets arrive sorted by class, so
a stage's first images are not a sample of it. :func:`sample_stage_inputs` reads the indices the stage's map-style
loaders will visit on this process (their batch samplers, under DDP already split by rank), draws some uniformly,
loads and collates them as the loader would, moves them to the device as the trainer would, and runs the
LightningModule's step until it calls the ViT, to capture the ViT's input. Random generators are restored
afterwards, so what the stage then runs, writes and in which order is unchanged.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from .measure import images_of

__all__ = ["sample_loader", "sample_stage_inputs", "stage_loaders"]

_STEPS = {"validate": "validation_step", "test": "test_step", "predict": "predict_step"}


class _Captured(Exception):
    """Raised by the capture hook to stop the step once the ViT's input is known."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images


def stage_loaders(trainer: Any, stage: str) -> Tuple[List[Any], List[float]]:
    """The ``stage``'s dataloaders on ``trainer`` and how many batches each runs (``inf``: all)."""
    name = {"validate": "val", "test": "test", "predict": "predict"}[stage]
    loaders = getattr(trainer, f"{name}_dataloaders", None)
    batches = getattr(trainer, f"num_{name}_batches", None) or []
    if loaders is None:
        return [], []
    loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
    batches = list(batches) if isinstance(batches, (list, tuple)) else [batches] * len(loaders)
    return loaders, [float(b) for b in batches]


def _stage_indices(loader: Any, batches: float) -> Optional[List[int]]:
    """The dataset indices ``loader`` visits in its first ``batches`` batches on this process, or None when they
    cannot be known without running it (iterable datasets, no batch sampler)."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    batch_sampler = getattr(batch_sampler, "_batch_sampler", batch_sampler)  # Lightning's predict index wrapper
    if batch_sampler is None:
        return None
    sampler = getattr(batch_sampler, "sampler", None)
    generator = getattr(sampler, "generator", None)
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    limit = math.inf if math.isinf(batches) else int(batches)
    out: List[int] = []
    with torch.random.fork_rng(devices=[]):
        for i, batch in enumerate(batch_sampler):
            if i >= limit:
                break
            out.extend(int(j) for j in batch)
    if state is not None and isinstance(generator, torch.Generator):
        generator.set_state(state)
    return out


def sample_loader(loader: DataLoader, count: int, *, seed: int = 0) -> DataLoader:
    """A loader over ``count`` items drawn uniformly without replacement from ``loader``'s map-style dataset (all of
    them when it holds fewer), in dataset order, batched and collated as ``loader`` does; ``loader`` itself when its
    dataset is iterable (its first items are then all there is)."""
    from torch.utils.data import Subset

    if isinstance(loader.dataset, IterableDataset):
        return loader
    n = len(loader.dataset)  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    picked = sorted(torch.randperm(n, generator=g)[: min(count, n)].tolist())
    return DataLoader(
        Subset(loader.dataset, picked),
        batch_size=loader.batch_size or 32,
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
    )


def sample_stage_inputs(
    trainer: Any,
    pl_module: nn.Module,
    vit: nn.Module,
    stage: str,
    count: int,
    *,
    seed: int = 0,
    batch_size: int = 32,
) -> Optional[Tuple[torch.Tensor, int]]:
    """``(images, stage_images)``: the ViT's inputs for ``count`` images drawn uniformly without replacement from
    what this process's ``stage`` will run (all of them when it runs fewer), and how many images that stage runs
    here; None when a loader's indices cannot be known in advance (then the guard falls back to the stage's first
    images). The step runs under ``torch.no_grad`` and stops at the ViT's call; nothing is logged."""
    loaders, batches = stage_loaders(trainer, stage)
    pool: List[Tuple[int, int]] = []  # (loader, dataset index)
    for k, (loader, n) in enumerate(zip(loaders, batches)):
        indices = _stage_indices(loader, n)
        if indices is None:
            return None
        pool.extend((k, j) for j in indices)
    if not pool:
        return None
    g = torch.Generator().manual_seed(seed + 7_919 * int(getattr(trainer, "global_rank", 0)))
    picked = sorted(torch.randperm(len(pool), generator=g)[: min(count, len(pool))].tolist())
    step: Callable[..., Any] = getattr(pl_module, _STEPS[stage])
    captured: List[torch.Tensor] = []

    def capture(module: nn.Module, args: Tuple[Any, ...], kwargs: dict) -> None:
        images = images_of(args, kwargs)
        if images is None:
            raise ValueError(f"the quality guard could not find the image tensor in the call of {type(vit).__name__}")
        raise _Captured(images.detach())

    handle = vit.register_forward_pre_hook(capture, with_kwargs=True, prepend=True)
    try:
        with torch.no_grad():
            for k in sorted({pool[i][0] for i in picked}):
                loader = loaders[k]
                chosen = [pool[i][1] for i in picked if pool[i][0] == k]
                for start in range(0, len(chosen), batch_size):
                    items = [loader.dataset[j] for j in chosen[start : start + batch_size]]
                    batch = trainer.strategy.batch_to_device(loader.collate_fn(items), dataloader_idx=k)
                    captured.append(_capture(step, batch, k, len(loaders)))
    finally:
        handle.remove()
    return torch.cat(captured), len(pool)


def _capture(step: Callable[..., Any], batch: Any, dataloader_idx: int, loaders: int) -> torch.Tensor:
    args: Sequence[Any] = (batch, 0) if loaders == 1 else (batch, 0, dataloader_idx)
    try:
        step(*args)
    except _Captured as found:
        return found.images
    raise ValueError(
        f"the quality guard ran {getattr(step, '__name__', 'the step')} on a sample of the stage but it never called "
        f"the ViT; pass min_agreement=None to merge without the guard"
    )
