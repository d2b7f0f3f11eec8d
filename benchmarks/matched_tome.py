"""The default schedule against official ToMe at matched FLOPs, on held-out images, with paired standard errors.

    python -m benchmarks.matched_tome --reference ../shared/reference/dinov2_s14_fmnist.json --pool-size 600 \\
        --photos ../shared/natural_photos

For each budget (FLOP reduction 1.5x / 1.8x / 2.5x, i.e. ``flops_target`` 0.667 / 0.55 / 0.4), the DSM rows are
planned first and their GFLOPs counted (``torch.utils.flop_counter``). Official ToMe (``DSMConfig.tome(r)``, a
constant ``r``; the same merges as facebookresearch/ToMe) is then *bracketed*: ``r_lo``, the largest ``r`` whose
model spends at least the default's FLOPs, and ``r_hi``, the smallest that spends at most that. A claim that the
default beats ToMe is checked against ``r_lo`` (ToMe given as many FLOPs or more) and the interpolation of both to
the default's FLOPs.

Rows: ``default`` (``DSMConfig()``), ``default-tome-order`` (the same schedule with ToMe's matching order: the
other set parity and unmerged tokens in input order; an arbitrary choice a claim must survive), ``paper`` (the DSM
paper's own shape: two dense blocks, two blocks merging inside 2x2 windows, then global; ToMe's constant ``r``,
keys, no protection) and, at 1.8x, ``delay4`` (what ``DSMCallback(delay=4)`` runs). Measures per row, on the same
images: top-1 agreement with dense, KL(dense || merged) x100, top-1, and on ``--photos`` the cosine between merged
and dense class features (with ``--photo-reference``, the embeddings of that checkpoint's head, e.g. CLIP's
projection) and retrieval (the share of photos whose merged feature is nearest to its own dense feature among all
photos); paired differences against each ToMe bracket with their standard errors. Images: the held-out ``eval``
pool of ``benchmarks/fmnist_pool.py`` (never fitted on, never chosen on). Resumable; writes ``<out>.json`` and
``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from benchmarks.common import environment
from benchmarks.pareto import load, paired_se, run, stack
from dsm_lightning import DSMConfig, apply_dsm, remove_dsm
from dsm_lightning.flops import count_flops

BUDGETS = {"1.5x": 1 / 1.5, "1.8x": 0.55, "2.5x": 0.4}


def gflops(model, config: Optional[DSMConfig], image: torch.Tensor) -> float:
    if config is None:
        remove_dsm(model)
    else:
        apply_dsm(model, config)
    return count_flops(model, image[None]) / 1e9


def bracket(model, image: torch.Tensor, budget: float) -> Dict[str, int]:
    """``r_lo``: largest constant ToMe ``r`` with GFLOPs >= ``budget``; ``r_hi``: smallest with GFLOPs <= it."""
    depth_cost = {}
    r = 1
    while True:
        try:
            depth_cost[r] = gflops(model, DSMConfig.tome(r), image)
        except ValueError:
            break
        if depth_cost[r] <= budget:
            break
        r += 1
    r_hi = r if r in depth_cost and depth_cost[r] <= budget else None
    r_lo = max(k for k, v in depth_cost.items() if v >= budget)
    return {"r_lo": r_lo, "r_hi": r_hi}


def evaluate(model, config, images, photos, batch, photo_head=None) -> Dict[str, Any]:
    if config is None:
        remove_dsm(model)
    else:
        apply_dsm(model, config)
    logits = run(model, images, batch)
    row: Dict[str, Any] = {"logits": logits, "gflops": count_flops(model, images[:1]) / 1e9}
    if photos is not None:
        feats = run(model, photos, batch, pre_logits=True)
        row["feats"] = feats if photo_head is None else torch.nn.functional.linear(feats, *photo_head)
    remove_dsm(model)
    return row


def stats(row: dict, dense: dict, labels: torch.Tensor) -> Dict[str, Any]:
    dense_pred = dense["logits"].argmax(-1)
    pred = row["logits"].argmax(-1)
    kl = torch.nn.functional.kl_div(
        row["logits"].log_softmax(-1), dense["logits"].log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    out = {
        "agree": (pred == dense_pred).float(),
        "kl": kl,
        "hit": (pred == labels).float(),
        "gflops": row["gflops"],
    }
    if "feats" in row:
        out["cos"] = torch.nn.functional.cosine_similarity(row["feats"], dense["feats"], dim=-1)
        unit = torch.nn.functional.normalize
        sim = unit(row["feats"], dim=-1) @ unit(dense["feats"], dim=-1).T
        out["retrieved"] = (sim.argmax(-1) == torch.arange(len(sim))).float()
    return out


def diff(a: torch.Tensor, b: torch.Tensor) -> str:
    d = a - b
    return f"{d.mean().item():+.2f} ± {paired_se(d):.2f}"


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The model, pool, photo and budget arguments this script shares with ``adaptive.py``."""
    parser.add_argument("--reference", required=True, help="JSON next to a safetensors checkpoint")
    parser.add_argument("--pool-size", type=int, default=600)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--idx-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--photos", help="folder of unlabelled photos (class-feature cosine to dense)")
    parser.add_argument(
        "--photo-reference", help="JSON of a checkpoint whose head maps the photo features (e.g. CLIP's projection)"
    )
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    parser.add_argument("--batch", type=int, default=32)


def load_inputs(args: argparse.Namespace) -> tuple:
    """``(model, transform, images, labels, photos, photo_head)``: the reference model, the held-out ``eval`` pool,
    the photos (or None) and the head that maps photo features (or None)."""
    from benchmarks.fmnist_pool import load_pool

    module, transform = load(args)
    images, labels, _ = load_pool("eval", args.pool_size, transform, args.shared, args.idx_dir)
    return (module.model, transform, images, labels, *load_photos(args, transform))


