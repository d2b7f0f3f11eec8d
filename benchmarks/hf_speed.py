"""Hugging Face ``transformers`` ViT vs the timm ViT of the same shape: dense vs DSM, interleaved in one run.

    python -m benchmarks.hf_speed --batch 16

Builds ``ViTForImageClassification(ViTConfig())`` (ViT-B/16 at 224², SDPA attention) and timm's
``vit_base_patch16_224``, both random-init (speed does not depend on the weights), and times dense, ToMe-equivalent
(global, constant r, keys) and the default DSM schedule at ``flops_target=0.55`` (about 1.8x fewer block FLOPs) for
both families in one interleaved loop. GFLOPs come from ``torch.utils.flop_counter``; images/s is the median over
``--repeats`` rounds after warm-up; speedup and FLOP ratio are against the same family's dense model of this run.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch

from benchmarks.common import environment, forward_fn, markdown_table, median, time_interleaved, write_rows
from dsm_lightning import apply_dsm
from dsm_lightning.app.module import build_model
from dsm_lightning.flops import count_flops

TOME = dict(delay=0, local_blocks=0, schedule="constant", metric="keys", protect=0.0, flops_target=0.55)
SCHEDULES = {"dense": None, "tome (global, constant r, keys)": TOME, "default DSM": dict(flops_target=0.55)}


def hf_vit_b16(attn: str) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(num_labels=1000)  # defaults: hidden 768, 12 layers, 12 heads, MLP 3072, 224², patch 16
    config._attn_implementation = attn
    return ViTForImageClassification(config).eval()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="HF attn_implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf_speed_cpu")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    bases = {
        "transformers ViTForImageClassification": hf_vit_b16(args.attn),
        "timm vit_base_patch16_224": build_model("vit_base_patch16_224").eval(),
    }
    images = torch.randn(args.batch, 3, 224, 224, device=args.device)
    variants, flops = {}, {}
    for family, base in bases.items():
        base = base.to(args.device)
        for sched, cfg in SCHEDULES.items():
            model = copy.deepcopy(base)
            if cfg is not None:
                apply_dsm(model, **cfg)
            variants[(family, sched)] = model
            flops[(family, sched)] = count_flops(model, images[:1]) / 1e9
    times = time_interleaved(
        {k: forward_fn(m, images) for k, m in variants.items()}, args.repeats, args.warmup, args.device
    )
    rows = []
    for (family, sched), _ in variants.items():
        dense = (family, "dense")
        ips = args.batch / median(times[(family, sched)])
        row = {
            "family": family,
            "schedule": sched,
            "gflops": flops[(family, sched)],
            "flops_ratio": flops[dense] / flops[(family, sched)],
            "img_per_s": ips,
            "speedup": median(times[dense]) / median(times[(family, sched)]),
        }
        row["efficiency"] = row["speedup"] / row["flops_ratio"]
        rows.append(row)
    print(markdown_table(rows, ["family", "schedule", "gflops", "flops_ratio", "img_per_s", "speedup", "efficiency"]))
    meta = {"env": environment(args.device), "batch": args.batch, "repeats": args.repeats, "attn": args.attn}
    write_rows(rows, args.out, meta)
    print(f"\nwrote {args.out.with_suffix('.csv')} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
