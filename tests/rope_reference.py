"""A slow loop reference of DSM on RoPE ViTs (timm ``Eva``, Hugging Face ``DINOv3ViTModel``), written for obviousness,
not speed.

Tokens are Python lists of (vector, size, set of source patches, representative patch). Every block computes each
patch token's position explicitly: the mean (row, col) of its source patches (``"centroid"``), or the patch of the
token it merged into (``"destination"``, tracked through every match below), and builds that one token's rotary
embedding from it. Attention is written out (tests/reference.py) with the log-size bias; prefix tokens are never
rotated nor merged. Per-token layers (norms, projections, LayerScale, MLP), the embedding and the head are the model's.
DINOv3's rotation is rebuilt here from HF's formula (patch centres in [-1, 1], ``2 pi c inv_freq``), not the adapter's.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Set, Tuple

import torch
from timm.layers import apply_rot_embed_cat

from dsm_lightning.adapters.eva import _dense_rope
from dsm_lightning.adapters.rope import rope_at
from dsm_lightning.schedule import TokenPlan
from tests.reference import ref_match, ref_protected, ref_softmax_attention

Token = Tuple[torch.Tensor, float, Set[int], int]


def dense_table(model, grid):
    """The model's own rotary table for a grid (Eva's, or NaFlex's ``rope.get_embed(shape=grid)``)."""
    from timm.models.naflexvit import NaFlexVit

    if isinstance(model, NaFlexVit):
        return model.rope.get_embed(shape=grid)
    return _dense_rope(model, grid)


