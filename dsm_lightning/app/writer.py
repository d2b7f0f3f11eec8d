"""PredictionWriter: per-image top-k predictions to CSV or JSONL, complete and atomic under DDP.

Every rank appends its rows to its own part file as batches finish. At the end of predict, rank zero merges the
parts (one row per image, in dataset order, duplicates from padded samplers dropped) into a temporary file and
renames it into place, so the output is never half-written; on an exception, Ctrl+C or SIGTERM (``docker stop``,
Kubernetes, SLURM: the run stops at the end of the current batch with exit status 143) the parts are removed and an
older output stays as it was. Part and temporary files carry a per-run id, and a lock file next to the output
(``.<name>.lock``, holding the owner's process id and host for messages) refuses a second run writing the same output
at the same time, before any work starts. The lock is an operating-system lock (``flock``) held for the run, so it
frees itself when its process dies, however it dies; the next run takes it over and removes the part and temporary
files the dead run left. Files the data module skipped (unreadable, or not images; ``data.bad_images``) are listed,
with the reason, in ``<output name>.skipped.tsv`` next to the output (``p.csv.skipped.tsv``; tab-separated, quoted
where a name holds a tab or a newline).

Text is written as UTF-8. A file name that is not valid UTF-8 (legal on Linux) keeps each undecodable byte as an
escape, ``\\udcff`` for byte ``0xff``, in CSV, JSONL and the skipped list alike (JSON's escape of the character Python
decodes the byte to: ``os.fsencode(json.loads(line)["path"])`` gives the file's bytes back). CSV cells that a
spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return: class names
from a downloaded side-car or from folder names) are prefixed with ``'``, as OWASP advises; JSONL is written as is.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the lock falls back to the process id check
    fcntl = None  # type: ignore[assignment]

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Write predictions of :class:`~dsm_lightning.app.module.ImageClassifier` (``predict_step`` dicts).

    Args:
        output: Destination file; ``.csv`` or ``.jsonl``.
        overwrite: Replace an existing file (the run says so when it does). By default an existing file is refused
            before any work starts, and a file that appears while the run goes is left alone: the predictions
            then go to a name of their own, which the run prints.
    """

    def __init__(self, output: str = "predictions.csv", overwrite: bool = False) -> None:
        super().__init__(write_interval="batch")
        self.output = Path(output)
        if self.output.suffix not in (".csv", ".jsonl"):
            raise ValueError(f"output={output!r}: use a .csv or .jsonl file name")
        self.overwrite = overwrite
        self._fh: Optional[TextIO] = None
        self._classes: Optional[List[str]] = None
        self._run = uuid.uuid4().hex[:12]
        self._lock_fd: Optional[int] = None
        self._locked = False
        self._batches = 0
        self._signal: Optional[int] = None
        self._old_handlers: Dict[int, Any] = {}

    def _part(self, rank: int) -> Path:
        return self.output.with_name(f".{self.output.name}.{self._run}.rank{rank}.part")

    @property
    def _lock(self) -> Path:
        return self.output.with_name(f".{self.output.name}.lock")

    def _take_lock(self) -> None:
        """Hold an OS lock (``flock``) on the lock file for the run: exactly one of any number of runs racing for it
        wins, and a run that died, however it died, holds nothing, so its lock is taken over. A file holding a
        process id but no OS lock (a killed run, an older version, PID 1 in a container) is therefore stale."""
        if fcntl is None:  # pragma: no cover - Windows
            self._take_lock_by_pid()
            return
        for _ in range(10):
            try:  # never through a symbolic link: a planted link would have us truncate the file it points to
                fd = os.open(self._lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            except IsADirectoryError:
                raise IsADirectoryError(
                    f"{self._lock} is a directory, where the writer keeps its lock; remove it or pass another "
                    f"--writer.output"
                ) from None
            except OSError:
                if not self._lock.is_symlink():
                    raise
                self._lock.unlink()  # the link only, never its target
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise FileExistsError(
                    f"another run ({_owner(self._lock)}) is writing {_shown(self.output)}; wait for it to finish or "
                    f"pass another --writer.output"
                ) from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    self._take_lock_by_pid()  # a file system without flock (some network mounts)
                    return
                raise
            try:  # the file we locked may have been released (unlinked) by its owner since we opened it
                same = os.stat(self._lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            self._lock_fd, self._locked = fd, True
            self._remove_leftovers()
            return
        raise FileExistsError(f"could not take {self._lock} (other runs keep taking it); pass another --writer.output")

    def _take_lock_by_pid(self) -> None:
        """The lock without ``flock`` (Windows, file systems without it): created atomically, and taken over when
        the process it names is gone or is this one."""
        for _ in range(2):
            try:
                fd = os.open(self._lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self._lock.read_text().split()[:1] if self._lock.exists() else []
                pid = int(owner[0]) if owner and owner[0].isdigit() else 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise FileExistsError(
                        f"another run (process {pid}) is writing {_shown(self.output)}; wait for it to finish or "
                        f"pass another --writer.output (delete {self._lock} if no such run is alive)"
                    ) from None
                self._lock.unlink(missing_ok=True)
                continue
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.close(fd)
            self._locked = True
            self._remove_leftovers()
            return
        raise FileExistsError(
            f"could not take {self._lock} (another run keeps creating it); pass another --writer.output"
        )

    def _remove_leftovers(self) -> None:
        """Delete the part and temporary files of earlier runs that died on this output (we hold its lock, so no
        live run owns them); each part holds every prediction that run had made, a full copy on a large run."""
        names = (f".{self.output.name}.", f".{self.skipped_path.name}.")
        for file in self.output.parent.iterdir() if self.output.parent.is_dir() else ():
            name = file.name
            if (
                name.startswith(names)
                and (name.endswith(".tmp") or (name.endswith(".part") and ".rank" in name))
                and f".{self._run}." not in name
            ):
                file.unlink(missing_ok=True)

    def _release(self) -> None:
        if self._locked:
            self._lock.unlink(missing_ok=True)  # unlinked while still held: a run that opened it sees another inode
            self._locked = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @property
    def skipped_path(self) -> Path:
        """Where unreadable images left out of the predictions are listed (tab-separated path and reason):
        ``<output name>.skipped.tsv``, so ``a.csv`` and ``a.jsonl`` keep their own lists."""
        return self.output.with_name(self.output.name + ".skipped.tsv")

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
            raise FileExistsError(
                f"{_shown(self.output)} exists; pass another --writer.output, or --writer.overwrite=true to replace "
                f"it (PredictionWriter(overwrite=True) in Python)"
            )
        if trainer.limit_predict_batches == 0:
            raise ValueError(
                f"trainer.limit_predict_batches=0 predicts no image, so {_shown(self.output)} would not be written; "
                f"remove the setting or pass a positive number"
            )
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self._run = trainer.strategy.broadcast(uuid.uuid4().hex[:12])  # every rank names its part with one id
        if trainer.is_global_zero:
            self._take_lock()

    def _catch_signals(self) -> None:
        """SIGHUP (a closed terminal or ssh session) stops the run like SIGTERM, at the end of a batch, instead of
        killing it on the spot with the lock and parts left behind; a handler someone else installed is kept."""
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGHUP"):
            return
        self._signal = None
        if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
            self._old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signal = signum

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers = {}

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._classes = getattr(pl_module, "class_names", None)
        datamodule = getattr(trainer, "datamodule", None)
        if not self._classes and datamodule is not None:
            self._classes = getattr(datamodule, "classes", None) or None
            # folder names only name the model's outputs when they line up one to one
            if self._classes and len(self._classes) != getattr(pl_module, "num_classes", None):
                self._classes = None
        self._batches = 0
        self._catch_signals()  # here, after Lightning saved the handlers it restores at its teardown
        # open for the whole stage (closed in on_predict_end / on_exception), so no context manager
        self._fh = open(self._part(trainer.global_rank), "w", encoding="utf-8")  # noqa: SIM115

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
        self._batches += 1
        self._stop_on_signal(trainer)

    def _stop_on_signal(self, trainer: Trainer) -> None:
        """End the run after this batch when SIGTERM (Lightning notes it but its predict loop never checks) or
        SIGHUP arrived: Lightning's exception path then calls :meth:`on_exception`, which removes the parts and
        the lock, and the process exits with ``128 + signal`` (143 for SIGTERM)."""
        signum = signal.SIGTERM if getattr(trainer, "received_sigterm", False) else self._signal
        if signum is None:
            return
        name = signal.Signals(signum).name
        if trainer.is_global_zero:
            sys.stderr.write(
                f"PredictionWriter: stopped by {name} after {self._batches} batches; {_shown(self.output)} was not "
                f"written (a file there from an earlier run is unchanged)\n"
            )
        raise SIGTERMException(128 + int(signum))

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        trainer.strategy.barrier("dsm_prediction_writer_parts")
        if trainer.is_global_zero:
            written, skipped, path, replaced = self._merge(trainer.world_size)
            message = f"PredictionWriter: {written} predictions written to {_shown(path)}"
            if path != self.output:
                message += f" ({_shown(self.output)} appeared while the run went and was left alone)"
            elif replaced:
                message += " (replacing the file that was there: overwrite=True)"
            if skipped:
                message += (
                    f"; {skipped} files skipped: unreadable or not images (listed in {_shown(self.skipped_path)})"
                )
            bar = trainer.progress_bar_callback
            bar.print(message) if bar is not None else print(message)
            self._release()
        trainer.strategy.barrier("dsm_prediction_writer_done")

    def _merge(self, world_size: int) -> Tuple[int, int, Path, bool]:
        """Merge the ranks' parts into the output. Returns (predictions, skipped files, the path written, whether it
        replaced a file); without ``overwrite`` an existing file is never replaced: the predictions get a name of
        their own."""
        rows: Dict[int, Dict[str, Any]] = {}
        skipped: Dict[str, str] = {}
        for rank in range(world_size):
            part = self._part(rank)
            with open(part, encoding="utf-8") as fh:
                for line in fh:
                    row = json.loads(line)
                    if "skipped" in row:
                        skipped.setdefault(row["skipped"], row["reason"])
                    else:
                        rows.setdefault(row["index"], row)
        ordered = [rows[k] for k in sorted(rows)]
        tmp = self._tmp
        # backslashreplace: a name that is not valid UTF-8 holds lone surrogates; they become \\udcXX escapes
        with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
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
                    flat = {"index": row["index"], "path": _cell(row["path"])}
                    if "target" in row:
                        flat["target"] = row["target"]
                    for j in range(k):
                        flat[f"top{j + 1}_class"] = row["classes"][j]
                        flat[f"top{j + 1}_score"] = row["scores"][j]
                        if self._classes:
                            flat[f"top{j + 1}_name"] = _cell(row["names"][j])
                    writer.writerow(flat)
        path, replaced = self.output, self.output.exists()
        if replaced and not self.overwrite:  # appeared while the run went (setup refused one that was there)
            path, replaced = path.with_name(f"{path.stem}.{self._run}{path.suffix}"), False
        os.replace(tmp, path)
        if skipped:
            tmp = self.skipped_path.with_name(f".{self.skipped_path.name}.{self._run}.tmp")
            with open(tmp, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
                table = csv.writer(fh, dialect="excel-tab")
                table.writerow(["path", "reason"])
                table.writerows(
                    (_cell(path), _cell(" ".join(reason.split()))) for path, reason in sorted(skipped.items())
                )
            os.replace(tmp, self.skipped_path)
        else:
            self.skipped_path.unlink(missing_ok=True)  # a list from an earlier run would mislead
        for rank in range(world_size):
            self._part(rank).unlink(missing_ok=True)
        return len(ordered), len(skipped), path, replaced

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
        self.skipped_path.with_name(f".{self.skipped_path.name}.{self._run}.tmp").unlink(missing_ok=True)
        self._release()
        self._restore_signals()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()
        self._restore_signals()


def _cell(value: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading ``= + - @``, tab or carriage return (a formula) gets ``'``."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def _shown(path: Path) -> str:
    """``path`` for a message: printable whatever its bytes (a name that is not UTF-8 keeps \\udcXX escapes)."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _owner(lock: Path) -> str:
    """Who holds ``lock``, from what it holds (``<pid> <host>``), for a message."""
    try:
        words = lock.read_text(errors="replace").split()
    except OSError:
        words = []
    pid = words[0] if words and words[0].isdigit() else "?"
    return f"process {pid}" + (f" on {words[1]}" if len(words) > 1 else "")


def _alive(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
