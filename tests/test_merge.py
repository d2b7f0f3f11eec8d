"""dsm_lightning/merge.py: merges conserve counts and weighted sums, spare prefix and protected tokens, fp32 sizes."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsm_lightning import DSMConfig, apply_dsm, remove_dsm, trace_tokens
from dsm_lightning.merge import MergeState, bipartite_soft_matching, merge_step, merge_wavg
from dsm_lightning.schedule import BlockPlan


@st.composite
def token_batches(draw):
    batch = draw(st.integers(1, 3))
    n = draw(st.integers(2, 40))
    r = draw(st.integers(0, n // 2))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 6, (batch, n, 1), generator=g).to(torch.float64)
    metric = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    return x, size, metric, r


@given(token_batches())
def test_merge_conserves_count_and_weighted_sum(data):
    x, size, metric, r = data
    m = bipartite_soft_matching(metric, r)
    x2, size2 = merge_wavg(m.merge, x, size)
    n = x.shape[1]
    assert x2.shape[1] == n - r
    torch.testing.assert_close(size2.sum(1), size.sum(1))  # sizes conserve the token count
    torch.testing.assert_close((x2 * size2).sum(1), (x * size).sum(1))  # size-weighted sums are conserved
    # new_index says where every input went: each output is the size-weighted mean of its inputs.
    idx = m.new_index
    assert idx.min() >= 0 and idx.max() < n - r
    for b in range(x.shape[0]):
        for j in range(n - r):
            members = (idx[b] == j).nonzero().flatten()
            assert 1 <= len(members) <= n
            w = size[b, members]
            torch.testing.assert_close(x2[b, j], (x[b, members] * w).sum(0) / w.sum())


@given(token_batches(), st.integers(1, 5))
def test_prefix_tokens_never_merged(data, num_prefix):
    x, _size, metric, r = data
    batch, n, c = x.shape
    prefix = torch.randn(batch, num_prefix, c, dtype=x.dtype)
    tokens = torch.cat([prefix, x], 1)
    full_metric = torch.cat([torch.randn(batch, num_prefix, metric.shape[-1], dtype=x.dtype), metric], 1)
    plan = BlockPlan(index=0, mode="global", tokens_in=n, tokens_out=n - r)
    out, state = merge_step(tokens, full_metric, MergeState(), plan, (1, n), num_prefix)
    assert torch.equal(out[:, :num_prefix], prefix), "prefix tokens keep their values and positions"
    assert torch.equal(state.size[:, :num_prefix], torch.ones(batch, num_prefix, 1, dtype=x.dtype))
    assert out.shape[1] == num_prefix + n - r


@given(token_batches(), st.integers(0, 2**16))
def test_protected_tokens_neither_merge_nor_receive(data, seed):
    x, size, metric, r = data
    batch, n, _ = x.shape
    g = torch.Generator().manual_seed(seed)
    protected = torch.rand(batch, n, generator=g) < 0.3
    m = bipartite_soft_matching(metric, r, protected)
    x2, size2 = merge_wavg(m.merge, x, size)
    torch.testing.assert_close(size2.sum(1), size.sum(1))
    torch.testing.assert_close((x2 * size2).sum(1), (x * size).sum(1))
    for b in range(batch):
        # unprotected a tokens with an unprotected b to go to; protection is only promised while r fits in them
        free_a = int((~protected[b, ::2]).sum()) if bool((~protected[b, 1::2]).any()) else 0
        counts = torch.bincount(m.new_index[b], minlength=n - r)
        if r <= free_a:
            for i in protected[b].nonzero().flatten().tolist():
                assert counts[m.new_index[b, i]] == 1, f"protected token {i} shares its output token (r={r})"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sizes_stay_exact_and_outputs_track_fp32_in_half_precision(dtype):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=384,
        patch_size=8,
        depth=4,
        embed_dim=64,
        num_heads=2,
        num_classes=0,
        global_pool="avg",
    ).eval()  # a 48x48 grid: 2304 patches
    apply_dsm(model, DSMConfig(delay=1, r=0.3))
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        half = copy.deepcopy(model).to(dtype)
        trace = trace_tokens(half, x.to(dtype))
        ref, out = model(x), half(x.to(dtype)).float()
        dense, dense_half = remove_dsm(copy.deepcopy(model))(x), remove_dsm(half)(x.to(dtype)).float()
    sizes = trace.state.size[:, 1:]
    assert sizes.dtype == torch.float32 and float(sizes.sum()) == 48 * 48, "every patch counted exactly once"
    assert trace.tokens.dtype == dtype
    # pooled features: merging in half precision adds little to the error half precision has anyway
    merged_err, dense_err = (out - ref).abs().max().item(), (dense_half - dense).abs().max().item()
    assert merged_err <= 2 * dense_err + 0.01 * ref.abs().max().item(), (merged_err, dense_err)
