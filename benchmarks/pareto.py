"""Accuracy vs speed: dense, ToMe-equivalent and DSM schedules (plus a calibrated one) on a labelled image folder.

    python benchmarks/pareto.py --reference ../shared/reference/dinov2_s14_fmnist.json \
        --val-dir ../shared/fashion_mnist/val --calib-dir ../shared/fashion_mnist/train --limit 256

or with any local checkpoint: ``--model-name vit_small_patch16_224 --checkpoint w.safetensors --num-classes 10``,
and with any LightningDataModule instead of a folder: ``--datamodule pkg.MyDataModule --datamodule-args '{...}'``
(its ``val_dataloader()`` must yield ``(images, labels)`` or dicts with ``image`` / ``target``).

Per schedule: top-1, top-5, top-1 agreement with dense, GFLOPs (``torch.utils.flop_counter``) and images/s (one
interleaved timing phase over all schedules at the end of the run, so throughput is compared within one run).
Resumable: rows already in ``<out>.json`` keep their accuracy and are not re-evaluated; the timing phase is re-run
for all rows. Writes ``<out>.csv``, ``<out>.json`` and ``<out>.png`` (accuracy vs GFLOPs and vs images/s).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, forward_fn, markdown_table, median, time_interleaved, write_rows  # noqa: E402

from dsm_lightning import DSMConfig, apply_dsm, calibrate, remove_dsm, token_plan  # noqa: E402
from dsm_lightning.calibrate import collect_batches  # noqa: E402
from dsm_lightning.data import ImageFiles, transform_from_config  # noqa: E402
from dsm_lightning.flops import count_flops  # noqa: E402
from dsm_lightning.module import ImageClassifier  # noqa: E402

TARGETS = (0.65, 0.55, 0.45)
FAMILIES = {
    "tome": dict(delay=0, local_blocks=0),
    "tome-prop": dict(delay=0, local_blocks=0, schedule="proportional"),
    "dsm-d2": dict(delay=2, local_blocks=2),
    "dsm-d2-prop": dict(delay=2, local_blocks=2, schedule="proportional"),
    "dsm-d4": dict(delay=4, local_blocks=2),
    "dsm-d4-prop": dict(delay=4, local_blocks=2, schedule="proportional"),
}


def schedules(targets) -> Dict[str, Any]:
    out: Dict[str, Any] = {"dense": None}
    for target in targets:
        for family, fields in FAMILIES.items():
            out[f"{family}@{target:.2f}"] = DSMConfig(**fields, flops_target=target)
    return out


def load(args) -> tuple:
    if args.reference:
        meta = json.loads(Path(args.reference).read_text())
        ckpt = str(Path(args.reference).with_suffix(".safetensors"))
        module = ImageClassifier(meta["timm_name"], num_classes=meta["create_kwargs"]["num_classes"],
                                 checkpoint_path=ckpt, model_kwargs={k: v for k, v in meta["create_kwargs"].items()
                                                                     if k != "num_classes"},
                                 class_names=meta["classes"])
        size = meta["create_kwargs"]["img_size"]
        data_cfg = {"input_size": (3, size, size), "interpolation": "bilinear", "crop_pct": 1.0,
                    "mean": tuple(meta["mean"]), "std": tuple(meta["std"])}
    else:
        module = ImageClassifier(args.model_name, num_classes=args.num_classes, checkpoint_path=args.checkpoint,
                                 model_kwargs=json.loads(args.model_kwargs))
        data_cfg = module.data_config()
        data_cfg["crop_pct"] = args.crop_pct
    return module.eval(), transform_from_config(data_cfg)


def stack(folder: str, transform, limit: int) -> tuple:
    files = ImageFiles(folder, transform, labelled=True)
    # a class-balanced, deterministic subset: interleave classes
    by_class: Dict[int, List[int]] = {}
    for i, (_, target) in enumerate(files.samples):
        by_class.setdefault(target, []).append(i)
    order = [idx for group in zip(*by_class.values()) for idx in group][:limit]
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
def logits_of(model, images, batch) -> torch.Tensor:
    from tqdm import tqdm

    out = []
    for i in tqdm(range(0, len(images), batch), leave=False, desc="eval"):
        out.append(model(images[i:i + batch]))
    return torch.cat(out)


def plot(rows: List[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"dense": ("k", "*"), "tome": ("tab:blue", "o"), "tome-prop": ("tab:cyan", "o"),
              "dsm-d2": ("tab:orange", "s"), "dsm-d2-prop": ("tab:brown", "s"), "dsm-d4": ("tab:green", "^"), "dsm-d4-prop": ("tab:olive", "^"),
              "calibrated": ("tab:red", "D")}
    for family, (color, marker) in styles.items():
        sel = sorted((r for r in rows if r["family"] == family), key=lambda r: r["gflops"])
        if not sel:
            continue
        for ax, key in zip(axes, ("gflops", "img_per_s")):
            ax.plot([r[key] for r in sel], [100 * r["top1"] for r in sel], marker=marker, color=color,
                    label=family, linestyle="-" if len(sel) > 1 else "none", markersize=8 if family != "tome" else 6)
    axes[0].set_xlabel("GFLOPs per image")
    axes[1].set_xlabel("images / s (same run)")
    for ax in axes:
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", help="JSON next to a safetensors checkpoint (see ../shared/README.md)")
    parser.add_argument("--model-name", default="vit_small_patch16_224")
    parser.add_argument("--checkpoint")
    parser.add_argument("--num-classes", type=int)
    parser.add_argument("--model-kwargs", default="{}")
    parser.add_argument("--crop-pct", type=float, default=1.0)
    parser.add_argument("--val-dir", help="labelled image folder (ImageFolder layout)")
    parser.add_argument("--datamodule", help="class path of a LightningDataModule to take validation images from")
    parser.add_argument("--datamodule-args", default="{}", help="JSON init arguments of --datamodule")
    parser.add_argument("--calib-dir", help="labelled folder for calibrate() (kept apart from --val-dir)")
    parser.add_argument("--calib-images", type=int, default=256)
    parser.add_argument("--limit", type=int, default=256, help="validation images (class-balanced subset)")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (one batch of 16 per schedule)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "pareto")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    module, transform = load(args)
    model = module.model
    if args.datamodule:
        images, labels = from_datamodule(args.datamodule, json.loads(args.datamodule_args), args.limit)
    elif args.val_dir:
        images, labels = stack(args.val_dir, transform, args.limit)
    else:
        parser.error("pass --val-dir or --datamodule")
    done: Dict[str, dict] = {}
    if args.out.with_suffix(".json").exists():
        done = {r["schedule"]: r for r in json.loads(args.out.with_suffix(".json").read_text())["rows"]}
        print(f"resuming: {len(done)} rows already evaluated")
    meta: Dict[str, Any] = {"env": environment("cpu"), "images": len(images),
                            "data": args.val_dir or f"{args.datamodule}({args.datamodule_args})"}
    if done.get("dense", {}).get("calibration"):
        meta["calibration"] = done["dense"]["calibration"]
    plan_rows = schedules(args.targets)
    if args.calib_dir and "calibrated@0.55" not in done:
        cal_images, cal_labels = stack(args.calib_dir, transform, args.calib_images)
        loader = [(cal_images[i:i + args.batch], cal_labels[i:i + args.batch])
                  for i in range(0, len(cal_images), args.batch)]
        result = calibrate(model, loader, target=0.55, verbose=True)
        print(result.table())
        print(f"calibration: {result.seconds:.1f} s on {result.images} images -> {result.config}")
        meta["calibration"] = {"seconds": result.seconds, "images": result.images,
                               "config": result.config.to_dict(), "candidates": result.candidates}
        plan_rows["calibrated@0.55"] = result.config
    elif "calibrated@0.55" in done:
        plan_rows["calibrated@0.55"] = DSMConfig.from_dict(done["calibrated@0.55"]["config"])
    dense_logits = logits_of(model, images, args.batch)
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
        logits = dense_logits if cfg is None else logits_of(model, images, args.batch)
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        row = {
            "schedule": name, "family": name.split("@")[0], "target": cfg.flops_target if cfg else 1.0,
            "r": token_plan(model).r if cfg else 0, "delay": cfg.delay if cfg else None,
            "local_blocks": cfg.local_blocks if cfg else None, "schedule_kind": cfg.schedule if cfg else None,
            "config": cfg.to_dict() if cfg else None,
            "top1": float((logits.argmax(-1) == labels).float().mean()),
            "top5": float((top5 == labels[:, None]).any(-1).float().mean()),
            "agreement": float((logits.argmax(-1) == dense_logits.argmax(-1)).float().mean()),
            "gflops": count_flops(model, images[:1]) / 1e9,
            "eval_s": time.perf_counter() - t0,
        }
        if name == "calibrated@0.55":
            row["calibration"] = meta.get("calibration")
        remove_dsm(model)
        rows.append(row)
        print(f"{name:18s} top1 {row['top1']:.3f} agree {row['agreement']:.3f} {row['gflops']:.2f} GFLOPs", flush=True)
        write_rows(rows + [r for k, r in done.items() if k not in {x["schedule"] for x in rows}], args.out, meta)
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
        row["flops_reduction"] = rows[0]["gflops"] / row["gflops"] if rows[0]["schedule"] == "dense" else None
    write_rows(rows, args.out, meta)
    plot(rows, args.out.with_suffix(".png"), f"{len(images)} images from {meta['data']}")
    cols = ["schedule", "r", "gflops", "flops_reduction", "img_per_s", "speedup", "top1", "top5", "agreement"]
    print(markdown_table(rows, cols))
    print(f"wrote {args.out}.csv/.json/.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
