"""PredictionWriter: per-image top-k predictions to CSV or JSONL, complete and atomic under DDP.

Every rank appends its rows to its own part file as batches finish. At the end of predict, rank zero merges the
parts (one row per image, in dataset order, duplicates from padded samplers dropped) into a temporary file and
renames it into place, so the output is never half-written; on an exception the parts are removed. Images the data
module skipped as unreadable (``data.bad_images``) are listed, with the reason, in ``<output stem>.skipped.tsv``
next to the output.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter", "MapWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write predictions of :class:`~dsm_lightning.module.ImageClassifier` (``predict_step`` dicts).

    Args:
        output: Destination file; ``.csv`` or ``.jsonl``.
        overwrite: Replace an existing file (otherwise refuse before any work starts).
    """

    def __init__(self, output: str = "predictions.csv", overwrite: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        if self.output.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"output={output!r}: use a .csv or .jsonl file name")
        self.overwrite = overwrite
        self._fh: Optional[TextIO] = None
        self._classes: Optional[List[str]] = None

    def _part(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.name}.rank{rank}.part")

    @property
    def skipped_path(self) -> Path:
        """Where unreadable images left out of the predictions are listed (tab-separated path and reason)."""
        return self.output.with_name(self.output.stem + ".skipped.tsv")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.output.is_dir():
            raise IsADirectoryError(
                f"writer.output={str(self.output)!r} is a directory; pass a file name such as "
                f"{str(self.output / 'predictions.csv')!r}"
            )
        if self.output.exists() and not self.overwrite:
            raise FileExistsError(f"{self.output} exists; delete it or set overwrite=True")
        self.output.parent.mkdir(parents=True, exist_ok=True)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._classes = getattr(pl_module, "class_names", None)
        datamodule = getattr(trainer, "datamodule", None)
        if not self._classes and datamodule is not None:
            self._classes = getattr(datamodule, "classes", None) or None
            # folder names only name the model's outputs when they line up one to one
            if self._classes and len(self._classes) != getattr(pl_module, "num_classes", None):
                self._classes = None
        # open for the whole stage (closed in on_predict_end / on_exception), so no context manager
        self._fh = open(self._part(trainer.global_rank), "w")  # noqa: SIM115

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
        if self._fh is None:
            raise RuntimeError("PredictionWriter got a batch before on_predict_start opened its part file")
        for path, reason in prediction.get("skipped", ()):
            self._fh.write(json.dumps({"skipped": path, "reason": reason}) + "\n")
        classes = prediction["classes"].tolist()
        scores = prediction["scores"].tolist()
        for i, path in enumerate(prediction["path"]):
            row = {
                "index": int(prediction["index"][i]),
                "path": path,
                "classes": classes[i],
                "scores": [round(s, 6) for s in scores[i]],
            }
            target = int(prediction["target"][i])
            if target >= 0:
                row["target"] = target
            if self._classes:
                row["names"] = [self._classes[c] for c in classes[i]]
            self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        trainer.strategy.barrier("dsm_prediction_writer_parts")
        if trainer.is_global_zero:
            written, skipped = self._merge(trainer.world_size)
            message = f"PredictionWriter: {written} predictions written to {self.output}"
            if skipped:
                message += f"; {skipped} unreadable images skipped (listed in {self.skipped_path})"
            bar = trainer.progress_bar_callback
            bar.print(message) if bar is not None else print(message)
        trainer.strategy.barrier("dsm_prediction_writer_done")

    def _merge(self, world_size: int) -> Tuple[int, int]:
        rows: Dict[int, Dict[str, Any]] = {}
        skipped: Dict[str, str] = {}
        for rank in range(world_size):
            part = self._part(rank)
            with open(part) as fh:
                for line in fh:
                    row = json.loads(line)
                    if "skipped" in row:
                        skipped.setdefault(row["skipped"], row["reason"])
                    else:
                        rows.setdefault(row["index"], row)
        ordered = [rows[k] for k in sorted(rows)]
        tmp = self.output.with_name(f".{self.output.name}.tmp")
        with open(tmp, "w", newline="") as fh:
            if self.output.suffix == ".jsonl":
                for row in ordered:
                    fh.write(json.dumps(row) + "\n")
            else:
                k = len(ordered[0]["classes"]) if ordered else 0
                fields = ["index", "path"] + (["target"] if any("target" in r for r in ordered) else [])
                for j in range(k):
                    fields += (
                        [f"top{j + 1}_class"] + ([f"top{j + 1}_name"] if self._classes else []) + [f"top{j + 1}_score"]
                    )
                writer = csv.DictWriter(fh, fieldnames=fields)
                writer.writeheader()
                for row in ordered:
                    flat = {"index": row["index"], "path": row["path"]}
                    if "target" in row:
                        flat["target"] = row["target"]
                    for j in range(k):
                        flat[f"top{j + 1}_class"] = row["classes"][j]
                        flat[f"top{j + 1}_score"] = row["scores"][j]
                        if self._classes:
                            flat[f"top{j + 1}_name"] = row["names"][j]
                    writer.writerow(flat)
        os.replace(tmp, self.output)
        if skipped:
            tmp = self.skipped_path.with_name(f".{self.skipped_path.name}.tmp")
            tmp.write_text("".join(f"{path}\t{' '.join(reason.split())}\n" for path, reason in sorted(skipped.items())))
            os.replace(tmp, self.skipped_path)
        else:
            self.skipped_path.unlink(missing_ok=True)  # a list from an earlier run would mislead
        for rank in range(world_size):
            self._part(rank).unlink(missing_ok=True)
        return len(ordered), len(skipped)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._part(trainer.global_rank).unlink(missing_ok=True)
        self.output.with_name(f".{self.output.name}.tmp").unlink(missing_ok=True)


class MapWriter(BasePredictionWriter):
    """Write one 8-bit grayscale PNG per image from ``predict_step`` dicts holding ``maps`` ``[B, H, W]`` in [0, 1]
    (:class:`~dsm_lightning.module.SaliencyPredictor`).

    Each map is cropped to the image area of the letterboxed input and resized to the image's own size, then written
    atomically (a temporary file renamed into place) as ``<output_dir>/<path relative to data.predict_dir>.png``;
    every rank writes its own images, so DDP needs no merge.

    Args:
        output_dir: Folder for the maps.
    """

    def __init__(self, output_dir: str = "outputs/maps") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self._root: Optional[Path] = None
        self.written = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise NotADirectoryError(f"writer.output_dir={str(self.output_dir)!r} is a file; pass a folder")
        self.output_dir.mkdir(parents=True, exist_ok=True)
        datamodule = getattr(trainer, "datamodule", None)
        root = getattr(datamodule, "hparams", {}).get("predict_dir")
        self._root = Path(root).resolve() if root else None
        self.written = 0

    def _target(self, path: str) -> Path:
        source = Path(path).resolve()
        try:
            relative = source.relative_to(self._root) if self._root else Path(source.name)
        except ValueError:
            relative = Path(source.name)
        return self.output_dir / relative.with_suffix(".png")

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
            self.written += 1

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        message = f"MapWriter: {self.written} maps written to {self.output_dir} (rank {trainer.global_rank})"
        bar = trainer.progress_bar_callback
        bar.print(message) if bar is not None else print(message)
