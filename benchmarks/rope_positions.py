"""Which position keeps a merged RoPE ViT closer to the dense one: the centroid of a token's patches, or the patch of
the token it merged into? Cosine similarity of the final patch features (merged, unmerged onto the dense grid, vs
dense), per rope type.

No real RoPE ViT ships in a package this project can install (every DINOv3 / EVA-02 / PE package downloads weights
from a hub), so the models are random-init timm ``Eva`` of each rope type, fixed seeds, 14x14 patch grid, with their
weights spread (timm's init leaves blocks near identity). Inputs are smooth random images (low-pass noise), so
neighbouring patches are similar, as in photos. Run: ``python -m benchmarks.rope_positions`` (about a minute on one
thread); writes ``benchmarks/results/rope_positions.md``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

from dsm_lightning import apply_dsm, remove_dsm
from dsm_lightning.adapters import TimmEvaAdapter, register_adapter
from dsm_lightning.adapters import base as adapter_base

ROPES = {
    "cat (EVA-02 / SBB)": dict(),
    "cat rotate_half": dict(rope_rotate_half=True),
    "mixed (RoPE-ViT)": dict(rope_type="mixed", rope_grid_indexing="xy"),
    "dinov3": dict(rope_type="dinov3", rope_rotate_half=True, num_reg_tokens=4),
    "mrope": dict(rope_type="mrope"),
}
SEEDS = (0, 1, 2)
RS = (8, 16, 24)


def model_for(seed: int, **kwargs: object) -> torch.nn.Module:
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    cfg = dict(img_size=112, patch_size=8, embed_dim=64, depth=6, num_heads=4, num_classes=0, use_rot_pos_emb=True,
               use_abs_pos_emb=False, init_values=0.5, global_pool="avg")  # fmt: skip
    model = Eva(**{**cfg, **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def smooth_images(n: int, seed: int) -> torch.Tensor:
    noise = torch.randn(n, 3, 14, 14, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(noise, size=112, mode="bicubic", align_corners=False)


def cosine(model: torch.nn.Module, x: torch.Tensor, dense: torch.Tensor, rule: str, r: int) -> float:
    adapter = register_adapter(TimmEvaAdapter(rule))
    try:
        with torch.no_grad():
            apply_dsm(model, r=r, delay=1)
            out = model.forward_features(x)[:, model.num_prefix_tokens :]  # unmerged onto the dense grid
            remove_dsm(model)
    finally:
        adapter_base._REGISTRY.remove(adapter)
    return float(F.cosine_similarity(out, dense, dim=-1).mean())


def main() -> None:
    torch.set_num_threads(1)
    x = smooth_images(8, 100)
    rows: List[str] = []
    wins: Dict[str, int] = {"centroid": 0, "destination": 0}
    for name, kwargs in ROPES.items():
        for r in RS:
            scores: Dict[str, List[float]] = {"centroid": [], "destination": []}
            for seed in SEEDS:
                model = model_for(seed, **kwargs)
                with torch.no_grad():
                    dense = model.forward_features(x)[:, model.num_prefix_tokens :]
                for rule in scores:
                    scores[rule].append(cosine(model, x, dense, rule, r))
            c, d = (statistics.mean(scores[k]) for k in ("centroid", "destination"))
            wins["centroid" if c > d else "destination"] += 1
            rows.append(f"| {name} | {r} | {c:.4f} | {d:.4f} | {(1 - d) / max(1 - c, 1e-9):.2f} |")
            print(rows[-1], flush=True)
    header = [
        "# RoPE position of a merged token: centroid vs destination",
        "",
        "Mean cosine similarity of the final patch features (forward_features, merged tokens unmerged onto the "
        "dense grid) vs the dense model's (1 = identical), random-init timm Eva "
        f"(112 px, 14x14 patches, depth 6, dim 64), seeds {SEEDS}, 8 smooth random images, delay=1, r per block "
        "as listed (6 blocks, 196 patches). The last column is the destination rule's distance from dense (1 - cos) "
        "over the centroid rule's: above 1, the centroid is closer. No real RoPE weights are installable here; "
        "see the docs.",
        "",
        "| rope | r | centroid | destination | distance ratio (dest / centroid) |",
        "|---|---|---|---|---|",
    ]
    footer = ["", f"Closer to dense: centroid in {wins['centroid']} of {sum(wins.values())} settings."]
    out = Path(__file__).parent / "results" / "rope_positions.md"
    out.write_text("\n".join(header + rows + footer) + "\n")
    print(footer[-1])


if __name__ == "__main__":
    main()
