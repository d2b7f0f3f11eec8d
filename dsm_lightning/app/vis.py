"""Merge pictures: colour every merged token's source patches with their mean colour and outline token borders.

Panels: the input, the tokens after the local (windowed) phase, and the final tokens, so the window borders of the
local phase and the image-wide groups of the global phase are both visible.

    python -m dsm_lightning.app.vis --images examples/images/samples --out outputs/vis
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..config import DSMConfig, RType
from ..inspection import trace_tokens
from ..patch import apply_dsm, is_patched
from .console import run_console
from .module import DEFAULT_MODEL

__all__ = ["token_maps", "render_tokens", "merge_figure"]


@torch.no_grad()
def token_maps(model: nn.Module, image: torch.Tensor) -> Tuple[Dict[str, np.ndarray], Tuple[int, int]]:
    """For one preprocessed image ``[3, H, W]``: ``{"local": ids, "final": ids}`` with, per input patch, the id of
    the token holding it (``[rows, cols]`` arrays), and the patch grid."""
    if not is_patched(model):
        raise ValueError("token_maps needs a patched model: call apply_dsm(model, ...) first")
    maps: Dict[str, np.ndarray] = {}
    holder: Dict[int, torch.Tensor] = {}

    def hook(i, tokens, state):
        if state.pos is not None:
            holder[i] = state.pos[0].clone()

    trace = trace_tokens(model, image[None], hook=hook)
    grid = trace.plan.grid
    local = [b.index for b in trace.plan.blocks if b.mode == "local"]
    if local and local[-1] in holder:
        maps["local"] = holder[local[-1]].view(*grid).numpy()
    if trace.state.pos is not None:
        maps["final"] = trace.state.pos[0].view(*grid).numpy()
    else:
        maps["final"] = np.arange(grid[0] * grid[1]).reshape(grid)
    return maps, grid


def render_tokens(rgb: np.ndarray, ids: np.ndarray) -> Image.Image:
    """Paint each token's patches with their mean colour and draw borders between different tokens.

    Args:
        rgb: ``[H, W, 3]`` uint8 image the model saw (patch grid aligned to the top-left).
        ids: ``[rows, cols]`` token id of each patch.
    """
    rows, cols = ids.shape
    ph, pw = rgb.shape[0] // rows, rgb.shape[1] // cols
    img = rgb[: rows * ph, : cols * pw].astype(np.float64)
    patches = img.reshape(rows, ph, cols, pw, 3).transpose(0, 2, 1, 3, 4)  # rows, cols, ph, pw, 3
    patch_mean = patches.mean(axis=(2, 3))
    out = np.empty_like(patch_mean)
    for token in np.unique(ids):
        mask = ids == token
        out[mask] = patch_mean[mask].mean(axis=0)
    canvas = np.repeat(np.repeat(out, ph, axis=0), pw, axis=1).astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and ids[r, c] != ids[r, c + 1]:
                draw.line([((c + 1) * pw, r * ph), ((c + 1) * pw, (r + 1) * ph)], fill=(0, 0, 0))
            if r + 1 < rows and ids[r, c] != ids[r + 1, c]:
                draw.line([(c * pw, (r + 1) * ph), ((c + 1) * pw, (r + 1) * ph)], fill=(0, 0, 0))
    return picture


def merge_figure(model: nn.Module, image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Side-by-side panels (input | after the local phase | final) for one preprocessed image ``[3, H, W]``."""
    maps, _ = token_maps(model, image)
    pixels = image.permute(1, 2, 0) * torch.tensor(std) + torch.tensor(mean)
    rgb = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    panels: List[Image.Image] = [Image.fromarray(rgb)]
    for key in ("local", "final"):
        if key in maps:
            panels.append(render_tokens(rgb, maps[key]))
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    figure = Image.new("RGB", (width, panels[0].height), (255, 255, 255))
    x = 0
    for p in panels:
        figure.paste(p, (x, 0))
        x += p.width + 4
    return figure


def parse_r(text: str) -> RType:
    """``r`` as on the command line: ``none``, an int (``12``), a fraction (``0.1``) or one int per block
    (``0,0,8,8``), the same forms as :attr:`DSMConfig.r`."""
    text = text.strip().lower()
    try:
        if text in ("", "none", "null"):
            return None
        if "," in text:
            return [int(v) for v in text.split(",")]
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"r={text!r}: pass none, an int (12), a fraction (0.1) or one int per block (0,0,8,8)"
        ) from None


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default."""


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m dsm_lightning.app.vis``: write one merge picture per image."""
    parser = argparse.ArgumentParser(
        prog="python -m dsm_lightning.app.vis", description=__doc__, formatter_class=_HelpFormatter
    )
    parser.add_argument("--images", required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", default="outputs/vis", help="folder for the PNG pictures")
    parser.add_argument(
        "--checkpoint", default=None, help="local weights (.safetensors / .pt); its side-car JSON names the model"
    )
    parser.add_argument(
        "--model-name", default=None, help=f"timm name; None: the checkpoint side-car's, else {DEFAULT_MODEL}"
    )
    parser.add_argument("--num-classes", type=int, default=None, help="None: the side-car's, else the model's")
    parser.add_argument("--img-size", type=int, default=None, help="input size; None: the side-car's, else the model's")
    parser.add_argument("--delay", type=int, default=DSMConfig.delay, help="dense leading blocks")
    parser.add_argument(
        "--local-blocks",
        type=int,
        default=DSMConfig.local_blocks,
        help="merging blocks inside windows (shown as a middle panel when > 0)",
    )
    parser.add_argument("--windows", type=int, default=DSMConfig.windows, help="windows of the local phase")
    parser.add_argument(
        "--r",
        type=parse_r,
        default=None,
        help="tokens merged per block: none (from --flops-target), 12, 0.1 or 0,0,8,8",
    )
    parser.add_argument(
        "--flops-target",
        type=float,
        default=DSMConfig.flops_target,
        help="fraction of the dense FLOPs when --r is none",
    )
    parser.add_argument("--limit", type=int, default=16, help="at most this many images")
    args = parser.parse_args(argv)
    run_console(lambda: _write_pictures(args), parser.prog)


def _write_pictures(args: argparse.Namespace) -> None:
    from .data import ImageFiles, transform_from_config
    from .module import ImageClassifier

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    module = ImageClassifier(
        args.model_name, num_classes=args.num_classes, checkpoint_path=args.checkpoint, model_kwargs=kwargs
    ).eval()
    cfg = module.data_config()
    cfg["crop_pct"] = 1.0
    transform = transform_from_config(cfg)
    files = ImageFiles(args.images, transform, labelled=False)
    apply_dsm(
        module.model,
        DSMConfig(
            delay=args.delay,
            r=args.r,
            local_blocks=args.local_blocks,
            windows=args.windows,
            flops_target=args.flops_target,
        ),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(min(args.limit, len(files))):
        item = files[i]
        figure = merge_figure(module.model, item["image"], cfg["mean"], cfg["std"])
        relative = Path(os.path.relpath(item["path"], args.images))  # sub-folders kept: names never collide
        target = out / relative.parent / (relative.name + "_dsm.png")
        target.parent.mkdir(parents=True, exist_ok=True)
        figure.save(target)
        print(target)


if __name__ == "__main__":
    main()
