"""Does the quality guard keep its promise? Simulated over many random orders of held-out images.

    python benchmarks/guard_promise.py --reference ../shared/reference/dinov2_s14_fmnist.json --pool-size 600

A user experiences the guard like this: the first ``guard_images`` images of a stage run dense, the guard picks a
schedule on them, and the rest of the stage runs merged. So, per random order of a held-out pool: the guard sees
the first ``guard_images`` images and chooses among its candidates (``guard_candidates(DSMConfig())``, bisection
as in ``quality_guard``); the *stage* agreement is the chosen schedule's top-1 agreement with dense on the remaining
images. The promise "agreement >= min_agreement" is broken when the stage agreement falls below it. Per-image
agreement of every candidate is computed once on the pool (``eval`` pool of ``benchmarks/fmnist_pool.py``: never
fitted on, never chosen on), so thousands of orders cost nothing.

Policies compared: the point estimate (``guard_confidence=None``: pass when the observed agreement reaches the
target) and the one-sided binomial test of ``quality_guard(confidence=c)`` (pass only when that many agreements
would have probability <= 1 - c were the true agreement only the target). Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment
from pareto import load, run

from dsm_lightning import DSMConfig, apply_dsm, remove_dsm, token_plan
from dsm_lightning.guard import binomial_pass, guard_candidates


def choose(hits: torch.Tensor, n: int, target: float, confidence: Optional[float]) -> int:
    """Index of the candidate the guard's bisection picks from per-candidate ``hits`` on ``n`` images (len = dense)."""
    lo, hi = 0, hits.numel()
    while lo < hi:
        mid = (lo + hi) // 2
        if binomial_pass(int(hits[mid]), n, target, confidence):
            hi = mid
        else:
            lo = mid + 1
    return lo


def simulate(agree: torch.Tensor, ratios: List[float], guard: int, target: float, confidence, orders: int) -> dict:
    """``agree``: [candidates, images] 0/1. Returns the broken-promise rate and mean FLOP ratio over the orders."""
    g = torch.Generator().manual_seed(0)
    broken, flops, dense = 0, 0.0, 0
    for _ in range(orders):
        perm = torch.randperm(agree.shape[1], generator=g)
        seen, rest = perm[:guard], perm[guard:]
        pick = choose(agree[:, seen].sum(1), guard, target, confidence)
        if pick == agree.shape[0]:
            dense += 1
            flops += 1.0
            continue
        broken += int(agree[pick, rest].float().mean() < target)
        flops += ratios[pick]
    return {"broken": broken / orders, "mean_flops_ratio": flops / orders, "dense": dense / orders}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--pool-size", type=int, default=600)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.97, 0.95])
    parser.add_argument("--guard-images", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guard_promise")
    args = parser.parse_args(argv)
    from fmnist_pool import load_pool

    module, transform = load(args)
    model = module.model
    images, _, _ = load_pool("eval", args.pool_size, transform, args.shared, args.idx_dir)
    cache_path = args.out.with_suffix(".pt")
    cache: Dict[str, torch.Tensor] = torch.load(cache_path, weights_only=True) if cache_path.exists() else {}
    candidates = guard_candidates(DSMConfig())
    dims = (model.embed_dim, model.blocks[0].mlp.fc1.out_features)
    ratios = [token_plan(model, c).flops_ratio(*dims) for c in candidates]
    for name, cfg in [("dense", None), *((f"flops_target={c.flops_target:g}", c) for c in candidates)]:
        if name not in cache:
            if cfg is not None:
                apply_dsm(model, cfg)
            cache[name] = run(model, images, args.batch).argmax(-1)
            remove_dsm(model)
            torch.save(cache, cache_path)
            print(f"{name}: done", flush=True)
    dense = cache["dense"]
    agree = torch.stack([(cache[f"flops_target={c.flops_target:g}"] == dense) for c in candidates]).int()
    rows = []
    for target in args.targets:
        for guard in args.guard_images:
            for confidence in (None, 0.9):
                res = simulate(agree, ratios, guard, target, confidence, args.orders)
                rows.append({"target": target, "guard_images": guard, "confidence": confidence, **res})
                print(rows[-1], flush=True)
    true = {f"flops_target={c.flops_target:g}": float(a.float().mean()) for c, a in zip(candidates, agree)}
    meta = {"env": environment("cpu"), "images": len(images), "orders": args.orders, "pool_agreement": true}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"{len(images)} held-out images, {args.orders} random orders each; agreement of each candidate on the whole "
        f"pool: " + ", ".join(f"{k} {v:.3f}" for k, v in true.items()),
        "",
        "| min_agreement | guard_images | policy | promise broken (stage agreement < target) | mean block FLOPs "
        "(x dense) | stayed dense |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        policy = "point estimate" if r["confidence"] is None else f"binomial test, confidence {r['confidence']}"
        lines.append(
            f"| {r['target']} | {r['guard_images']} | {policy} | {100 * r['broken']:.1f}% | "
            f"{r['mean_flops_ratio']:.3f} | {100 * r['dense']:.1f}% |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
