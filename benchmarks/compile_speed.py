"""Eager vs torch.compile (inductor), whole model vs regional (``compile_blocks``), dense vs DSM, interleaved.

    python -m benchmarks.compile_speed --models vit_small_patch16_224 vit_base_patch16_224 --batch 16

Reports first-call time (compile; warm or cold inductor cache as found: ``benchmarks/compile_time.py`` measures
cold compile time in fresh processes), images/s (median of interleaved rounds) and ratios against compiled dense.
The merged model is ``DSMConfig()`` with ``--delay`` / ``--flops-target`` on top. Target: compiled DSM >= 0.9 x
(compiled dense images/s x FLOP reduction).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from benchmarks.common import environment, forward_fn, markdown_table, median, time_interleaved, write_rows
from dsm_lightning import DSMConfig, apply_dsm, compile_blocks
from dsm_lightning.app.module import build_model
from dsm_lightning.flops import count_flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--delay", type=int, default=DSMConfig.delay)
    parser.add_argument("--flops-target", type=float, default=0.55)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for model_name in args.models:
        dense = build_model(model_name).eval().to(args.device)
        dsm = apply_dsm(copy.deepcopy(dense), delay=args.delay, flops_target=args.flops_target)
        images = torch.randn(args.batch, 3, 224, 224, device=args.device)
        flops = {"dense": count_flops(dense, images[:1]), "dsm": count_flops(dsm, images[:1])}
        variants, compile_s = {}, {}
        for name, model in (("dense", dense), ("dsm", dsm)):
            variants[f"eager {name}"] = model
            compiled = {
                "compiled": torch.compile(model, fullgraph=True),
                "blocks": compile_blocks(copy.deepcopy(model)),  # regional, on its own copy
            }
            for how, fn in compiled.items():
                t0 = time.perf_counter()
                with torch.inference_mode():
                    fn(images)
                compile_s[f"{how} {name}"] = time.perf_counter() - t0
                variants[f"{how} {name}"] = fn

        times = time_interleaved({k: forward_fn(m, images) for k, m in variants.items()}, args.repeats, 1, args.device)
        ips = {k: args.batch / median(v) for k, v in times.items()}
        flop_ratio = flops["dense"] / flops["dsm"]
        for name in variants:
            kind = name.split()[1]
            row = {
                "model": model_name,
                "variant": name,
                "gflops": flops[kind] / 1e9,
                "img_per_s": ips[name],
                "vs_eager_dense": ips[name] / ips["eager dense"],
                "vs_compiled_dense": ips[name] / ips["compiled dense"],
                "compile_s": compile_s.get(name, 0.0),
            }
            rows.append(row)
        target = ips["compiled dense"] * flop_ratio
        for row in rows[-len(variants) :]:
            if row["variant"] in ("compiled dsm", "blocks dsm"):
                row["target_ratio"] = row["img_per_s"] / target
        print(
            f"{model_name}: compiled DSM {ips['compiled dsm']:.1f} img/s = {ips['compiled dsm'] / target:.2f} x "
            f"(compiled dense {ips['compiled dense']:.1f} x FLOP reduction {flop_ratio:.2f})",
            flush=True,
        )
    cols = [
        "model",
        "variant",
        "gflops",
        "img_per_s",
        "vs_eager_dense",
        "vs_compiled_dense",
        "compile_s",
        "target_ratio",
    ]
    print(markdown_table(rows, cols))
    write_rows(
        rows,
        args.out,
        {
            "env": environment(args.device),
            "batch": args.batch,
            "repeats": args.repeats,
            "delay": args.delay,
            "flops_target": args.flops_target,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
