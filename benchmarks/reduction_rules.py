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
  default's 20% most class-attended tokens as well;
* ``soft k=.. t=..`` (many-to-many merging, as in training-free "token transforming"): the default's matching
  chooses the ``r`` tokens that go, and each is shared among its ``k`` most similar ``b`` tokens with weights
  ``softmax(similarity / t)`` over them (``k = 1`` is the default exactly, checked);
* ``attn-weighted g=..``: the default's pairs, but inside a merge each token weighs its size times its class
  attention per patch to the power ``g``, so the more attended token keeps more of its features (sizes still add).

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


def soft_merge(x, unit, size, pos, p, r, config, attn, k, tau, gamma=0.0):
    """Many-to-many merging: the default's bipartite matching (even patches ``a``, odd ``b``, protected tokens
    blocked) chooses the ``r`` ``a`` tokens that go; each is shared among its ``k`` most similar ``b`` tokens with
    weights ``softmax(similarity / tau)`` over those ``k`` (size-weighted: a ``b`` token's size grows by its share).
    ``gamma > 0`` weights each token of a merge by its size times its class attention per patch to the power
    ``gamma`` (the more attended token keeps more of its features; the merged size is still the sum of sizes).
    ``k = 1, gamma = 0`` is the default's merge."""
    B, T, C = x.shape
    N = T - p
    a, b = unit[:, 0::2], unit[:, 1::2]
    na, nb = a.shape[1], b.shape[1]
    blocked = merge_module.protected_mask(attn, config.protect)
    scores = torch.bmm(a, b.transpose(1, 2))
    scores = scores.masked_fill(blocked[:, 0::2, None] | blocked[:, None, 1::2], -2.0)
    node_max, node_idx = scores.max(-1)
    order = node_max.argsort(dim=-1, descending=True, stable=True)
    src, unm = order[:, :r], order[:, r:]
    rows = scores.gather(1, src[..., None].expand(-1, -1, nb))  # [B, r, nb]
    vals, idx = rows.topk(min(k, nb), dim=-1)
    w = (vals / tau).masked_fill(vals < -1.5, float("-inf")).softmax(-1)
    w = torch.where(torch.isnan(w), torch.zeros_like(w), w)
    W = torch.zeros(B, r, nb, device=x.device).scatter_(2, idx, w)  # [B, r, nb]
    patches, psize = x[:, p:].float(), size[:, p:]
    weight = psize * (attn[..., None] / psize).pow(gamma) if gamma else psize  # what each token weighs in a merge
    xa, xb, sa, sb = patches[:, 0::2], patches[:, 1::2], psize[:, 0::2], psize[:, 1::2]
    wa, wb = weight[:, 0::2], weight[:, 1::2]
    xs = xa.gather(1, src[..., None].expand(-1, -1, C))
    ss, ws = sa.gather(1, src[..., None]), wa.gather(1, src[..., None])
    num = xb * wb + W.transpose(1, 2) @ (xs * ws)
    mass = sb + W.transpose(1, 2) @ ss
    norm = wb + W.transpose(1, 2) @ ws
    xu = xa.gather(1, unm[..., None].expand(-1, -1, C))
    su = sa.gather(1, unm[..., None])
    out = torch.cat([x[:, :p], xu.to(x.dtype), (num / norm).to(x.dtype)], 1)
    osize = torch.cat([size[:, :p], su, mass], 1)
    # where each patch token went (a merged a token: its most similar b), for the patch-to-token map
    a_new = torch.empty(B, na, dtype=torch.long, device=x.device)
    a_new.scatter_(1, unm, torch.arange(na - r, device=x.device).expand(B, -1))
    a_new.scatter_(1, src, node_idx.gather(1, src) + (na - r))
    new_index = torch.empty(B, N, dtype=torch.long, device=x.device)
    new_index[:, 0::2] = a_new
    new_index[:, 1::2] = torch.arange(na - r, na - r + nb, device=x.device)
    return out, MergeState(osize, new_index.gather(1, pos))


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
    if rule_now == "soft":  # the default's matching picks what merges; each merged token spreads over its top-k
        return soft_merge(x, unit, size, pos, p, r, config, attn, RULE["k"], RULE["tau"], RULE.get("gamma", 0.0))
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
    "soft k=2 t=.05": {"rule": "soft", "k": 2, "tau": 0.05},
    "soft k=4 t=.05": {"rule": "soft", "k": 4, "tau": 0.05},
    "soft k=4 t=.02": {"rule": "soft", "k": 4, "tau": 0.02},
    "attn-weighted g=.5": {"rule": "soft", "k": 1, "tau": 0.05, "gamma": 0.5},
    "attn-weighted g=1": {"rule": "soft", "k": 1, "tau": 0.05, "gamma": 1.0},
    "attn-weighted g=2": {"rule": "soft", "k": 1, "tau": 0.05, "gamma": 2.0},
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
