"""Which tokens to reduce? Unary (per-token) scores and pruning against pairwise matching, at identical FLOPs.

    python -m benchmarks.reduction_rules --reference ../shared/reference/dinov2_s14_fmnist.json --pool-size 400 \\
        --out benchmarks/results/reduction_rules

Issue 32 asked whether the training-free ideas published since ToMe beat its pairwise ranking: a unary per-token
score for *what* to reduce (CATIS, arXiv 2604.16745: pairwise similarity rankings are unstable in deep layers), and
pruning inattentive tokens beside merging (PPT, EViT, RAPID). This probe runs them inside the default plan
(``DSMConfig(flops_target=...)``: the same tokens per block), so every rule spends the same block FLOPs and only the
choice of tokens differs. It replaces, for this process only, the engine's global merge step with the rule under
test (``dsm_lightning.engine.merge_step``); the rules are not engine options. Rules, per merging block with ``r``
tokens to remove:

* ``default``: the engine (pairwise bipartite matching on token features, 20% most class-attended protected);
* ``unary``: the ``r`` patch tokens the class token attends to least are removed, each merged (size-weighted) into
  its most similar remaining token; ``unary/size``: the same with attention per input patch (attention / size);
* ``prune``, ``prune/size``: the same tokens dropped instead of merged (their features leave the model); nothing
  merges, so every size stays 1 and the two rows are the same run;
* ``prune_mix f=.5``: half of ``r`` pruned by class attention, the other half merged by the default matching;
* ``combo lam=1``: remove the tokens with the highest z-scored redundancy (best similarity to any token) minus
  z-scored log class attention, into their most similar remaining token (a full ``N x N`` similarity, counted);
* ``pairwise->unary @.5``: the default matching in the first half of the blocks, ``unary`` in the second (CATIS's
  diagnosis: pairwise in shallow layers, unary in deep ones);
* ``energy`` (PiToMe-style): each token's energy is its mean similarity to the others, passed through PiToMe's
  margin function (margin ``0.9 (1 - block / depth)``); only the ``2r`` highest-energy tokens may merge or receive
  a merge (isolated tokens are protected), with the default's matching among them; ``energy+cls`` protects the
  default's 20% most class-attended tokens as well.

Official ToMe rows (``--tome``) bracket the budget. Images: the ``dev`` pool (choosing only). Per row: GFLOPs
(``torch.utils.flop_counter``), top-1 agreement and KL x100 against dense, the paired difference in agreement from
the default with its standard error. Resumable; writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dsm_lightning.engine as engine
import dsm_lightning.merge as merge_module
from benchmarks.common import environment
from benchmarks.fmnist_pool import load_pool
from benchmarks.pareto import load, paired_se, run
from dsm_lightning import DSMConfig, apply_dsm, remove_dsm
from dsm_lightning.flops import count_flops
from dsm_lightning.merge import MergeState

ORIG = engine.merge_step
RULE = {}


def removed_mask(src, n):
    """``[B, n]`` bool, True at the patch tokens ``src`` ``[B, r]``."""
    return torch.zeros(src.shape[0], n, dtype=torch.bool, device=src.device).scatter_(1, src, True)


def apply_merge(x, size, pos, p, src, dst, add=True):
    """Remove patch tokens src [B,r] (indices among patch tokens); add into dst [B,r] when add."""
    B, T, C = x.shape
    N = T - p
    removed = removed_mask(src, N)
    keep_rank = (~removed).long().cumsum(1) - 1  # rank among kept
    n_keep = N - src.shape[1]
    # new index of each patch token
    new_index = keep_rank.clone()
    new_index.scatter_(1, src, keep_rank.gather(1, dst))
    keep_idx = (~removed).nonzero()[:, 1].view(B, n_keep)
    patches = x[:, p:].float() * size[:, p:]
    psize = size[:, p:]
    out = patches.gather(1, keep_idx[..., None].expand(-1, -1, C))
    osz = psize.gather(1, keep_idx[..., None])
    if add:
        dst_k = keep_rank.gather(1, dst)
        out = out.scatter_add(
            1, dst_k[..., None].expand(-1, -1, C), patches.gather(1, src[..., None].expand(-1, -1, C))
        )
        osz = osz.scatter_add(1, dst_k[..., None], psize.gather(1, src[..., None]))
    out = out / osz
    x = torch.cat([x[:, :p], out.to(x.dtype)], 1)
    size = torch.cat([size[:, :p], osz], 1)
    return x, MergeState(size, new_index.gather(1, pos))


def nearest(unit, src, exclude):
    """For each src token, most similar token not in exclude [B,N] bool."""
    s = torch.bmm(unit.gather(1, src[..., None].expand(-1, -1, unit.shape[-1])), unit.transpose(1, 2))
    s = s.masked_fill(exclude[:, None, :], -3.0)
    return s.max(-1)


def step(x, metric, state, bp, grid, p, config=None, cls_attn=None):
    rule = RULE.get("rule")
    if rule is None or bp.mode != "global" or not bp.merges:
        return ORIG(x, metric, state, bp, grid, p, config, cls_attn)
    B, T, _ = x.shape
    N = T - p
    r = bp.r
    unit = F.normalize(x[:, p:].float(), dim=-1)  # token features, the default's metric
    size = state.size if state.size is not None else torch.ones(B, T, 1, device=x.device)
    pos = state.pos if state.pos is not None else torch.arange(grid[0] * grid[1], device=x.device).expand(B, -1)
    attn = cls_attn[:, p:].float()
    psize = size[:, p:, 0]
    imp = attn / psize if RULE.get("per_patch") else attn
    depth_frac = bp.index / RULE["depth"]
    if rule == "mix_depth":  # pairwise early, unary late
        if depth_frac < RULE["switch"]:
            return ORIG(x, metric, state, bp, grid, p, config, cls_attn)
        rule_now = "unary"
    else:
        rule_now = rule
    if rule_now in ("unary", "prune"):
        src = imp.topk(r, dim=1, largest=False).indices
        removed = removed_mask(src, N)
        _, dst = nearest(unit, src, removed)
        return apply_merge(x, size, pos, p, src, dst, add=rule_now == "unary")
    if rule_now == "combo":  # rank of redundancy (best similarity) + lam * rank of unimportance
        sim = torch.bmm(unit, unit.transpose(1, 2))
        sim.diagonal(dim1=1, dim2=2).fill_(-3.0)
        best = sim.max(-1).values  # [B,N]
        z_imp = (imp.log() - imp.log().mean(1, keepdim=True)) / imp.log().std(1, keepdim=True)
        z_red = (best - best.mean(1, keepdim=True)) / best.std(1, keepdim=True)
        score = z_red - RULE["lam"] * z_imp  # high -> reduce
        # greedy: pick top r as src, dst nearest among non-src
        src = score.topk(r, dim=1).indices
        removed = removed_mask(src, N)
        _, dst = nearest(unit, src, removed)
        return apply_merge(x, size, pos, p, src, dst, add=True)
    if rule_now == "energy":  # PiToMe-style: only the 2r highest-energy (least isolated) tokens may merge
        sim = torch.bmm(unit, unit.transpose(1, 2))
        margin = RULE.get("margin", 0.9) * (1 - depth_frac)
        f = torch.where(sim > margin, sim, torch.exp(sim - margin) - 1)
        f.diagonal(dim1=1, dim2=2).zero_()
        energy = f.sum(-1) / (N - 1)
        keep = energy.topk(min(N, 2 * r), dim=1).indices
        mask = ~removed_mask(keep, N)  # protected: neither merges nor receives
        if RULE.get("with_cls"):
            mask = mask | merge_module.protected_mask(attn, config.protect)
        saved = merge_module._protected
        merge_module._protected = lambda *args: mask
        try:
            return ORIG(x, metric, state, bp, grid, p, config, cls_attn)
        finally:
            merge_module._protected = saved
    if rule_now == "prune_mix":  # prune fraction f of r lowest-attention, merge rest by default
        rp = round(RULE["f"] * r)
        src = imp.topk(rp, dim=1, largest=False).indices
        removed = removed_mask(src, N)
        _, dst = nearest(unit, src, removed)
        x, st = apply_merge(x, size, pos, p, src, dst, add=False)
        bp2 = dataclasses.replace(bp, tokens_in=bp.tokens_in - rp)
        ca = torch.cat([cls_attn[:, :p], cls_attn[:, p:].gather(1, (~removed).nonzero()[:, 1].view(B, N - rp))], 1)
        return ORIG(x, metric, st, bp2, grid, p, config, ca)
    raise ValueError(rule)


RULES = {
    "default": {},
    "unary": {"rule": "unary"},
    "unary/size": {"rule": "unary", "per_patch": True},
    "prune": {"rule": "prune"},
    "prune/size": {"rule": "prune", "per_patch": True},
    "prune_mix f=.5": {"rule": "prune_mix", "f": 0.5},
    "combo lam=1": {"rule": "combo", "lam": 1.0},
    "pairwise->unary @.5": {"rule": "mix_depth", "switch": 0.5},
    "energy": {"rule": "energy"},
    "energy+cls": {"rule": "energy", "with_cls": True},
}


def table(res, title):
    base = torch.tensor(res["default"]["agree"])
    lines = [
        title,
        "",
        "| rule | GFLOPs | agreement % | vs default | KL x100 |",
        "|---|---|---|---|---|",
    ]
    for name, row in res.items():
        agree = torch.tensor(row["agree"])
        d = agree - base
        lines.append(
            f"| {name} | {row['gflops']:.2f} | {agree.mean() * 100:.1f} "
            f"| {d.mean() * 100:+.2f} ± {paired_se(d) * 100:.2f} | {torch.tensor(row['kl']).mean() * 100:.2f} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_rules(model, imgs, dense, rules, res, out, target, depth) -> None:
    """Run every rule not yet in ``res`` and save ``res`` to ``out`` after each one (resumable)."""
    for name, spec in rules.items():
        if name in res:
            continue
        t0 = time.time()
        spec = dict(spec)
        RULE.clear()
        if "tome" in spec:
            cfg = DSMConfig.tome(spec.pop("tome"))
        else:
            cfg = DSMConfig(flops_target=target, **spec.pop("cfg", {}))
            RULE.update(spec, depth=depth)
            if "rule" in spec and cfg.protect == 0:
                cfg = cfg.replace(protect=0.001)  # class attention on, nothing protected
        apply_dsm(model, cfg)
        gf = count_flops(model, imgs[:1]) / 1e9
        logits = run(model, imgs, 16)
        remove_dsm(model)
        agree = (logits.argmax(-1) == dense.argmax(-1)).float()
        kl = F.kl_div(logits.log_softmax(-1), dense.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        res[name] = {"gflops": gf, "agree": agree.tolist(), "kl": kl.tolist()}
        out.write_text(json.dumps(res))
        print(f"{name}: {gf:.2f} GF, agreement {agree.mean() * 100:.1f}% ({time.time() - t0:.0f} s)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--pool", default="dev", choices=("dev", "eval"))
    ap.add_argument("--pool-size", type=int, default=400)
    ap.add_argument("--target", type=float, default=0.55, help="flops_target of the plan every rule runs in")
    ap.add_argument("--rules", default="", help="JSON {name: spec} replacing the built-in rules")
    ap.add_argument("--tome", default="", help="comma-separated constant r of official ToMe rows")
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    module, tf = load(a)
    model = module.model
    depth = len(model.blocks)
    imgs, _, _ = load_pool(a.pool, a.pool_size, tf, a.shared)
    out = a.out.with_suffix(".json")
    res = json.loads(out.read_text()) if out.exists() else {}
    if "dense" not in res:
        remove_dsm(model)
        res["dense"] = {"logits": run(model, imgs, 16).tolist()}
    dense = torch.tensor(res["dense"]["logits"])
    rules = json.loads(a.rules) if a.rules else dict(RULES)
    for t in [int(v) for v in a.tome.split(",") if v]:
        rules[f"tome r={t}"] = {"tome": t}
    engine.merge_step = step  # this process only, while the rules run
    try:
        evaluate_rules(model, imgs, dense, rules, res, out, a.target, depth)
    finally:
        engine.merge_step = ORIG
    rows = {k: v for k, v in res.items() if k != "dense"}
    title = (
        f"{Path(a.reference).stem}, {a.pool} pool ({len(imgs)} images), plan flops_target={a.target}; "
        f"± is the paired standard error. Machine: {environment('cpu')}"
    )
    a.out.with_suffix(".md").write_text(table(rows, title))
    print(table(rows, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
