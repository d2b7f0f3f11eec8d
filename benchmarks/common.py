"""Helpers shared by the benchmark scripts: interleaved timing and result files."""

from __future__ import annotations

import csv
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def forward_fn(model: Callable, images: torch.Tensor) -> Callable[[], object]:
    """A no-argument callable running ``model(images)`` under ``torch.inference_mode`` (what gets timed)."""

    def fn():
        with torch.inference_mode():
            return model(images)

    return fn


def time_interleaved(
    fns: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: str
) -> Dict[str, List[float]]:
    """Run every fn ``warmup`` times, then ``repeats`` rounds where each round calls every fn once (interleaved,
    so drift in machine speed hits all variants alike). Returns seconds per call, per variant."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def write_rows(rows: List[dict], out: Path, meta: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    keys: List[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and not isinstance(row[k], (list, dict))]
    with open(out.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with open(out.with_suffix(".json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)


def write_report(out: Path, meta: dict, rows: List[dict], text: str) -> None:
    """``<out>.json`` (meta and rows) and ``<out>.md`` (``text``), and ``text`` printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


def markdown_table(rows: List[dict], cols: Sequence[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
