"""Does the quality guard keep its promise in the orders users run? Simulated over random and class-sorted orders.

    python -m benchmarks.guard_promise --reference ../shared/reference/dinov2_s14_fmnist.json --pool-size 1000

The stage is a held-out pool (``eval`` pool of ``benchmarks/fmnist_pool.py``: never fitted on, never chosen on), run
in batches of ``--batch`` in one of these orders: random permutations, and the class-sorted layouts a class-folder
dataset arrives in (Lightning never shuffles evaluation loaders): folders named by label index (``0-t-shirt/
1-trouser/ ...``), alphabetical class names (``ankle-boot/ bag/ coat/ ...``), and the worst case for a guard that
looks at the head, easiest classes first (by the requested schedule's agreement on each class). Per-image agreement
with dense of every candidate (``guard_candidates(DSMConfig())``) is computed once, so each order costs nothing.

Policies, both with the one-sided binomial test at 90% confidence:

- ``head``: the guard before this release. The first ``guard_images`` images run dense, the guard chooses on them
  (bisection as in ``quality_guard``), the rest merge. Its stage agreement is over the merged images.
- ``sampled``: ``QualityGuard``. ``guard_images`` images drawn uniformly from the whole stage choose the schedule
  (a candidate stops, in eighths of the images, once its misses rule out a pass);
  every image of the stage then merges; a random ``--audit`` fraction of batches also runs dense and the guard steps
  to the next lighter candidate when ``evidence_below`` reaches ``1 / (1 - confidence)``. Its stage agreement is
  over every image, each under the schedule active when it ran.

The promise is broken when the stage agreement falls below ``min_agreement``. Reported: how often (over orders, or
over the guard's own random draws for a fixed sorted order), the mean block FLOPs of the merged images, and the
stage's whole cost, counting the guard's dense and candidate passes and the audit's dense passes, in block FLOPs
relative to running the stage dense. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from benchmarks.common import environment
from benchmarks.pareto import load, run
from dsm_lightning import DSMConfig, apply_dsm, remove_dsm, token_plan
from dsm_lightning.guard import binomial_pass, evidence_below, guard_candidates, least_hits

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]


def choose(hits: torch.Tensor, n: int, target: float, confidence: Optional[float], tried: Optional[list] = None) -> int:
    """Index of the candidate the guard's bisection picks from per-candidate ``hits`` on ``n`` images (len = dense);
    the indices it measured are appended to ``tried``."""
    lo, hi = 0, hits.numel()
    while lo < hi:
        mid = (lo + hi) // 2
        if tried is not None:
            tried.append(mid)
        if binomial_pass(int(hits[mid]), n, target, confidence):
            hi = mid
        else:
            lo = mid + 1
    return lo


def evaluated(row: torch.Tensor, least_hits: int, chunks: int = 8) -> float:
    """Fraction of the guard's images a candidate runs on before it stops (``quality_guard`` evaluates in
    ``chunks`` and stops once its misses rule out a pass); ``row``: its 0/1 agreements in the guard's order."""
    n = row.numel()
    step = max(1, math.ceil(n / chunks))
    allowed = n - least_hits
    for k in range(chunks):
        seen = min(n, (k + 1) * step)
        if seen - int(row[:seen].sum()) > allowed:
            return seen / n
    return 1.0


def head_policy(agree, ratios, order, guard, target, confidence) -> dict:
    """The first ``guard`` images of ``order`` choose; the rest merge."""
    seen, rest = order[:guard], order[guard:]
    tried: list = []
    pick = choose(agree[:, seen].sum(1), len(seen), target, confidence, tried)
    cost = len(seen) * (1 + sum(ratios[i] for i in tried))
    if pick == agree.shape[0]:
        return {"agreement": 1.0, "flops": 1.0, "cost": (cost + len(rest)) / len(order), "steps": 0}
    return {
        "agreement": float(agree[pick, rest].float().mean()),
        "flops": (len(seen) + len(rest) * ratios[pick]) / len(order),
        "cost": (cost + len(rest) * ratios[pick]) / len(order),
        "steps": 0,
    }


def sampled_policy(agree, ratios, order, guard, target, confidence, audit, batch, g) -> dict:
    """``guard`` images drawn from the whole stage choose; every image merges; audited batches may step down."""
    n = len(order)
    drawn = order[torch.randperm(n, generator=g)[: min(guard, n)]]
    tried: list = []
    pick = choose(agree[:, drawn].sum(1), len(drawn), target, confidence, tried)
    least = least_hits(len(drawn), target, confidence)
    cost = len(drawn) * (1 + sum(ratios[i] * evaluated(agree[i, drawn], least) for i in tried))
    dense_index = agree.shape[0]
    hits_total, spent, steps = 0.0, 0.0, 0
    since = [0.0, 0]
    for start in range(0, n, batch):
        images = order[start : start + batch]
        current = pick
        if current == dense_index:
            hits_total += len(images)
            spent += len(images)
            continue
        hits = float(agree[current, images].sum())
        hits_total += hits
        spent += len(images) * ratios[current]
        if float(torch.rand((), generator=g)) < audit:
            cost += len(images)
            since[0] += hits
            since[1] += len(images)
            if evidence_below(since[0], since[1], target) >= 1 / (1 - confidence):
                pick, since, steps = current + 1, [0.0, 0], steps + 1
    return {"agreement": hits_total / n, "flops": spent / n, "cost": (cost + spent) / n, "steps": steps}


