"""Which default? Variants of the default schedule at one FLOP budget, on the ``dev`` pool (the pool for choosing).

    python -m benchmarks.dev_variants --reference outputs/reference/clip_b16_fmnist.json --pool-size 400

Each variant changes one choice of ``DSMConfig()`` (matching metric, protection, schedule family, matching order);
official ToMe is bracketed at the default's FLOPs as in ``matched_tome.py``. Per row: GFLOPs, top-1 agreement and
KL x100 against dense, and the paired difference in agreement from the default with its standard error. Images:
the ``dev`` pool of ``benchmarks/fmnist_pool.py`` (disjoint from the ``eval`` pool every reported table uses).
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, Optional

import torch

from benchmarks.common import environment
from benchmarks.matched_tome import bracket, evaluate
from benchmarks.pareto import load, paired_se
from dsm_lightning import DSMConfig

VARIANTS: Dict[str, dict] = {
    "default": {},
    "metric=keys": {"metric": "keys"},
    "protect=0": {"protect": 0.0},
    "keys, protect=0": {"metric": "keys", "protect": 0.0},
    "schedule=constant": {"schedule": "constant"},
    "matching=tome": {"matching": "tome"},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True)
    parser.add_argument("--pool-size", type=int, default=400)
    parser.add_argument("--flops-target", type=float, default=0.55)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from benchmarks.fmnist_pool import load_pool

    module, transform = load(args)
    model = module.model
    images, _, _ = load_pool("dev", args.pool_size, transform, args.shared, args.idx_dir)
    rows: Dict[str, Optional[DSMConfig]] = {"dense": None}
    rows.update({k: DSMConfig(**v, flops_target=args.flops_target) for k, v in VARIANTS.items()})
    done = {k: evaluate(model, c, images, None, args.batch) for k, c in rows.items()}
    br = bracket(model, images[0], done["default"]["gflops"])
    for side in ("r_lo", "r_hi"):
        if br[side] is not None:
            done[f"tome r={br[side]}"] = evaluate(model, DSMConfig.tome(br[side]), images, None, args.batch)
    dense = done.pop("dense")["logits"]
    ref = (done["default"]["logits"].argmax(-1) == dense.argmax(-1)).float()
    lines = [
        f"{len(images)} dev-pool images, flops_target {args.flops_target}; agreement and KL against dense; "
        f"difference from the default, paired, ± standard error.",
        "",
        "| variant | GFLOPs | agreement % | vs default | KL x100 |",
        "|---|---|---|---|---|",
    ]
    results = []
    for name, row in done.items():
        agree = (row["logits"].argmax(-1) == dense.argmax(-1)).float()
        kl = torch.nn.functional.kl_div(
            row["logits"].log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none"
        ).sum(-1)
        d = 100 * (agree - ref)
        lines.append(
            f"| {name} | {row['gflops']:.2f} | {100 * agree.mean():.1f} | {d.mean():+.2f} ± {paired_se(d):.2f} "
            f"| {100 * kl.mean():.2f} |"
        )
        results.append(
            {
                "variant": name,
                "gflops": row["gflops"],
                "agreement": float(agree.mean()),
                "vs_default": float(d.mean()) / 100,
                "vs_default_se": paired_se(d) / 100,
                "kl_x100": float(100 * kl.mean()),
            }
        )
    meta = {"env": environment("cpu"), "images": len(images), "reference": args.reference}
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
