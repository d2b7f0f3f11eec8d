"""How stable is the callback's own ``dsm/speedup``? Run the README's demo configs several times in one process.

Each run is a fresh ``python -m dsm_lightning`` command line (``dsm_lightning.app.cli.cli``) on a shipped config, with
the guard off (random weights) and ``compare_dense=True``; the callback times the merged and the dense forward of
every batch back to back and leaves out each variant's first (cold) batch. The spread of ``dsm/speedup`` over the
runs is what a user sees when repeating a command. For reference, the same model and schedule are also timed with
the interleaved harness of ``speed.py`` (median of many calls) in the same process.

    python -m benchmarks.callback_timing --runs 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.common import environment, forward_fn, median, time_interleaved, write_rows

ROOT = Path(__file__).resolve().parents[1]


def run_once(config: str, subcommand: str, out: Path, extra) -> float:
    from dsm_lightning.app.cli import cli
    from dsm_lightning.callback import DSMCallback

    run = cli(
        [
            subcommand,
            "--config",
            str(ROOT / "configs" / config),
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
            f"--writer.output={out / 'p.csv'}",
            *extra,
        ]
    )
    callback = next(c for c in run.trainer.callbacks if isinstance(c, DSMCallback))
    return callback.metrics["dsm/speedup"]


def harness_speedup(batch: int, img: int = 224) -> float:
    import timm

    from dsm_lightning import DSMConfig, apply_dsm

    dense = timm.create_model("vit_small_patch16_224").eval()
    merged = timm.create_model("vit_small_patch16_224").eval()
    merged.load_state_dict(dense.state_dict())
    apply_dsm(merged, DSMConfig(delay=4))
    x = torch.randn(batch, 3, img, img)
    times = time_interleaved(
        {"dense": forward_fn(dense, x), "dsm": forward_fn(merged, x)}, repeats=15, warmup=3, device="cpu"
    )
    return median(times["dense"]) / median(times["dsm"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "callback_timing_cpu"))
    args = parser.parse_args()
    cases = [("predict.yaml", "predict", 1, []), ("validate.yaml", "validate", 8, [])]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config, sub, batch, extra in cases:
            values = [run_once(config, sub, Path(tmp), extra) for _ in range(args.runs)]
            ref = harness_speedup(batch)
            row = {
                "config": config,
                "batch": batch,
                "runs": len(values),
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "spread_pct": 100 * (max(values) - min(values)) / statistics.median(values),
                "harness_speedup": ref,
                "values": values,
            }
            rows.append(row)
            print(
                f"{config} (batch {batch}): dsm/speedup over {len(values)} runs: "
                + ", ".join(f"{v:.2f}" for v in values)
                + f"; median {row['median']:.2f}, range {row['min']:.2f}-{row['max']:.2f}; "
                f"interleaved harness {ref:.2f}",
                flush=True,
            )
    write_rows(rows, Path(args.out), {"env": environment("cpu"), "runs": args.runs})


if __name__ == "__main__":
    main()
