"""Where the batch-1 time goes: dense vs token-dropping oracle vs DSM, op by op (``torch.profiler``, CPU).

    python -m benchmarks.latency_ops --model vit_small_patch16_224

Profiles ``--iters`` forwards of each variant at batch 1 after warm-up (the three interleaved, each profiled
``--rounds`` times; per-op times are the median over rounds, per forward) and groups the aten ops: matrix multiplies,
fused attention, the merge ops (matching, index and scatter ops, sorting), and the rest (norms, activations,
elementwise). ``oracle`` runs the dense blocks with the plan's token counts and no merge work (tokens dropped), so
``oracle`` vs ``dense`` is what fewer tokens buy and ``dsm`` vs ``oracle`` is what merging costs.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import environment, markdown_table, write_rows
from benchmarks.latency import MODELS, token_dropping_oracle
from dsm_lightning import apply_dsm, token_plan
from dsm_lightning.app.module import build_model

GROUPS = {
    "matmul (addmm, mm, bmm)": ("aten::addmm", "aten::mm", "aten::bmm"),
    "fused attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",),
    "merge: index / scatter / gather": (
        "aten::index_select", "aten::index_add_", "aten::index", "aten::scatter_", "aten::scatter_add_",
        "aten::gather",
    ),
    "merge: sort / max / topk / norm": (
        "aten::sort", "aten::argsort", "aten::max", "aten::topk", "aten::linalg_vector_norm",
    ),
    "index building (arange, cat, stack, copy)": ("aten::arange", "aten::cat", "aten::stack", "aten::copy_"),
}  # fmt: skip


def group_of(name: str) -> str:
    for group, names in GROUPS.items():
        if name in names:
            return group
    return "rest (norms, GELU, softmax, elementwise, views)"


def profile_ms(fn: Callable[[], object], iters: int) -> Dict[str, float]:
    """Self CPU milliseconds per forward, per op group, plus the wall total."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    out: Dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[group_of(event.key)] += event.self_cpu_time_total / 1e3 / iters
    out["total (self CPU)"] = sum(out.values())
    return dict(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_small_patch16_224", choices=sorted(MODELS))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "latency_ops_cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dense = build_model(args.model, **MODELS[args.model]).eval()
    merged = apply_dsm(copy.deepcopy(dense))
    plan = token_plan(merged)
    x = torch.randn(1, 3, 224, 224)
    oracle = token_dropping_oracle(dense, plan)
    variants = {"dense": lambda: dense(x), "oracle": lambda: oracle(x), "dsm": lambda: merged(x)}
    runs: Dict[str, List[Dict[str, float]]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():
            for _ in range(5):
                fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                runs[name].append(profile_ms(fn, args.iters))
    keys = sorted({k for r in runs.values() for run in r for k in run}, key=lambda k: (k.startswith("total"), k))
    rows = []
    for key in keys:
        row = {"ops": key}
        for name in variants:
            row[f"{name}_ms"] = statistics.median(run.get(key, 0.0) for run in runs[name])
        row["dsm_minus_oracle_ms"] = row["dsm_ms"] - row["oracle_ms"]
        rows.append(row)
    print(f"{args.model}, batch 1, default schedule ({plan.config}), ms per forward (median of {args.rounds} rounds)")
    print(markdown_table(rows, ["ops", "dense_ms", "oracle_ms", "dsm_ms", "dsm_minus_oracle_ms"]))
    write_rows(rows, args.out, {"env": environment("cpu"), "model": args.model, "iters": args.iters})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