def load_photos(args: argparse.Namespace, transform) -> tuple:
    """``(photos, photo_head)``: the ``--photos`` (or None) and the ``--photo-reference`` head that maps their
    features (or None)."""
    photos = stack(args.photos, transform, 10_000, labelled=False)[0] if args.photos else None
    photo_head = None
    if args.photo_reference:
        from safetensors.torch import load_file

        head = load_file(str(Path(args.photo_reference).with_suffix(".safetensors")))
        photo_head = (head["head.weight"].float(), head["head.bias"].float())
    return photos, photo_head


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "matched_tome")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, _, images, labels, photos, photo_head = load_inputs(args)
    cache_path = args.out.with_suffix(".pt")
    cache: Dict[str, dict] = torch.load(cache_path, weights_only=True) if cache_path.exists() else {}

    def cached(name: str, config: Optional[DSMConfig]) -> dict:
        if name not in cache:
            cache[name] = evaluate(model, config, images, photos, args.batch, photo_head)
            cache[name]["config"] = json.dumps(config.to_dict() if config else None)
            torch.save(cache, cache_path)
            print(f"{name}: {cache[name]['gflops']:.3f} GFLOPs", flush=True)
        return cache[name]

    dense = cached("dense", None)
    results: List[dict] = []
    lines = [
        f"Held-out pool: {len(images)} Fashion-MNIST images (60k training file, head/val images excluded); "
        f"photos: {0 if photos is None else len(photos)}. Agreement and KL are against the dense model; ± is the "
        f"paired standard error. ToMe rows are official ToMe (`DSMConfig.tome(r)`), bracketing the default's "
        f"FLOPs.\n"
    ]
    for budget in args.budgets:
        rows: Dict[str, Optional[DSMConfig]] = {
            "default": DSMConfig(flops_target=BUDGETS[budget]),
            "default-tome-order": DSMConfig(flops_target=BUDGETS[budget], matching="tome"),
        }
        if budget == "1.8x":
            rows["delay4"] = DSMConfig(delay=4, flops_target=BUDGETS[budget])
        rows["paper"] = DSMConfig(
            delay=2, local_blocks=2, schedule="constant", metric="keys", protect=0.0, flops_target=BUDGETS[budget]
        )
        named = {f"{k}@{budget}": v for k, v in rows.items()}
        evaluated = {k: cached(k, v) for k, v in named.items()}
        target = evaluated[f"default@{budget}"]["gflops"]
        br = bracket(model, images[0], target)
        for side in ("r_lo", "r_hi"):
            if br[side] is not None:
                name = f"tome-r{br[side]}"
                evaluated[name] = cached(name, DSMConfig.tome(br[side]))
        s = {k: stats(v, dense, labels) for k, v in evaluated.items()}
        lo = s[f"tome-r{br['r_lo']}"]
        hi = s.get(f"tome-r{br['r_hi']}") if br["r_hi"] is not None else None
        lines.append(f"\n**{budget} fewer FLOPs** (default: {target:.2f} GFLOPs; dense {dense['gflops']:.2f})\n")
        lines.append(
            "| row | GFLOPs | agreement % | vs ToMe r_lo | vs ToMe interp. | KL x100 | KL vs ToMe r_lo | top-1 % "
            "| photo cos mean / worst / retrieved |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, st in s.items():
            w = 0.0
            if hi is not None and lo["gflops"] != hi["gflops"]:
                w = (lo["gflops"] - st["gflops"]) / (lo["gflops"] - hi["gflops"])
            interp_agree = lo["agree"] if hi is None else (1 - w) * lo["agree"] + w * hi["agree"]
            photo = ""
            if "cos" in st:
                photo = f"{st['cos'].mean():.4f} / {st['cos'].min():.4f} / {100 * st['retrieved'].mean():.0f}%"
            lines.append(
                f"| {name} | {st['gflops']:.2f} | {100 * st['agree'].mean():.1f} "
                f"| {diff(100 * st['agree'], 100 * lo['agree'])} | {diff(100 * st['agree'], 100 * interp_agree)} "
                f"| {100 * st['kl'].mean():.2f} | {diff(100 * st['kl'], 100 * lo['kl'])} "
                f"| {100 * st['hit'].mean():.1f} | {photo} |"
            )
            results.append(
                {
                    "budget": budget,
                    "row": name,
                    "gflops": st["gflops"],
                    "agreement": float(st["agree"].mean()),
                    "agreement_vs_tome_lo": float((st["agree"] - lo["agree"]).mean()),
                    "agreement_vs_tome_lo_se": paired_se(st["agree"] - lo["agree"]),
                    "kl_x100": float(100 * st["kl"].mean()),
                    "kl_vs_tome_lo_x100": float(100 * (st["kl"] - lo["kl"]).mean()),
                    "kl_vs_tome_lo_se_x100": paired_se(100 * (st["kl"] - lo["kl"])),
                    "top1": float(st["hit"].mean()),
                    "photo_cos_mean": float(st["cos"].mean()) if "cos" in st else None,
                    "photo_cos_min": float(st["cos"].min()) if "cos" in st else None,
                    "photo_retrieved": float(st["retrieved"].mean()) if "cos" in st else None,
                    "config": json.loads(evaluated[name]["config"]),
                }
            )
    meta = {"env": environment("cpu"), "images": len(images), "photos": 0 if photos is None else len(photos)}
    meta["dense_top1"] = float((dense["logits"].argmax(-1) == labels).float().mean())
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    text = "\n".join(lines)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
