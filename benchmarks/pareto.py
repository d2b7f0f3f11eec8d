"""Accuracy vs speed on held-out data: dense, ToMe-equivalent and DSM schedules, at matched FLOP budgets.

    python -m benchmarks.pareto --reference ../shared/reference/dinov2_s14_fmnist.json --pool eval \\
        --pool-size 2000 --calib-pool 256 --photos ../shared/natural_photos

Images: ``--pool eval`` draws held-out Fashion-MNIST images from the 60k training file (Debian's
``dataset-fashion-mnist``), excluding the reference head's images and the shared validation images; calibration uses
the disjoint ``dev`` pool (``--calib-pool N``), so nothing reported was chosen on (``benchmarks/fmnist_pool.py``).
Or ``--val-dir`` (ImageFolder layout) / ``--datamodule`` for your own data, ``--calib-dir`` for calibration images.
Any local checkpoint works too: ``--model-name vit_small_patch16_224 --checkpoint w.safetensors --num-classes 10``.

Per schedule and budget: top-1 (and its paired difference from dense with standard error), top-1 agreement with
dense (and its paired difference from ToMe at the same budget), KL to dense, GFLOPs (``torch.utils.flop_counter``),
and on ``--photos`` (unlabelled real photos) the cosine between merged and dense pre-logit features. Throughput comes
from one interleaved timing phase over all rows at the end of the run. Resumable: rows already in ``<out>.json``
(with their per-image predictions) are not re-evaluated. Writes ``<out>.csv``, ``<out>.json``, ``<out>.png`` and
``<out>.md`` (one table per budget).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.common import environment, forward_fn, median, time_interleaved, write_rows
from dsm_lightning import DSMConfig, apply_dsm, calibrate, remove_dsm, token_plan
from dsm_lightning.app.data import ImageFiles, transform_from_config
from dsm_lightning.app.module import ImageClassifier, read_sidecar
from dsm_lightning.flops import count_flops
from dsm_lightning.outputs import collect_batches

TARGETS = (0.65, 0.55, 0.4)
#: Schedule families compared at every budget. ``default`` is whatever ``DSMConfig()`` is today.
FAMILIES: Dict[str, Dict[str, Any]] = {
    # official ToMe (DSMConfig.tome) at the r that meets each budget
    "tome": dict(delay=0, local_blocks=0, schedule="constant", metric="keys", protect=0.0, matching="tome"),
    "tome-prop": dict(delay=0, local_blocks=0, schedule="proportional", metric="keys", protect=0.0),
    "dsm-d2-keys": dict(delay=2, local_blocks=2, schedule="proportional", metric="keys", protect=0.0),
    "dsm-d4-keys": dict(delay=4, local_blocks=2, schedule="proportional", metric="keys", protect=0.0),
    "default": {},
    "default-d4": dict(delay=4),
}


def schedules(targets, families) -> Dict[str, Optional[DSMConfig]]:
    out: Dict[str, Optional[DSMConfig]] = {"dense": None}
    for target in targets:
        for family in families:
            out[f"{family}@{target:.2f}"] = DSMConfig(**FAMILIES[family], flops_target=target)
    return out


def load(args) -> tuple:
    if args.reference:
        ckpt = str(Path(args.reference).with_suffix(".safetensors"))
        module = ImageClassifier(checkpoint_path=ckpt)  # model, its arguments and classes from the side-car JSON
        meta = read_sidecar(ckpt)
        size = meta["create_kwargs"]["img_size"]
        data_cfg = {
            "input_size": (3, size, size),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "mean": tuple(meta["mean"]),
            "std": tuple(meta["std"]),
        }
    else:
        module = ImageClassifier(
            args.model_name,
            num_classes=args.num_classes,
            checkpoint_path=args.checkpoint,
            model_kwargs=json.loads(args.model_kwargs),
        )
        data_cfg = module.data_config()
        data_cfg["crop_pct"] = args.crop_pct
    return module.eval(), transform_from_config(data_cfg)


def stack(folder: str, transform, limit: int, labelled: bool = True) -> tuple:
    """A deterministic subset of a folder: class-interleaved when labelled."""
    files = ImageFiles(folder, transform, labelled=labelled)
    if labelled:
        by_class: Dict[int, List[int]] = {}
        for i, (_, target) in enumerate(files.samples):
            by_class.setdefault(target, []).append(i)
        order = [idx for group in zip(*by_class.values()) for idx in group][:limit]
    else:
        order = list(range(min(limit, len(files))))
    items = [files[i] for i in order]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["target"] for it in items])


def from_datamodule(class_path: str, init_args: Dict[str, Any], limit: int) -> tuple:
    """The first ``limit`` validation images and labels of any LightningDataModule."""
    import importlib

    module_name, _, cls_name = class_path.rpartition(".")
    dm = getattr(importlib.import_module(module_name), cls_name)(**init_args)
    dm.setup("validate")
    images, labels = collect_batches(dm.val_dataloader(), limit)
    if labels is None:
        raise ValueError(f"{class_path}.val_dataloader() yields no labels; the Pareto harness needs labelled data")
    return images, labels


@torch.no_grad()
def run(model, images, batch, pre_logits: bool = False) -> torch.Tensor:
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch), leave=False, desc="eval"):
        x = images[i : i + batch]
        out.append(model.forward_head(model.forward_features(x), pre_logits=True) if pre_logits else model(x))
    return torch.cat(out)


def paired_se(diff: torch.Tensor) -> float:
    """Standard error of the mean of per-image differences."""
    n = diff.numel()
    return float(diff.float().std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    families = ["dense", *FAMILIES, "calibrated"]
    for i, family in enumerate(families):
        sel = sorted((r for r in rows if r["family"] == family), key=lambda r: r["gflops"])
        if not sel:
            continue
        style = dict(
            marker="*" if family == "dense" else "os^vDP<>"[i % 8],
            color="k" if family == "dense" else f"C{i}",
            linestyle="-" if len(sel) > 1 else "none",
            label=family,
        )
        axes[0].plot([r["gflops"] for r in sel], [100 * r["agreement"] for r in sel], **style)
        axes[1].plot([r["gflops"] for r in sel], [100 * r["top1"] for r in sel], **style)
    axes[0].set_ylabel("top-1 agreement with dense (%)")
    axes[1].set_ylabel("top-1 (%)")
    for ax in axes:
        ax.set_xlabel("GFLOPs per image")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def tables(rows: List[dict], dense: dict) -> str:
    """One markdown table per budget, every family side by side."""
    out = []
    for target in sorted({r["target"] for r in rows if r["family"] != "dense"}, reverse=True):
        sel = [r for r in rows if r["target"] == target]
        out.append(f"\n**Budget `flops_target={target}`**\n")
        out.append(
            "| schedule | GFLOPs | FLOP reduction | speedup | top-1 (vs dense) | agreement | agreement vs ToMe "
            "| KL x100 | photos cos mean / worst |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in [dense, *sel]:
            vs_tome = (
                f"{100 * r['agree_vs_tome']:+.1f} ± {100 * r['agree_vs_tome_se']:.1f}"
                if r.get("agree_vs_tome") is not None
                else ""
            )
            d_top1 = f" ({100 * r['top1_vs_dense']:+.1f} ± {100 * r['top1_vs_dense_se']:.1f})" if r is not dense else ""
            photos = f"{r['photo_cos_mean']:.4f} / {r['photo_cos_min']:.4f}" if "photo_cos_mean" in r else ""
            out.append(
                f"| {r['schedule'].split('@')[0]} | {r['gflops']:.2f} | {r.get('flops_reduction', 1):.2f}x | "
                f"{r.get('speedup', float('nan')):.2f}x | {100 * r['top1']:.1f}%{d_top1} | "
                f"{100 * r['agreement']:.1f}% | {vs_tome} | {100 * r['kl']:.2f} | {photos} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="JSON next to a safetensors checkpoint (see ../shared/README.md)")
    parser.add_argument("--model-name", default="vit_small_patch16_224")
    parser.add_argument("--checkpoint")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--model-kwargs", default="{}")
    parser.add_argument("--crop-pct", type=float, default=1.0)
    parser.add_argument("--pool", choices=["eval"], help="held-out Fashion-MNIST pool from the 60k training file")
    parser.add_argument("--pool-size", type=int, default=2000)
    parser.add_argument(
        "--shared",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared",
        help="folder holding fashion_mnist/{train,val} (excluded from the pools)",
    )
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--val-dir", help="labelled image folder (ImageFolder layout)")
    parser.add_argument("--datamodule", help="class path of a LightningDataModule to take validation images from")
    parser.add_argument("--datamodule-args", default="{}", help="JSON init arguments of --datamodule")
    parser.add_argument("--calib-pool", type=int, default=0, help="calibrate() on this many dev-pool images")
    parser.add_argument("--calib-dir", help="labelled folder for calibrate() (kept apart from the evaluation images)")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--photos", help="folder of unlabelled photos for feature cosine to dense")
    parser.add_argument("--limit", type=int, default=256, help="images from --val-dir / --datamodule")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (one batch of 16 per schedule)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pareto")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module, transform = load(args)
    model = module.model
    if args.pool:
        from benchmarks.fmnist_pool import load_pool

        images, labels, _ = load_pool(args.pool, args.pool_size, transform, args.shared, args.idx_dir)
        source = f"Fashion-MNIST 60k-train pool '{args.pool}' ({args.pool_size} images, head/val images excluded)"
    elif args.datamodule:
        images, labels = from_datamodule(args.datamodule, json.loads(args.datamodule_args), args.limit)
        source = f"{args.datamodule}({args.datamodule_args})"
    elif args.val_dir:
        images, labels = stack(args.val_dir, transform, args.limit)
        source = args.val_dir
    else:
        parser.error("pass --pool, --val-dir or --datamodule")
    photos = stack(args.photos, transform, 10_000, labelled=False)[0] if args.photos else None
    done: Dict[str, dict] = {}
    if args.out.with_suffix(".json").exists():
        done = {r["schedule"]: r for r in json.loads(args.out.with_suffix(".json").read_text())["rows"]}
        print(f"resuming: {len(done)} rows already evaluated")
    meta: Dict[str, Any] = {
        "env": environment("cpu"),
        "images": len(images),
        "data": source,
        "photos": args.photos,
        "photos_n": 0 if photos is None else len(photos),
    }
    plan_rows = schedules(args.targets, args.families)
    calib = done.get("calibrated@0.55")
    if calib is not None:
        plan_rows["calibrated@0.55"] = DSMConfig.from_dict(calib["config"])
        meta["calibration"] = calib.get("calibration")
    elif args.calib_pool or args.calib_dir:
        if args.calib_pool:
            from benchmarks.fmnist_pool import load_pool

            cal_images = load_pool("dev", args.calib_pool, transform, args.shared, args.idx_dir)[0]
        else:
            cal_images = stack(args.calib_dir, transform, args.calib_images)[0]
        loader = [cal_images[i : i + args.batch] for i in range(0, len(cal_images), args.batch)]
        result = calibrate(model, loader, target=0.55)
        print(result.table())
        print(f"calibration: {result.seconds:.1f} s on {result.images} images -> {result.config}")
        meta["calibration"] = {
            "seconds": result.seconds,
            "images": result.images,
            "stable": result.stable,
            "fell_back_to_tome": result.fell_back_to_tome,
            "config": result.config.to_dict(),
            "candidates": result.candidates,
        }
        plan_rows["calibrated@0.55"] = result.config
    dense_logits = run(model, images, args.batch)
    dense_feats = run(model, photos, args.batch, pre_logits=True) if photos is not None else None
    dense_logp = dense_logits.log_softmax(-1)
    rows: List[dict] = []
    for name, cfg in plan_rows.items():
        if name in done:
            rows.append(done[name])
            continue
        if cfg is not None:
            try:
                apply_dsm(model, cfg)
            except ValueError as err:
                print(f"{name}: skipped ({err})")
                continue
        t0 = time.perf_counter()
        logits = dense_logits if cfg is None else run(model, images, args.batch)
        row: Dict[str, Any] = {
            "schedule": name,
            "family": name.split("@")[0],
            "target": cfg.flops_target if cfg else 1.0,
            "r": token_plan(model).r if cfg else 0,
            "config": cfg.to_dict() if cfg else None,
            "pred": logits.argmax(-1).tolist(),
            "kl": float(
                torch.nn.functional.kl_div(logits.log_softmax(-1), dense_logp, log_target=True, reduction="batchmean")
            ),
            "gflops": count_flops(model, images[:1]) / 1e9,
        }
        if photos is not None:
            feats = dense_feats if cfg is None else run(model, photos, args.batch, pre_logits=True)
            cos = torch.nn.functional.cosine_similarity(feats, dense_feats, dim=-1)
            row.update(
                photo_cos_mean=float(cos.mean()),
                photo_cos_min=float(cos.min()),
                photo_cos=[round(float(c), 6) for c in cos],
            )
        row["eval_s"] = time.perf_counter() - t0
        remove_dsm(model)
        rows.append(row)
        print(
            f"{name:22s} agree {(logits.argmax(-1) == dense_logits.argmax(-1)).float().mean():.4f} "
            f"top1 {(logits.argmax(-1) == labels).float().mean():.4f} {row['gflops']:.2f} GFLOPs",
            flush=True,
        )
        write_rows(rows + [r for k, r in done.items() if k not in {x["schedule"] for x in rows}], args.out, meta)
    # statistics from the stored per-image predictions (paired, same images)
    by_name = {r["schedule"]: r for r in rows}
    dense_pred = torch.tensor(by_name["dense"]["pred"])
    dense_hit = (dense_pred == labels).float()
    for row in rows:
        pred = torch.tensor(row["pred"])
        hit, agree = (pred == labels).float(), (pred == dense_pred).float()
        row.update(
            top1=float(hit.mean()),
            agreement=float(agree.mean()),
            agreement_se=paired_se(agree),
            top1_vs_dense=float((hit - dense_hit).mean()),
            top1_vs_dense_se=paired_se(hit - dense_hit),
        )
        tome = by_name.get(f"tome@{row['target']:.2f}")
        if tome is not None and row["family"] != "dense":
            d = agree - (torch.tensor(tome["pred"]) == dense_pred).float()
            row.update(agree_vs_tome=float(d.mean()), agree_vs_tome_se=paired_se(d))
    # one interleaved timing phase for every row
    import copy

    batch = images[:16]
    variants = {}
    for row in rows:
        m = copy.deepcopy(model)
        if row["config"] is not None:
            apply_dsm(m, DSMConfig.from_dict(row["config"]))
        variants[row["schedule"]] = m
    times = time_interleaved({k: forward_fn(m, batch) for k, m in variants.items()}, args.repeats, 1, "cpu")
    dense_ips = 16 / median(times["dense"])
    for row in rows:
        row["img_per_s"] = 16 / median(times[row["schedule"]])
        row["speedup"] = row["img_per_s"] / dense_ips
        row["flops_reduction"] = by_name["dense"]["gflops"] / row["gflops"]
    write_rows(rows, args.out, meta)
    plot(rows, args.out.with_suffix(".png"), f"{len(images)} images: {source}")
    text = tables(rows, by_name["dense"])
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"wrote {args.out}.csv/.json/.png/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
