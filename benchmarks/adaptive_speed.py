"""Speed of adaptive merging against the fixed default and dense, eager and with regional compilation.

    python -m benchmarks.adaptive_speed --reference ../shared/reference/dinov2_s14_fmnist.json \\
        --fitted benchmarks/results/adaptive.json

The adaptive thresholds come from ``benchmarks/adaptive.py``'s results (fitted on the ``dev`` pool). Timed on
held-out ``eval`` images: at batch 1 one call runs 16 images one after the other (so per-image token counts vary
as they do in a stage), at batch 16 one call is one batch of 16 different images. Variants are interleaved in one
process; the first ``--warmup`` rounds are not timed; medians of ``--repeats`` rounds, ratios against dense of the
same run. ``--compile`` adds :func:`dsm_lightning.compile_blocks` (inductor) variants and counts their graphs.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Dict

import torch

from benchmarks.common import environment, median, time_interleaved, write_report
from benchmarks.pareto import load
from dsm_lightning import DSMConfig, adaptive_flops, apply_dsm, compile_blocks, get_adapter, token_plan


def variant(model: torch.nn.Module, config, batches, compiled: bool) -> Callable[[], object]:
    """A copy of ``model`` patched with ``config`` (dense when None), returned as a callable over ``batches``."""
    import copy

    m = copy.deepcopy(model)
    if config is not None:
        apply_dsm(m, config)
    graphs = [0]
    if compiled:
        from torch._inductor.compile_fx import compile_fx

        def counting(gm, example_inputs):  # inductor, counting the graphs it is given
            graphs[0] += 1
            return compile_fx(gm, example_inputs)

        compile_blocks(m, backend=counting)

    def fn():
        with torch.inference_mode():
            for x in batches:
                m(x)

    fn.model = m  # type: ignore[attr-defined]
    fn.graphs = graphs  # type: ignore[attr-defined]
    return fn


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--fitted", type=Path, required=True, help="benchmarks/adaptive.py's JSON")
    parser.add_argument("--budget", default="1.8x")
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "adaptive_speed_cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from benchmarks.fmnist_pool import load_pool

    module, transform = load(args)
    model = module.model.eval()
    images, _, _ = load_pool("eval", 32, transform, args.shared, args.idx_dir)
    row = next(r for r in json.loads(args.fitted.read_text())["rows"] if r["row"] == f"adaptive@{args.budget}")
    adaptive = DSMConfig.from_dict(row["config"])
    fixed = adaptive.replace(threshold=None)
    dims = get_adapter(model).dims(model)
    lines, results = [], []
    for batch in (1, 16):
        batches = [images[i : i + batch] for i in range(0, 16, batch)] if batch == 1 else [images[:16]]
        fns: Dict[str, Callable[[], object]] = {
            "dense": variant(model, None, batches, False),
            "fixed": variant(model, fixed, batches, False),
            "adaptive": variant(model, adaptive, batches, False),
        }
        if args.compile:
            fns["dense compiled"] = variant(model, None, batches, True)
            fns["fixed compiled"] = variant(model, fixed, batches, True)
            fns["adaptive compiled"] = variant(model, adaptive, batches, True)
        times = time_interleaved(fns, args.repeats, args.warmup, "cpu")
        base = median(times["dense"])
        spent = [adaptive_flops(fns["adaptive"].model, x) for x in batches]  # type: ignore[attr-defined]
        flops = {
            "dense": 1.0,
            "fixed": token_plan(fns["fixed"].model).flops_ratio(*dims),  # type: ignore[attr-defined]
            "adaptive": sum(s.spent for s in spent) / len(spent),
        }
        lines.append(f"\n**batch {batch}** (16 images per call)\n")
        lines.append("| variant | median s per call | speedup vs dense | block FLOPs spent | efficiency | graphs |")
        lines.append("|---|---|---|---|---|---|")
        for name, t in times.items():
            f = flops[name.split()[0]]
            speedup = base / median(t)
            graphs = fns[name].graphs[0] if "compiled" in name else ""  # type: ignore[attr-defined]
            lines.append(f"| {name} | {median(t):.3f} | {speedup:.2f}x | {f:.3f}x | {speedup * f:.2f} | {graphs} |")
            results.append(
                {
                    "batch": batch,
                    "variant": name,
                    "median_s": median(t),
                    "speedup": speedup,
                    "flops": f,
                    "graphs": graphs,
                }
            )
    meta = {"env": environment("cpu"), "threads": args.threads, "budget": args.budget, "repeats": args.repeats}
    text = (
        f"Eager CPU, {args.threads} threads, {args.repeats} interleaved rounds after {args.warmup} untimed; "
        f"efficiency = speedup x block FLOPs spent (1.0: time falls as FLOPs do); graphs: inductor graphs compiled "
        f"by the variant over all its calls (warm-up included).\n" + "\n".join(lines)
    )
    write_report(args.out, meta, results, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
