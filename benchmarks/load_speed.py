"""Merged against dense on a CPU that other processes keep busy: the load is started by this script.

    python -m benchmarks.load_speed --loads 0 1 2 4

For each load N (run in increasing order: the policy reads the one-minute load average, which falls slowly), N
background processes each run 2-thread torch matmuls in a loop; after ``--settle`` seconds (so the load average
has risen) the variants are timed in interleaved rounds on one batch, the first ``--warmup`` rounds untimed,
medians of ``--repeats`` rounds, ratios against dense of the same load. Model: a random-init timm ViT-S/16 at 224
(speed does not depend on the weights), batch ``--batch``, ``--threads`` torch threads (the user's setting).

Variants: ``dense``; ``dense, 1 thread`` (what dense would do with the single thread DSM drops to); ``default``
(``DSMConfig()``, the engine's thread policy on: :func:`dsm_lightning.engine.busy_threads`); ``default, policy
off`` (``DSM_CPU_THREADS=off``: torch's threads always); ``tome16`` / ``tome16, policy off`` (``DSMConfig.tome(16)``).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from benchmarks.common import write_report
from dsm_lightning import DSMConfig, apply_dsm

BURNER = "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


def variant(model: torch.nn.Module, x: torch.Tensor, policy: str, threads: int) -> Callable[[], float]:
    """Seconds of one ``model(x)`` with ``DSM_CPU_THREADS=policy`` and ``threads`` torch threads."""

    def run() -> float:
        os.environ["DSM_CPU_THREADS"] = policy
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                model(x)
                return time.perf_counter() - t0
        finally:
            torch.set_num_threads(before)

    return run


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--settle", type=float, default=40.0, help="seconds of load before timing starts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "load_speed_cpu")
    args = parser.parse_args(argv)
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", num_classes=10).eval()
    x = torch.randn(args.batch, 3, 224, 224)
    default = apply_dsm(copy.deepcopy(model), DSMConfig())
    tome = apply_dsm(copy.deepcopy(model), DSMConfig.tome(16))
    fns: Dict[str, Callable[[], float]] = {
        "dense": variant(model, x, "auto", args.threads),
        "dense, 1 thread": variant(model, x, "auto", 1),
        "default": variant(default, x, "auto", args.threads),
        "default, policy off": variant(default, x, "off", args.threads),
        "tome16": variant(tome, x, "auto", args.threads),
        "tome16, policy off": variant(tome, x, "off", args.threads),
    }
    rows, lines = [], []
    for load in sorted(args.loads):
        burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(load)]
        try:
            time.sleep(args.settle if load else 0.0)
            for _ in range(args.warmup):
                for fn in fns.values():
                    fn()
            times: Dict[str, List[float]] = {k: [] for k in fns}
            averages = []
            for _ in range(args.repeats):
                averages.append(os.getloadavg()[0])
                for name, fn in fns.items():
                    times[name].append(fn())
        finally:
            for p in burners:
                p.kill()
            for p in burners:
                p.wait()
        base = statistics.median(times["dense"])
        lines.append(
            f"\n**{load} background processes** (one-minute load average {min(averages):.1f}-{max(averages):.1f})\n"
        )
        lines.append("| variant | median s per batch | speedup vs dense |")
        lines.append("|---|---|---|")
        for name, t in times.items():
            med = statistics.median(t)
            lines.append(f"| {name} | {med:.3f} | {base / med:.2f}x |")
            rows.append({"load": load, "variant": name, "median_s": med, "speedup": base / med, "loadavg": averages})
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": len(os.sched_getaffinity(0)),
        "threads": args.threads,
        "batch": args.batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    text = (
        f"Random-init ViT-S/16 at 224, batch {args.batch}, {args.threads} torch threads, "
        f"{meta['cpus']} CPUs; each background process runs 2-thread 512x512 matmuls in a loop. "
        f"{args.repeats} interleaved rounds after {args.warmup} untimed, medians; ratios against dense at the same "
        f"load. The thread policy (`DSM_CPU_THREADS=auto`) runs merged blocks on one thread when the one-minute load "
        f"average exceeds 1.5x the CPUs.\n" + "\n".join(lines)
    )
    write_report(args.out, meta, rows, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
