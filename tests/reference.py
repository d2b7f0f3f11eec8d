"""A slow, loop-based reference of DSM, written for obviousness, not speed.

Tokens are Python lists of (vector, size, set of source patches). Attention is written out with an explicit softmax
and log-size bias; matching loops over tokens. Only per-token layers (norms, projections, LayerScale, MLP), the
embedding and the head are reused from the model, for timm and torchvision ViTs alike.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Set, Tuple

import torch

from dsm_lightning.schedule import TokenPlan

Token = Tuple[torch.Tensor, float, Set[int]]


def ref_softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sizes: Sequence[float], key_ok: Optional[Sequence[bool]] = None
) -> torch.Tensor:
    """q, k, v: [T, H, D]. Proportional attention written out: softmax_j(q_i.k_j / sqrt(D) + log size_j) v_j, over
    the keys ``j`` with ``key_ok[j]`` (all when None: an attention mask that hides the others)."""
    t, h, d = q.shape
    keys = [j for j in range(t) if key_ok is None or key_ok[j]]
    out = torch.zeros(t, h, d, dtype=q.dtype)
    for head in range(h):
        for i in range(t):
            logits = [float(q[i, head] @ k[j, head]) / math.sqrt(d) + math.log(sizes[j]) for j in keys]
            m = max(logits)
            weights = [math.exp(v_ - m) for v_ in logits]
            total = sum(weights)
            out[i, head] = sum(w / total * v[j, head] for j, w in zip(keys, weights))
    return out


def ref_protected(q, k, sizes, p: int, n: int, protect: float) -> list:
    """Which of the ``n`` patch tokens protection keeps from merging: the ``protect`` share the class token attends
    to most (none when ``protect`` is 0)."""
    if not protect:
        return [False] * n
    cls_attn = ref_class_attention(q, k, sizes, p)[p:]
    top = sorted(range(n), key=lambda i: -cls_attn[i])[: int(protect * n)]
    return [i in top for i in range(n)]


def ref_class_attention(q: torch.Tensor, k: torch.Tensor, sizes: Sequence[float], num_prefix: int) -> List[float]:
    """Attention every token gets from the class token (the mean query without one), averaged over heads."""
    t, h, d = q.shape
    query = q[0] if num_prefix else q.mean(dim=0)
    out = [0.0] * t
    for head in range(h):
        logits = [float(query[head] @ k[j, head]) / math.sqrt(d) + math.log(sizes[j]) for j in range(t)]
        m = max(logits)
        weights = [math.exp(v_ - m) for v_ in logits]
        total = sum(weights)
        for j in range(t):
            out[j] += weights[j] / total / h
    return out


class TimmOps:
    """How one timm ViT block / embedding / head is computed, for the reference."""

    @staticmethod
    def embed(model, image):
        return model.norm_pre(model._pos_embed(model.patch_embed(image[None])))[0]

    @staticmethod
    def blocks(model):
        return model.blocks

    @staticmethod
    def attention(blk, seq, sizes):
        """Residual branch of attention ([T, C]) and keys averaged over heads."""
        attn = blk.attn
        x = blk.norm1(seq)
        t = x.shape[0]
        h, d = attn.num_heads, attn.head_dim
        qkv = attn.qkv(x).reshape(t, 3, h, d)
        q, k, v = attn.q_norm(qkv[:, 0]), attn.k_norm(qkv[:, 1]), qkv[:, 2]
        out = attn.proj(attn.norm(ref_softmax_attention(q, k, v, sizes).reshape(t, h * d)))
        return blk.ls1(out), k.mean(dim=1), (q, k)

    @staticmethod
    def mlp(blk, seq):
        return blk.ls2(blk.mlp(blk.norm2(seq)))

    @staticmethod
    def head(model, seq):
        return model.forward_head(model.norm(seq)[None])[0]


class TorchvisionOps:
    """The same for torchvision's VisionTransformer (nn.MultiheadAttention weights used directly)."""

    @staticmethod
    def embed(model, image):
        x = model._process_input(image[None])
        return (torch.cat([model.class_token, x], dim=1) + model.encoder.pos_embedding)[0]

    @staticmethod
    def blocks(model):
        return model.encoder.layers

    @staticmethod
    def attention(blk, seq, sizes):
        mha = blk.self_attention
        x = blk.ln_1(seq)
        t, c = x.shape
        h = mha.num_heads
        qkv = (x @ mha.in_proj_weight.T + mha.in_proj_bias).reshape(t, 3, h, c // h)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        out = mha.out_proj(ref_softmax_attention(q, k, v, sizes).reshape(t, c))
        return out, k.mean(dim=1), (q, k)

    @staticmethod
    def mlp(blk, seq):
        return blk.mlp(blk.ln_2(seq))

    @staticmethod
    def head(model, seq):
        return model.heads(model.encoder.ln(seq)[0])


class HFOps:
    """The same for ``transformers`` encoders (ViT / DeiT, DINOv2 (+ registers), CLIP / SigLIP vision), from the
    layers' own q/k/v/output projections; ``model`` may be a task model (its encoder is used) and ``head`` returns the
    encoder's ``last_hidden_state`` for one image (its final norm, if any, on the dense sequence)."""

    @staticmethod
    def encoder(model):
        from dsm_lightning.adapters import get_adapter

        return get_adapter(model).core(model)

    @staticmethod
    def embed(model, image):
        enc = HFOps.encoder(model)
        name = type(enc).__name__
        if "Dinov2" in name:
            return enc.embeddings(image[None])[0]
        x = enc.embeddings(image[None], interpolate_pos_encoding=True)
        return (enc.pre_layrnorm(x) if "CLIP" in name else x)[0]

    @staticmethod
    def blocks(model):
        enc = HFOps.encoder(model)
        return enc.layers if hasattr(enc, "layers") else getattr(enc.encoder, "layer", None) or enc.encoder.layers

    @staticmethod
    def attention(blk, seq, sizes):
        if hasattr(blk, "layernorm_before"):
            attn, x, scale = blk.attention, blk.layernorm_before(seq), lambda y: y
        elif hasattr(blk, "layer_scale1"):
            attn, x, scale = blk.attention, blk.norm1(seq), blk.layer_scale1
        else:
            attn, x, scale = blk.self_attn, blk.layer_norm1(seq), lambda y: y
        t = x.shape[0]
        d = attn.head_dim
        q, k, v = (proj(x).reshape(t, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        out = ref_softmax_attention(q, k, v, sizes).reshape(t, -1)
        out = attn.o_proj(out) if hasattr(attn, "o_proj") else attn.out_proj(out)
        return scale(out), k.mean(dim=1), (q, k)

    @staticmethod
    def mlp(blk, seq):
        if hasattr(blk, "layernorm_after"):
            return blk.mlp(blk.layernorm_after(seq))
        if hasattr(blk, "layer_scale2"):
            return blk.layer_scale2(blk.mlp(blk.norm2(seq)))
        return blk.mlp(blk.layer_norm2(seq))

    @staticmethod
    def head(model, seq):
        enc = HFOps.encoder(model)
        if hasattr(enc, "layernorm"):
            return enc.layernorm(seq)
        if "Siglip" in type(enc).__name__:
            return enc.post_layernorm(seq)
        return seq  # CLIP: no norm on the sequence


def ops_for(model):
    from torchvision.models import VisionTransformer as TVViT

    if type(model).__module__.startswith("transformers.") or any(
        c.__module__.startswith("transformers.") for c in type(model).__mro__
    ):
        return HFOps
    return TorchvisionOps if isinstance(model, TVViT) else TimmOps


def ref_match(
    tokens: List[Token],
    metric: List[torch.Tensor],
    r: int,
    protected: Sequence[bool] = (),
    parity: int = 0,
    sort_unmerged: bool = False,
) -> Tuple[List[Token], List[torch.Tensor]]:
    """Bipartite soft matching on one list of patch tokens; returns the new tokens (unmerged a's, then b's).

    Set a starts at token ``parity``. A pair that involves a ``protected`` token scores -2 (below any cosine), so it
    is proposed last. Unmerged a's leave by falling score, or in their input order with ``sort_unmerged``.

    Official ToMe alternates over the whole sequence with the class token first in set a (never merged, as its
    score is -inf) and re-sorts the unmerged a's by position whenever there is a class token: on the patch tokens
    behind ``p`` prefix tokens that is ``parity = p % 2`` and ``sort_unmerged = p > 0``."""
    a = list(range(parity, len(tokens), 2))
    b = list(range(1 - parity, len(tokens), 2))
    unit = [m / m.norm() for m in metric]
    guard = list(protected) or [False] * len(tokens)
    best = []  # (score, a index, b index)
    for ia in a:
        scores = [-2.0 if guard[ia] or guard[ib] else float(unit[ia] @ unit[ib]) for ib in b]
        j = max(range(len(b)), key=lambda n: scores[n])
        best.append((scores[j], ia, b[j]))
    order = sorted(range(len(best)), key=lambda n: -best[n][0])  # stable: ties keep a's order
    merged_a = {best[n][1]: best[n][2] for n in order[:r]}
    acc = {ib: [tokens[ib][0] * tokens[ib][1], tokens[ib][1], set(tokens[ib][2])] for ib in b}
    for ia, ib in merged_a.items():
        vec, size, src = tokens[ia]
        acc[ib][0] = acc[ib][0] + vec * size
        acc[ib][1] += size
        acc[ib][2] |= src
    kept = sorted(order[r:], key=lambda n: best[n][1]) if sort_unmerged else order[r:]
    out = [tokens[best[n][1]] for n in kept]
    out += [(acc[ib][0] / acc[ib][1], acc[ib][1], acc[ib][2]) for ib in b]
    return out, None


def ref_forward_tokens(model, image: torch.Tensor, plan: TokenPlan) -> Tuple[torch.Tensor, List[Token]]:
    """One image through a ViT with DSM, the slow way. Returns (prefix tokens, patch tokens)."""
    ops = ops_for(model)
    p = plan.num_prefix_tokens
    height, width = plan.grid
    x = ops.embed(model, image)
    prefix = [x[i] for i in range(p)]
    patches: List[Token] = [(x[p + i], 1.0, {i}) for i in range(height * width)]
    for blk, bp in zip(ops.blocks(model), plan.blocks):
        seq = torch.stack(prefix + [t[0] for t in patches])
        sizes = [1.0] * p + [t[1] if plan.config.prop_attn else 1.0 for t in patches]
        y, keys, (q, k) = ops.attention(blk, seq, sizes)
        seq = seq + y
        prefix = [seq[i] for i in range(p)]
        patches = [(seq[p + i], t[1], t[2]) for i, t in enumerate(patches)]
        if plan.config.metric == "tokens":
            metric = [t[0] for t in patches]
        else:
            metric = [keys[p + i] for i in range(len(patches))]
        guard = ref_protected(q, k, sizes, p, len(patches), plan.config.protect if bp.merges else 0.0)
        if bp.mode == "global":
            tome = plan.config.matching == "tome"
            patches, _ = ref_match(patches, metric, bp.r, guard, p % 2 if tome else 0, tome and p > 0)
        elif bp.mode == "local":
            new = []
            for g in bp.groups:
                for r0, r1, c0, c1 in g.boxes:
                    inside = {row * width + col for row in range(r0, r1) for col in range(c0, c1)}
                    idx = [i for i, t in enumerate(patches) if t[2] <= inside]
                    assert len(idx) == g.tokens_in
                    merged, _ = ref_match(
                        [patches[i] for i in idx], [metric[i] for i in idx], g.r, [guard[i] for i in idx]
                    )
                    new += merged
            patches = new
        seq = torch.stack(prefix + [t[0] for t in patches])
        seq = seq + ops.mlp(blk, seq)
        prefix = [seq[i] for i in range(p)]
        patches = [(seq[p + i], t[1], t[2]) for i, t in enumerate(patches)]
    return torch.stack(prefix) if prefix else x[:0], patches


def ref_forward(model, images: torch.Tensor, plan: TokenPlan) -> torch.Tensor:
    """Logits of the reference: final norm, then each input patch takes the value of the token holding it."""
    outs = []
    n0 = plan.grid[0] * plan.grid[1]
    for image in images:
        prefix, patches = ref_forward_tokens(model, image, plan)
        dense = [None] * n0
        for vec, _, src in patches:
            for s in src:
                dense[s] = vec
        seq = torch.stack(list(prefix) + dense)
        outs.append(ops_for(model).head(model, seq))
    return torch.stack(outs)
