"""Small-batch latency: dense vs DSM at batch 1, 4, 16, 64, eager and compiled, on CPU or CUDA.

    python -m benchmarks.latency                      # CPU, eager + compiled, ViT-S/16 and DINOv2-S/14 shapes
    python -m benchmarks.latency --device cuda        # GPU: CUDA-event timing, fp32 and bf16 autocast
    python -m benchmarks.latency --modes compiled blocks --oracle   # + the compiled oracle, regional compilation

Random-init weights (latency does not depend on them). Per model, batch and mode, the dense and the merged model
(``apply_dsm`` with the default config: 0.55x the dense block FLOPs) run interleaved after warm-up; the table shows
median milliseconds per batch, speedup = dense / merged time, and efficiency = speedup / FLOP reduction (1.0 =
merging costs nothing beyond the FLOPs it removes). ``compiled`` rows use ``torch.compile(fullgraph=True)`` on the
whole model (the oracle too, with ``--oracle``), ``blocks`` rows regional compilation (``compile_blocks``, the dense
model compiled the same way); both report each variant's first-call time in this process (cold only for the first
model and mode: ``benchmarks/compile_time.py`` measures cold compile time properly, one fresh process each).
Writes ``<out>.csv`` / ``<out>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import environment, markdown_table, median, write_rows
from dsm_lightning import apply_dsm, compile_blocks, token_plan
from dsm_lightning.app.module import build_model
from dsm_lightning.flops import count_flops

MODELS = {
    "vit_small_patch16_224": {},
    "vit_small_patch14_dinov2": {"img_size": 224},  # the reference model's shape (16x16 patches + cls, LayerScale)
}


def token_dropping_oracle(model, plan):
    """The dense timm model's blocks with the plan's token counts but no merge work: after each block's attention
    the extra tokens are simply dropped. Its time is what the FLOP reduction could buy with a free merge, so
    ``dense / oracle`` bounds the speedup and ``oracle`` vs ``dsm`` is the merge overhead."""
    p = plan.num_prefix_tokens

    def run(x):
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for blk, bp in zip(model.blocks, plan.blocks):
            x = x + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(x))))
            x = x[:, : p + bp.tokens_out]
            x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
        return model.forward_head(model.norm(x))

    return run


def timer(device: str):
    """``measure(fn) -> seconds``: CUDA events on a GPU, ``perf_counter`` on CPU."""
    if device.startswith("cuda"):

        def measure(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3

        return measure

    def measure(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return measure


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled", "blocks"])
    parser.add_argument("--dtypes", nargs="+", default=None, help="fp32 and/or bf16 (autocast); GPU default both")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: more for small batches)")
    parser.add_argument("--oracle", action="store_true", help="also time the token-dropping oracle (timm)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = args.dtypes or (["fp32", "bf16"] if args.device.startswith("cuda") else ["fp32"])
    out = args.out or Path(__file__).parent / "results" / (
        "latency_gpu" if args.device.startswith("cuda") else "latency_cpu"
    )
    measure = timer(args.device)
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        dense = build_model(name, **MODELS.get(name, {})).eval().to(args.device)
        merged = apply_dsm(copy.deepcopy(dense))
        size = dense.patch_embed.img_size
        probe = torch.randn(1, 3, *size, device=args.device)
        reduction = count_flops(dense, probe) / count_flops(merged, probe)
        for mode in args.modes:
            for dtype in dtypes:
                autocast = (
                    torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16)
                    if dtype == "bf16"
                    else contextlib.nullcontext()
                )
                fns, compile_s = {"dense": dense, "dsm": merged}, {}
                if args.oracle and mode != "blocks":
                    fns["oracle"] = token_dropping_oracle(dense, token_plan(merged))
                if mode != "eager":
                    torch._dynamo.reset()
                if mode == "compiled":
                    fns = {k: torch.compile(m, fullgraph=True) for k, m in fns.items()}
                elif mode == "blocks":  # each variant on its own copy: compile_blocks changes the model in place
                    fns = {k: compile_blocks(copy.deepcopy(m)) for k, m in fns.items()}
                for batch in args.batches:
                    x = torch.randn(batch, 3, *size, device=args.device)
                    with torch.inference_mode(), autocast:
                        for key, fn in fns.items():  # warm-up; the first call of a compiled variant compiles it
                            t0 = time.perf_counter()
                            fn(x)
                            if mode != "eager" and key not in compile_s:
                                compile_s[key] = time.perf_counter() - t0
                            for _ in range(2):
                                fn(x)
                        repeats = args.repeats or max(5, 64 // batch)
                        times = {k: [] for k in fns}
                        for _ in range(repeats):
                            for key, fn in fns.items():
                                times[key].append(measure(lambda fn=fn, x=x: fn(x)))
                    dense_ms, dsm_ms = 1e3 * median(times["dense"]), 1e3 * median(times["dsm"])
                    row = {
                        "model": name,
                        "mode": mode,
                        "dtype": dtype,
                        "batch": batch,
                        "dense_ms": dense_ms,
                        "dsm_ms": dsm_ms,
                        "flop_reduction": reduction,
                        "speedup": dense_ms / dsm_ms,
                        "efficiency": dense_ms / dsm_ms / reduction,
                        "repeats": repeats,
                    }
                    if "oracle" in times:
                        row["oracle_ms"] = 1e3 * median(times["oracle"])
                        row["oracle_efficiency"] = dense_ms / row["oracle_ms"] / reduction
                    if compile_s:
                        row["compile_dense_s"], row["compile_dsm_s"] = compile_s["dense"], compile_s["dsm"]
                    rows.append(row)
                    print(markdown_table([row], list(row)).splitlines()[-1], flush=True)
    cols = ["model", "mode", "dtype", "batch", "dense_ms", "dsm_ms", "flop_reduction", "speedup", "efficiency"]
    if args.oracle:
        cols += ["oracle_ms", "oracle_efficiency"]
    print(markdown_table(rows, cols))
    write_rows(rows, out, {"env": environment(args.device), "argv": sys.argv[1:]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
