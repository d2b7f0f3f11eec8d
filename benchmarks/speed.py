"""Throughput and FLOPs: dense vs ToMe-equivalent vs DSM schedules, interleaved in one run.

    python -m benchmarks.speed --models vit_small_patch16_224 vit_base_patch16_224 --batch 16

Random-init weights (speed does not depend on them). GFLOPs come from ``torch.utils.flop_counter``; images/s is the
median over ``--repeats`` interleaved rounds after warm-up. Ratios are against the dense model of the same run.
Prints a Markdown table and writes ``<out>.csv`` / ``<out>.json`` (the JSON holds per-block token counts).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.common import environment, forward_fn, markdown_table, median, time_interleaved, write_rows
from dsm_lightning import apply_dsm, get_adapter, token_plan
from dsm_lightning.app.module import build_model
from dsm_lightning.flops import count_flops

# name -> DSMConfig overrides; flops_target picks r so ToMe and DSM are compared at matched planned FLOPs.
TOME = dict(delay=0, local_blocks=0, schedule="constant", metric="keys", protect=0.0)
SCHEDULES = {
    "dense": None,
    "tome (delay 0, global, constant r, keys)": dict(TOME, flops_target=0.55),
    "tome, proportional r": dict(TOME, schedule="proportional", flops_target=0.55),
    "default (proportional, tokens, protect 0.2)": dict(flops_target=0.55),
    "dsm delay=2, 2 local blocks, keys": dict(delay=2, local_blocks=2, metric="keys", protect=0.0, flops_target=0.55),
    "default with delay=4": dict(delay=4, flops_target=0.55),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["vit_small_patch16_224", "vit_base_patch16_224"],
        help="timm names, or torchvision:vit_b_16",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speed_cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows, plans = [], {}
    for model_name in args.models:
        base = build_model(model_name).eval().to(args.device)
        size = tuple(get_adapter(base).grid(base))
        patch = 224 // size[0]
        images = torch.randn(args.batch, 3, size[0] * patch, size[1] * patch, device=args.device)
        variants = {}
        for sched, cfg in SCHEDULES.items():
            model = copy.deepcopy(base)
            if cfg is not None:
                apply_dsm(model, **cfg)
            variants[sched] = model
        flops = {k: count_flops(m, images[:1]) / 1e9 for k, m in variants.items()}

        times = time_interleaved(
            {k: forward_fn(m, images) for k, m in variants.items()}, args.repeats, args.warmup, args.device
        )
        dense_ips = args.batch / median(times["dense"])
        for sched, m in variants.items():
            ips = args.batch / median(times[sched])
            row = {
                "model": model_name,
                "schedule": sched,
                "gflops": flops[sched],
                "flops_ratio": flops["dense"] / flops[sched],
                "img_per_s": ips,
                "speedup": ips / dense_ips,
            }
            row["efficiency"] = row["speedup"] / row["flops_ratio"]
            if sched != "dense":
                plan = token_plan(m)
                row["r"] = plan.r
                row["tokens"] = [b["tokens_out"] for b in plan.rows()]
                plans[f"{model_name}/{sched}"] = plan.table(*get_adapter(m).dims(m))
            rows.append(row)
            print(
                f"{model_name:28s} {sched:36s} {flops[sched]:7.2f} GFLOPs  {ips:8.1f} img/s  x{row['speedup']:.2f}",
                flush=True,
            )
    cols = ["model", "schedule", "r", "gflops", "flops_ratio", "img_per_s", "speedup", "efficiency"]
    print()
    print(markdown_table(rows, cols))
    for key, table in plans.items():
        print(f"\n{key}\n{table}")
    write_rows(
        rows, args.out, {"env": environment(args.device), "batch": args.batch, "repeats": args.repeats, "plans": plans}
    )
    print(f"\nwrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
