"""Tiny Lightning pieces for the callback / CLI / DDP tests."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

TINY_KW = {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 32, "num_heads": 2}


def read_csv(path) -> list:
    """Rows of a CSV file as dicts."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_tsv(path) -> list:
    """Rows of a tab-separated file with a header (the writer's ``.skipped.tsv``) as dicts."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh, dialect="excel-tab"))


def make_image_folder(root: Path, classes=3, per_class=4, size=32, seed=0, labelled=True) -> Path:
    """Write small random RGB PNGs in ImageFolder layout (or flat when not labelled)."""
    g = torch.Generator().manual_seed(seed)
    for c in range(classes):
        folder = root / f"class{c}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"c{c}_{i}.png")
    return root


def trainer(**kwargs):
    """A quiet single-process CPU Trainer; keyword arguments override the defaults."""
    from lightning.pytorch import Trainer

    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**{**defaults, **kwargs})


def tiny_classifier(**kwargs):
    from dsm_lightning.app.module import ImageClassifier

    torch.manual_seed(0)
    module = ImageClassifier(
        model_name="vit_tiny_patch16_224", num_classes=3, model_kwargs=dict(TINY_KW), top_k=2, **kwargs
    )
    with torch.no_grad():
        module.model.head.weight.normal_(0, 0.5)
    return module


def tiny_data(root: Path, **kwargs):
    from dsm_lightning.app.data import ImageFolderDataModule

    return ImageFolderDataModule(val_dir=str(root), train_dir=str(root), batch_size=4, crop_pct=1.0, **kwargs)


def spy_patched(module, step: str = "validation_step", attr: str = "model") -> list:
    """Wrap ``module.<step>`` to record, per batch, whether ``module.<attr>`` was DSM-patched; returns the record."""
    from dsm_lightning import is_patched

    seen: list = []
    original = getattr(module, step)

    def spy(batch, batch_idx):
        seen.append(is_patched(getattr(module, attr)))
        return original(batch, batch_idx)

    setattr(module, step, spy)
    return seen
