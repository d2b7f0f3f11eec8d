"""Does an adaptive stage spend the FLOP budget its thresholds were fitted to? Drift, and the budget keeper.

    python -m benchmarks.threshold_drift --reference ../shared/reference/dinov2_s14_fmnist.json

Thresholds are fitted (:func:`dsm_lightning.fit_thresholds`, 256 images) for the fixed default at ``--budget``;
a stage of ``--stage`` held-out ``eval`` images then runs in batches of ``--batch`` (what each batch spends: block
FLOPs as a fraction of dense, padding included, :func:`dsm_lightning.adaptive_flops`), once with the thresholds as
fitted and once with :class:`dsm_lightning.adaptive.BudgetKeeper` shifting them as the stage goes (as
``DSMCallback(keep_budget=True)`` does). Where the thresholds come from:

* ``stage sample``: 256 images drawn at random from the stage itself (what the quality guard does);
* ``other pool``: the first 256 images of the ``dev`` pool (thresholds fitted once, used on other data);
* ``first classes``: the stage sorted by label (class-folder order) and the thresholds fitted on its first 256
  images (an iterable loader, where the guard sees only the stage's first images); the stage runs in that order.
  The keeper's check spacing and damping were chosen on this scenario (and on simulated stages), so read it as
  the fit, and the others as the check;
* ``stage sample, class-sorted stage``: fitted on 256 images drawn from the stage, which runs sorted by label (a
  class-folder dataset under the default guard).

The keeper's prior slope (how a stage's spend moves when every threshold moves by one offset) is measured here on
the ``dev`` pool, never on the stage: ``--slope`` rows. Only FLOPs are reported (no accuracy), so fitting on stage
images is fair. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.common import environment, write_report
from benchmarks.matched_tome import BUDGETS, load_inputs
from dsm_lightning import DSMConfig, adaptive_flops, apply_dsm, fit_thresholds, get_adapter, remove_dsm, token_plan
from dsm_lightning.adaptive import BudgetKeeper, shift_thresholds


def run_stage(model, config: DSMConfig, images: torch.Tensor, batch: int, keeper: Optional[BudgetKeeper]) -> dict:
    """Run ``images`` in batches; returns the stage's spend per image and (with a keeper) what it did."""
    apply_dsm(model, config if keeper is None else keeper.config)
    total, per_image = 0.0, []
    for i in range(0, len(images), batch):
        x = images[i : i + batch]
        flops = adaptive_flops(model, x)
        total += flops.spent * len(x)
        per_image.append(flops.per_image)
        if keeper is not None:
            new = keeper.observe(flops.spent, len(x))
            if new is not None:
                apply_dsm(model, new)
    remove_dsm(model)
    row = {"spent": total / len(images), "per_image": float(torch.cat(per_image).mean())}
    if keeper is not None:
        row.update(changes=keeper.changes, offset=keeper.offset, first_drift=keeper.first_drift)
    return row


def mean_spent(model, config: DSMConfig, images: torch.Tensor, batch: int) -> float:
    return run_stage(model, config, images, batch, None)["spent"]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", required=True, help="JSON next to a safetensors checkpoint")
    parser.add_argument("--budget", default="1.8x", choices=list(BUDGETS))
    parser.add_argument("--stage", type=int, default=1024, help="held-out eval images the stage runs")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--slope", type=float, nargs="+", default=[-0.02, 0.02], help="offsets for the slope")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "threshold_drift")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from benchmarks.fmnist_pool import load_pool

    args.pool_size, args.photos, args.photo_reference = args.stage, None, None
    model, transform, stage, labels, _, _ = load_inputs(args)
    dev, _, _ = load_pool("dev", 512, transform, args.shared, args.idx_dir)
    fixed = DSMConfig(flops_target=BUDGETS[args.budget])
    target = token_plan(model, fixed).flops_ratio(*get_adapter(model).dims(model))
    t0 = time.perf_counter()

    # The keeper's prior: slope of the spend against a common offset, fitted on dev[:256], measured on dev[256:].
    fitted_dev = fit_thresholds(model, dev[:256], fixed)
    base = mean_spent(model, fitted_dev, dev[256:], args.batch)
    slopes = []
    for offset in args.slope:
        spent = mean_spent(model, shift_thresholds(fitted_dev, offset), dev[256:], args.batch)
        slopes.append({"offset": offset, "spent": spent, "slope": (spent - base) / offset})
        print(f"slope at {offset:+.3f}: spent {spent:.4f} (base {base:.4f}) -> {slopes[-1]['slope']:.3f}", flush=True)

    g = torch.Generator().manual_seed(0)
    order = torch.argsort(labels, stable=True)
    scenarios: Dict[str, tuple] = {
        "stage sample": (stage[torch.randperm(len(stage), generator=g)[:256]], stage),
        "other pool": (dev[:256], stage),
        "first classes": (stage[order][:256], stage[order]),
        "stage sample, class-sorted stage": (stage[torch.randperm(len(stage), generator=g)[:256]], stage[order]),
    }
    rows = []
    for name, (fit_on, run_on) in scenarios.items():
        fitted = fit_thresholds(model, fit_on, fixed)
        as_fitted = run_stage(model, fitted, run_on, args.batch, None)
        kept = run_stage(model, fitted, run_on, args.batch, BudgetKeeper(fitted, target))
        rows.append({"scenario": name, "as_fitted": as_fitted, "kept": kept})
        print(name, as_fitted, kept, flush=True)

    meta = {**environment("cpu"), "budget": args.budget, "target": target, "stage": len(stage), "batch": args.batch}
    meta["seconds"] = time.perf_counter() - t0
    meta["slopes"] = slopes
    name = Path(args.reference).stem
    lines = [
        f"{name}, fixed default at {args.budget} (target: {target:.3f}x dense block FLOPs); a stage of "
        f"{len(stage)} held-out Fashion-MNIST images in batches of {args.batch}; thresholds fitted on 256 images. "
        f"Spent: block FLOPs per image as the batches ran (padding included), as a fraction of dense; relative to "
        f"the target in brackets. Analytic FLOPs (no timing; the machine's load does not matter).\n",
        "| thresholds fitted on | spent as fitted | per image as fitted | spent with the keeper | keeper's shifts "
        "(final offset) | first 64 images vs target |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        a, k = row["as_fitted"], row["kept"]
        lines.append(
            f"| {row['scenario']} | {a['spent']:.3f}x ({(a['spent'] / target - 1) * 100:+.1f}%) | "
            f"{a['per_image']:.3f}x | {k['spent']:.3f}x ({(k['spent'] / target - 1) * 100:+.1f}%) | "
            f"{k['changes']} ({k['offset']:+.3f}) | {k['first_drift'] * 100:+.1f}% |"
        )
    lines.append(
        "\nSlope of the spend against a common threshold offset (dev pool, thresholds fitted on dev[:256], spend on "
        f"dev[256:512]; at offset 0: {base:.3f}x): "
        + ", ".join(f"{s['offset']:+.3f} -> {s['spent']:.3f}x (slope {s['slope']:.2f})" for s in slopes)
    )
    write_report(args.out, meta, rows, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
