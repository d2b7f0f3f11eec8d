"""Cold compile time: dense vs DSM, whole-model ``torch.compile`` vs regional (``compile_blocks``).

    python -m benchmarks.compile_time                  # ViT-S/16 and the DINOv2-S/14 shape, 3 rounds
    python -m benchmarks.compile_time --rounds 2 --models vit_small_patch16_224

Every measurement runs in a fresh process with an empty inductor cache (``TORCHINDUCTOR_CACHE_DIR`` set to a new
temporary folder), so nothing compiled earlier is reused; the variants take turns within each round (interleaved),
and the table reports the median over rounds. Compile time is the first call at batch 1 (Dynamo tracing, inductor
code generation and the C++ compiler; the forward itself adds ~0.1 s) and the graph count is Dynamo's. The default
merged model is ``apply_dsm`` with the default config. Writes ``<out>.csv`` / ``<out>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {"vit_small_patch16_224": {}, "vit_small_patch14_dinov2": {"img_size": 224}}
VARIANTS = ["dense/whole", "dense/blocks", "dsm/whole", "dsm/blocks"]


def child(model_name: str, variant: str, threads: int) -> dict:
    """Compile one variant in this (fresh) process and time its first call."""
    import torch
    import torch._dynamo.utils

    from dsm_lightning import apply_dsm, compile_blocks
    from dsm_lightning.app.module import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name, **MODELS.get(model_name, {})).eval()
    kind, how = variant.split("/")
    if kind == "dsm":
        apply_dsm(model)
    x = torch.randn(1, 3, *model.patch_embed.img_size)
    with torch.inference_mode():
        ref = model(x)
        fn = compile_blocks(model) if how == "blocks" else torch.compile(model, fullgraph=True)
        t0 = time.perf_counter()
        out = fn(x)
        seconds = time.perf_counter() - t0
    return {
        "model": model_name,
        "variant": variant,
        "compile_s": seconds,
        "graphs": int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
        "max_abs_diff": float((out - ref).abs().max()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "compile_time_cpu")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return 0

    from benchmarks.common import environment, markdown_table, median, write_rows

    runs = []
    for name in args.models:
        for round_index in range(args.rounds):
            for variant in args.variants:
                with tempfile.TemporaryDirectory() as cache:
                    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                    cmd = [sys.executable, __file__, "--child", name, variant, "--threads", str(args.threads)]
                    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                run = json.loads(done.stdout.strip().splitlines()[-1])
                runs.append({**run, "round": round_index})
                seconds, graphs = run["compile_s"], run["graphs"]
                print(f"{name} {variant} round {round_index}: {seconds:.1f} s, {graphs} graphs", flush=True)
    rows = []
    for name in args.models:
        base = median([r["compile_s"] for r in runs if r["model"] == name and r["variant"] == "dense/whole"])
        for variant in args.variants:
            mine = [r for r in runs if r["model"] == name and r["variant"] == variant]
            seconds = median([r["compile_s"] for r in mine])
            rows.append(
                {
                    "model": name,
                    "variant": variant,
                    "compile_s": seconds,
                    "vs_dense_whole": seconds / base,
                    "graphs": mine[0]["graphs"],
                    "runs_s": [round(r["compile_s"], 1) for r in mine],
                    "max_abs_diff": max(r["max_abs_diff"] for r in mine),
                }
            )
    print(markdown_table(rows, ["model", "variant", "compile_s", "vs_dense_whole", "graphs", "runs_s"]))
    write_rows(rows, args.out, {"env": environment("cpu"), "argv": sys.argv[1:], "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