def position_rope(model, token: Token, rule: str, grid, block: int, table=None) -> torch.Tensor:
    """The rotary embedding of one token ([2 * head_dim], or [heads, 2 * head_dim] for mixed RoPE); ``table``: the
    model's dense table for ``grid``, if already built."""
    _, _, src, rep = token
    if rule == "destination":
        dense = dense_table(model, grid) if table is None else table
        return dense[rep] if dense.ndim == 2 else dense[block, :, rep]
    rows = [s // grid[1] for s in src]
    cols = [s % grid[1] for s in src]
    coords = torch.tensor([[[sum(rows) / len(src), sum(cols) / len(src)]]])
    emb = rope_at(model.rope, coords, grid, torch.float32)  # [1, 1, 1, 2d] or [1, depth, heads, 1, 2d]
    return emb[0, 0, 0] if emb.ndim == 4 else emb[0, block, :, 0]


def qkv(attn, x):
    """[T, heads, head_dim] each, from the attention's own projections."""
    t = x.shape[0]
    if attn.qkv is not None:
        bias = None if getattr(attn, "q_bias", None) is None else torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        out = torch.nn.functional.linear(x, attn.qkv.weight, bias if bias is not None else attn.qkv.bias)
        q, k, v = out.reshape(t, 3, attn.num_heads, -1).unbind(1)
        return q, k, v
    kv = getattr(attn, "num_kv_heads", attn.num_heads)
    return (attn.q_proj(x).reshape(t, attn.num_heads, -1), attn.k_proj(x).reshape(t, kv, -1),
            attn.v_proj(x).reshape(t, kv, -1))  # fmt: skip


def attention(model, blk, seq, sizes, tokens: Sequence[Token], rule, grid, index, p=None, key_ok=None):
    """Residual branch of one block's attention ([T, C]), the pre-rotation keys averaged over heads, and (q, k).

    ``tokens`` are the patch tokens at ``seq[p : p + len(tokens)]`` (``p`` defaults to all the rest being prefix);
    ``key_ok`` masks keys (NaFlex padding). An Eva block (pre- or post-norm) or a plain timm ``Block``."""
    attn = blk.attn
    plain = hasattr(blk, "ls1")  # timm Block: no RoPE, LayerScale ls1
    post = not plain and not hasattr(blk, "gamma_1")
    x = seq if post else blk.norm1(seq)
    q, k, v = qkv(attn, x)
    q, k = attn.q_norm(q), attn.k_norm(k)
    keys = k.mean(dim=1)
    p = len(seq) - len(tokens) if p is None else p
    half = bool(getattr(attn, "rotate_half", False))
    if model.rope is not None:
        q, k = q.clone(), k.clone()
        table = dense_table(model, grid)
        for i, token in enumerate(tokens):  # prefix tokens (and padding) are never rotated
            emb = position_rope(model, token, rule, grid, index, table)
            q[p + i] = apply_rot_embed_cat(q[p + i], emb, half=half)
            k[p + i] = apply_rot_embed_cat(k[p + i], emb, half=half)
    groups = attn.num_heads // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = ref_softmax_attention(q, k, v, sizes, key_ok).reshape(len(seq), -1)
    out = attn.norm(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    out = attn.proj(out)
    if plain:
        return blk.ls1(out), keys, (q, k)
    if post:
        return blk.norm1(out), keys, (q, k)
    return (out if blk.gamma_1 is None else blk.gamma_1 * out), keys, (q, k)


def mlp(blk, seq):
    if hasattr(blk, "ls2"):  # timm Block
        return blk.ls2(blk.mlp(blk.norm2(seq)))
    if not hasattr(blk, "gamma_1"):
        return blk.norm2(blk.mlp(seq))
    out = blk.mlp(blk.norm2(seq))
    return out if blk.gamma_2 is None else blk.gamma_2 * out


def match(tokens: List[Token], metric, r, guard, parity=0, sort_unmerged=False) -> List[Token]:
    """tests/reference.py's matching, carrying each token's representative patch: a token that received merges
    (set b) keeps its own, the unmerged keep theirs."""
    plain = [(vec, size, src) for vec, size, src, _ in tokens]
    out, _ = ref_match(plain, metric, r, guard, parity, sort_unmerged)
    b = list(range(1 - parity, len(tokens), 2))
    rep_of = {frozenset(t[2]): t[3] for t in tokens}
    n_unmerged = len(out) - len(b)
    result = [(v, s, src, rep_of[frozenset(src)]) for v, s, src in out[:n_unmerged]]
    result += [(v, s, src, tokens[ib][3]) for (v, s, src), ib in zip(out[n_unmerged:], b)]
    return result


def ref_loop(x, blocks, plan: TokenPlan, attend, ffn, num_padding: int = 0):
    """The block loop on one image's embedded tokens ``x`` [T, C]; ``attend(blk, seq, sizes, patches, index, key_ok)``
    gives (residual branch, keys averaged over heads, (q, k)), ``ffn(blk, seq)`` the MLP branch.

    The last ``num_padding`` tokens of ``x`` are padding (NaFlex): they stay in the sequence behind the patch tokens,
    every attention masks them out as keys (``key_ok``), they never enter a match, and per-token layers run on them.
    Returns (prefix, patches)."""
    p = plan.num_prefix_tokens
    height, width = plan.grid
    n0 = height * width
    prefix = [x[i] for i in range(p)]
    patches: List[Token] = [(x[p + i], 1.0, {i}, i) for i in range(n0)]
    padding = [x[p + n0 + i] for i in range(num_padding)]

    def split(seq):
        n = len(patches)
        return [seq[i] for i in range(p)], [(seq[p + i], *t[1:]) for i, t in enumerate(patches)], list(seq[p + n :])

    for blk, bp in zip(blocks, plan.blocks):
        seq = torch.stack(prefix + [t[0] for t in patches] + padding)
        sizes = [1.0] * p + [t[1] if plan.config.prop_attn else 1.0 for t in patches] + [1.0] * len(padding)
        key_ok = [True] * (p + len(patches)) + [False] * len(padding) if padding else None
        y, keys, (q, k) = attend(blk, seq, sizes, patches, bp.index, key_ok)
        prefix, patches, padding = split(seq + y)
        metric = (
            [t[0] for t in patches] if plan.config.metric == "tokens" else [keys[p + i] for i in range(len(patches))]
        )
        live = p + len(patches)  # the class attention ranks patch tokens over the unmasked keys only
        guard = ref_protected(q[:live], k[:live], sizes, p, len(patches), plan.config.protect if bp.merges else 0.0)
        if bp.mode == "global":
            tome = plan.config.matching == "tome"
            patches = match(patches, metric, bp.r, guard, p % 2 if tome else 0, tome and p > 0)
        elif bp.mode == "local":
            new = []
            for g in bp.groups:
                for r0, r1, c0, c1 in g.boxes:
                    inside = {row * width + col for row in range(r0, r1) for col in range(c0, c1)}
                    idx = [i for i, t in enumerate(patches) if t[2] <= inside]
                    new += match([patches[i] for i in idx], [metric[i] for i in idx], g.r, [guard[i] for i in idx])
            patches = new
        seq = torch.stack(prefix + [t[0] for t in patches] + padding)
        prefix, patches, padding = split(seq + ffn(blk, seq))
    return prefix, patches


def ref_forward_tokens(model, image, plan: TokenPlan, rule: str):
    """One image through an Eva with DSM, the slow way. Returns (prefix tokens, patch tokens)."""
    x, _ = model._pos_embed(model.patch_embed(image[None]))
    x = model.norm_pre(x)[0]

    def attend(blk, seq, sizes, patches, index, key_ok):
        return attention(model, blk, seq, sizes, patches, rule, plan.grid, index)

    return ref_loop(x, model.blocks, plan, attend, mlp)


def to_dense(prefix, patches, grid):
    """[prefix + N0, C]: each input patch takes the value of the token holding it."""
    dense = [None] * (grid[0] * grid[1])
    for vec, _, src, _ in patches:
        for s in src:
            dense[s] = vec
    return torch.stack(list(prefix) + dense)


def ref_forward(model, images, plan: TokenPlan, rule: str = "centroid") -> torch.Tensor:
    """Logits of the reference: final norm, each input patch takes the value of the token holding it, timm's head."""
    outs = []
    for image in images:
        seq = to_dense(*ref_forward_tokens(model, image, plan, rule), plan.grid)
        outs.append(model.forward_head(model.norm(seq)[None])[0])
    return torch.stack(outs)


# ---------------------------------------------------------------- Hugging Face DINOv3ViTModel


def dinov3_position_rope(model, token: Token, rule: str, grid) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [head_dim] of one token, HF's rope math at one explicit position: the patch centre of its
    representative patch (``"destination"``) or of the mean (row, col) of its patches (``"centroid"``), mapped to
    [-1, 1] as ``2 (t + 0.5) / n - 1``, angles ``2 pi c inv_freq`` per axis, concatenated and tiled twice."""
    _, _, src, rep = token
    pts = [rep] if rule == "destination" else sorted(src)
    row = sum(s // grid[1] for s in pts) / len(pts)
    col = sum(s % grid[1] for s in pts) / len(pts)
    centre = torch.tensor([2 * (row + 0.5) / grid[0] - 1, 2 * (col + 0.5) / grid[1] - 1], dtype=torch.float32)
    inv_freq = model.rope_embeddings.inv_freq
    angles = torch.cat([2 * math.pi * centre[0] * inv_freq, 2 * math.pi * centre[1] * inv_freq]).tile(2)
    return angles.cos(), angles.sin()


def dinov3_attention(model, layer, seq, sizes, tokens: Sequence[Token], rule, grid):
    """Residual branch of a DINOv3 layer's attention, written out: every patch token rotated by its own (cos, sin)
    with HF's ``rotate_half``; prefix tokens never rotated."""
    from transformers.models.dinov3_vit.modeling_dinov3_vit import rotate_half

    attn = layer.attention
    x = layer.norm1(seq)
    t, d = x.shape[0], attn.head_dim
    q, k, v = (proj(x).reshape(t, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    keys = k.mean(dim=1)
    p = t - len(tokens)
    q, k = q.clone(), k.clone()
    for i, token in enumerate(tokens):
        cos, sin = dinov3_position_rope(model, token, rule, grid)
        q[p + i] = q[p + i] * cos + rotate_half(q[p + i]) * sin
        k[p + i] = k[p + i] * cos + rotate_half(k[p + i]) * sin
    out = attn.o_proj(ref_softmax_attention(q, k, v, sizes).reshape(t, -1))
    return layer.layer_scale1(out), keys, (q, k)


def ref_dinov3(model, images, plan: TokenPlan, rule: str = "destination") -> torch.Tensor:
    """``last_hidden_state`` of the reference for a DINOv3ViTModel: HF's embeddings, the loop, HF's final norm."""
    outs = []
    for image in images:
        x = model.embeddings(image[None])[0]

        def attend(layer, seq, sizes, patches, index, key_ok):
            return dinov3_attention(model, layer, seq, sizes, patches, rule, plan.grid)

        def ffn(layer, seq):
            return layer.layer_scale2(layer.mlp(layer.norm2(seq)))

        prefix, patches = ref_loop(x, model.model.layer, plan, attend, ffn)
        outs.append(model.norm(to_dense(prefix, patches, plan.grid)))
    return torch.stack(outs)


# ---------------------------------------------------------------- timm NaFlexVit


def ref_naflex(model, batch, plans, rule: str = "destination") -> torch.Tensor:
    """Logits of the reference for a NaFlex batch (dict of ``patches``, ``patch_coord``, ``patch_valid``) or images
    ``[B, C, H, W]``: each image embedded by NaFlex (with its padding), the loop with the padding masked (``plans``:
    image -> its grid's TokenPlan), padding rows zero after the final norm, NaFlex's masked pooling and head."""
    outs = []
    for i in range(len(plans)):
        if isinstance(batch, dict):
            one = {key: value[i : i + 1] for key, value in batch.items()}
            x, _ = model.embeds(one["patches"], patch_coord=one["patch_coord"], patch_valid=one["patch_valid"])
            valid = one["patch_valid"]
        else:
            (x, _), valid = model.embeds(batch[i : i + 1]), None
        x = model.norm_pre(x)[0]
        plan = plans[i]
        n0 = plan.grid[0] * plan.grid[1]
        padding = x.shape[0] - plan.num_prefix_tokens - n0

        def attend(blk, seq, sizes, patches, index, key_ok, plan=plan):
            return attention(model, blk, seq, sizes, patches, rule, plan.grid, index, plan.num_prefix_tokens, key_ok)

        prefix, patches = ref_loop(x, model.blocks, plan, attend, mlp, padding)
        seq = model.norm(to_dense(prefix, patches, plan.grid))
        seq = torch.cat([seq, seq.new_zeros(padding, seq.shape[1])])
        outs.append(model.forward_head(seq[None], patch_valid=valid)[0])
    return torch.stack(outs)
