"""PredictionWriter: per-image top-k predictions to CSV or JSONL, complete and atomic under DDP.

Every rank appends its rows to its own part file as batches finish. At the end of predict, rank zero merges the
parts (one row per image, in dataset order, duplicates from padded samplers dropped) into a temporary file and
renames it into place, so the output is never half-written; on an exception the parts are removed. Part and
temporary files carry a per-run id, and a lock file next to the output (``.<name>.lock``, holding the owner's
process id) refuses a second run writing the same output at the same time, before any work starts. Files the data
module skipped (unreadable, or not images; ``data.bad_images``) are listed, with the reason, in
``<output stem>.skipped.tsv`` next to the output (tab-separated, quoted where a name holds a tab or a newline).
"""

from __future__ import annotations

import csv
import json
import os
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write predictions of :class:`~dsm_lightning.app.module.ImageClassifier` (``predict_step`` dicts).

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
        self._run = uuid.uuid4().hex[:12]
        self._locked = False

    def _part(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.name}.{self._run}.rank{rank}.part")

    @property
    def _lock(self) -> Path:
        return self.output.with_name(f".{self.output.name}.lock")

    def _take_lock(self) -> None:
        """Create the lock file atomically; a lock whose process is gone (a killed run) is taken over."""
        for _ in range(2):
            try:
                fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._lock.read_text().strip() if self._lock.exists() else ""
                if owner.isdigit() and _alive(int(owner)):
                    raise FileExistsError(
                        f"another run (process {owner}) is writing {self.output}; wait for it to finish or pass "
                        f"another --writer.output (delete {self._lock} if no such run is alive)"
                    ) from None
                self._lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self._locked = True
            return
        raise FileExistsError(
            f"could not take {self._lock} (another run keeps creating it); pass another --writer.output"
        )

    def _release(self) -> None:
        if self._locked:
            self._lock.unlink(missing_ok=True)
            self._locked = False

    @property
    def skipped_path(self) -> Path:
        """Where unreadable images left out of the predictions are listed (tab-separated path and reason)."""
        return self.output.with_name(self.output.stem + ".skipped.tsv")

    @override
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
        if trainer.limit_predict_batches == 0:
            raise ValueError(
                f"trainer.limit_predict_batches=0 predicts no image, so {self.output} would not be written; "
                f"remove the setting or pass a positive number"
            )
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._run = trainer.strategy.broadcast(uuid.uuid4().hex[:12])  # every rank names its part with one id
        if trainer.is_global_zero:
            self._take_lock()

    @override
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

    @override
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

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        trainer.strategy.barrier("dsm_prediction_writer_parts")
        if trainer.is_global_zero:
            written, skipped = self._merge(trainer.world_size)
            message = f"PredictionWriter: {written} predictions written to {self.output}"
            if skipped:
                message += f"; {skipped} files skipped: unreadable or not images (listed in {self.skipped_path})"
            bar = trainer.progress_bar_callback
            bar.print(message) if bar is not None else print(message)
            self._release()
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
        tmp = self._tmp
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
            tmp = self.skipped_path.with_name(f".{self.skipped_path.name}.{self._run}.tmp")
            with open(tmp, "w", newline="") as fh:
                table = csv.writer(fh, dialect="excel-tab")
                table.writerow(["path", "reason"])
                table.writerows((path, " ".join(reason.split())) for path, reason in sorted(skipped.items()))
            os.replace(tmp, self.skipped_path)
        else:
            self.skipped_path.unlink(missing_ok=True)  # a list from an earlier run would mislead
        for rank in range(world_size):
            self._part(rank).unlink(missing_ok=True)
        return len(ordered), len(skipped)

    @property
    def _tmp(self) -> Path:
        return self.output.with_name(f".{self.output.name}.{self._run}.tmp")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._part(trainer.global_rank).unlink(missing_ok=True)
        self._tmp.unlink(missing_ok=True)
        self._release()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