def sorted_orders(labels: torch.Tensor, agree_requested: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Class-sorted layouts: by label index, by class name, easiest class first (stable within a class)."""
    per_class = {c: float(agree_requested[labels == c].float().mean()) for c in range(len(CLASSES))}
    layouts = {
        "folders by label (0-t-shirt/ 1-trouser/ ...)": list(range(len(CLASSES))),
        "folders by name (ankle-boot/ bag/ coat/ ...)": sorted(range(len(CLASSES)), key=lambda c: CLASSES[c]),
        "easiest classes first": sorted(range(len(CLASSES)), key=lambda c: -per_class[c]),
    }
    return {
        name: torch.cat([torch.nonzero(labels == c).flatten() for c in classes]) for name, classes in layouts.items()
    }


def summarise(results: Sequence[dict], target: float) -> dict:
    return {
        "broken": sum(r["agreement"] < target for r in results) / len(results),
        "mean_agreement": sum(r["agreement"] for r in results) / len(results),
        "mean_flops_ratio": sum(r["flops"] for r in results) / len(results),
        "mean_cost_ratio": sum(r["cost"] for r in results) / len(results),
        "stepped_down": sum(r["steps"] > 0 for r in results) / len(results),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--pool-size", type=int, default=1000)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--confidence", type=float, default=0.9)
    parser.add_argument("--guard-images", type=int, default=None, help="default: QualityGuard's size for the target")
    parser.add_argument("--audit", type=float, default=0.05)
    parser.add_argument("--orders", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "guard_promise")
    parser.add_argument("--cache", type=Path, default=None, help="per-image predictions (default: <out>.pt)")
    args = parser.parse_args(argv)
    from benchmarks.fmnist_pool import load_pool
    from dsm_lightning.guard import QualityGuard

    module, transform = load(args)
    model = module.model
    images, labels, _ = load_pool("eval", args.pool_size, transform, args.shared, args.idx_dir)
    cache_path = args.cache or args.out.with_suffix(".pt")
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
    guard = args.guard_images or QualityGuard(DSMConfig(), args.target, confidence=args.confidence).images
    n = agree.shape[1]
    g = torch.Generator().manual_seed(0)
    rows = []
    random_orders = [torch.randperm(n, generator=g) for _ in range(args.orders)]
    layouts = {"random orders": random_orders}
    for name, order in sorted_orders(labels, agree[0]).items():
        layouts[name] = [order] * args.orders  # one order; the sampled guard's draws and audit coins vary
    for layout, orders in layouts.items():
        head = [head_policy(agree, ratios, o, guard, args.target, args.confidence) for o in orders[:1]]
        if layout == "random orders":
            head = [head_policy(agree, ratios, o, guard, args.target, args.confidence) for o in orders]
        sampled = [
            sampled_policy(agree, ratios, o, guard, args.target, args.confidence, args.audit, args.batch, g)
            for o in orders
        ]
        for policy, results in (("head (first images)", head), ("sampled + audit", sampled)):
            rows.append({"layout": layout, "policy": policy, "runs": len(results), **summarise(results, args.target)})
            print(rows[-1], flush=True)
    true = {f"flops_target={c.flops_target:g}": float(a.float().mean()) for c, a in zip(candidates, agree)}
    meta = {
        "env": environment("cpu"),
        "images": n,
        "orders": args.orders,
        "guard_images": guard,
        "audit": args.audit,
        "batch": args.batch,
        "target": args.target,
        "confidence": args.confidence,
        "pool_agreement": true,
        "flops_ratios": dict(zip(true, ratios)),
    }
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"{n} held-out images as one stage in batches of {args.batch}; min_agreement {args.target}, binomial test at "
        f"{args.confidence:.0%} confidence, {guard} guard images, audit {args.audit:.0%} of batches. Agreement of each "
        f"candidate on the whole pool: " + ", ".join(f"{k} {v:.3f}" for k, v in true.items()),
        "",
        "Random orders: one run per order. A sorted layout is one order: `head` is deterministic there (one run);"
        " `sampled` is run once per seed of its own draws and audit coins. Cost: block FLOPs of the whole stage, the"
        " guard's dense and candidate passes and the audit's dense passes included, relative to running it dense.",
        "",
        "| layout | guard | runs | promise broken | mean stage agreement | mean block FLOPs of the stage (x dense) | "
        "cost with the guard's passes (x dense) | stepped down |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['layout']} | {r['policy']} | {r['runs']} | {100 * r['broken']:.1f}% | {r['mean_agreement']:.4f} | "
            f"{r['mean_flops_ratio']:.3f} | {r['mean_cost_ratio']:.3f} | {100 * r['stepped_down']:.1f}% |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
