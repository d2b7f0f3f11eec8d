"""The same real DINOv2-S/14 as a Hugging Face ``Dinov2Model`` and as the timm reference: dense and merged outputs.

    python benchmarks/hf_dinov2_equivalence.py

Builds ``transformers.Dinov2Model`` from the shared reference backbone's weights (``../shared/reference``: the timm
``vit_small_patch14_dinov2`` state dict, q/k/v split out of timm's fused ``qkv``, by
``tools.convert.hf_dinov2_from_timm``), runs both on the real photos of
``../shared/natural_photos`` (224², ImageNet normalisation, fp32) dense and with the same DSM configs, and reports
the largest absolute difference of the dense-layout output tokens (timm ``forward_features`` vs HF
``last_hidden_state``) and of the reference head's logits on the class token, relative to the output scale.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import environment, markdown_table, write_rows
from dsm_lightning import apply_dsm, remove_dsm
from dsm_lightning.app.module import ImageClassifier
from tools.convert import hf_dinov2_from_timm

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFIGS = {
    "dense": None,
    "tome (global, constant r, keys)": dict(
        delay=0, local_blocks=0, schedule="constant", metric="keys", protect=0.0, flops_target=0.55
    ),
    "default DSM (flops_target 0.55)": dict(flops_target=0.55),
    "DSM delay=4 (flops_target 0.55)": dict(delay=4, flops_target=0.55),
    "default DSM (flops_target 0.4)": dict(flops_target=0.4),
}


def build_pair(checkpoint: Path):
    """``(timm classifier, HF Dinov2Model, head)`` with the same weights, fp32, eval."""
    module = ImageClassifier(checkpoint_path=str(checkpoint))
    vit = module.model.float().eval()
    return vit, hf_dinov2_from_timm(vit), vit.head


def photos(folder: Path, limit: int) -> torch.Tensor:
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    files = sorted(folder.glob("*.jpg"))[:limit]
    return torch.stack([tf(Image.open(f).convert("RGB")) for f in files])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "reference" / "dinov2_s14_fmnist.safetensors")
    parser.add_argument("--photos", type=Path, default=SHARED / "natural_photos")
    parser.add_argument("--limit", type=int, default=33)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf_dinov2_equivalence")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    vit, hf, head = build_pair(args.checkpoint)
    x = photos(args.photos, args.limit)
    rows = []
    with torch.no_grad():
        for name, cfg in CONFIGS.items():
            if cfg is not None:
                apply_dsm(vit, **cfg)
                apply_dsm(hf, **cfg)
            a = vit.forward_features(x)
            b = hf(x).last_hidden_state
            la, lb = head(a[:, 0]), head(b[:, 0])
            rows.append(
                {
                    "config": name,
                    "images": int(x.shape[0]),
                    "tokens_max_abs_diff": float((a - b).abs().max()),
                    "tokens_scale": float(a.abs().max()),
                    "logits_max_abs_diff": float((la - lb).abs().max()),
                    "top1_equal": float((la.argmax(-1) == lb.argmax(-1)).float().mean()),
                }
            )
            remove_dsm(vit)
            remove_dsm(hf)
    shown = [{k: (f"{v:.2e}" if k.endswith("diff") else v) for k, v in row.items()} for row in rows]
    print(markdown_table(shown, list(rows[0])))
    write_rows(rows, args.out, {"env": environment("cpu"), "checkpoint": str(args.checkpoint.name)})
    print(f"\nwrote {args.out.with_suffix('.json')}")
    print(json.dumps({"max_tokens_diff": max(r["tokens_max_abs_diff"] for r in rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
