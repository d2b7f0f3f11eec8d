"""Hypothesis properties of the merge ops and of a patched model's forward pass."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from dsm_lightning import apply_dsm, remove_dsm, token_plan, trace_tokens
from dsm_lightning.merge import MergeState, bipartite_soft_matching, merge_step, merge_wavg
from dsm_lightning.schedule import BlockPlan
from tests.conftest import images, tiny_vit


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


configs = st.fixed_dictionaries(
    {
        "delay": st.integers(0, 3),
        "schedule": st.sampled_from(["constant", "proportional"]),
        "r": st.one_of(st.integers(0, 12), st.sampled_from([0.1, 0.25, 0.5]), st.none()),
        "local_blocks": st.integers(0, 3),
        "windows": st.sampled_from([1, 4, 9, (1, 2), (2, 3), (3, 2)]),
        "prop_attn": st.booleans(),
    }
)
shapes = st.sampled_from([(32, 32), (36, 32), (28, 40), (36, 36)])


@given(configs, shapes, st.integers(0, 3))
def test_forward_follows_plan_and_windows(cfg, size, reg):
    model = tiny_vit(dynamic_img_size=True, reg_tokens=reg, no_embed_class=True)
    try:
        apply_dsm(model, **cfg)
        plan = token_plan(model, img_size=size)
    except ValueError:
        return  # invalid combination for this grid: covered by test_errors
    grid = plan.grid
    x = images(batch=2, size=size)
    n0 = grid[0] * grid[1]
    window_of = torch.empty(n0, dtype=torch.long)
    if plan.blocks and any(b.mode == "local" for b in plan.blocks):
        groups = next(b.groups for b in plan.blocks if b.mode == "local")
        w = 0
        for g in groups:
            for r0, r1, c0, c1 in g.boxes:
                for row in range(r0, r1):
                    window_of[row * grid[1] + c0 : row * grid[1] + c1] = w
                w += 1
    seen = []

    def hook(i, tokens, state):
        bp = plan.blocks[i]
        p = plan.num_prefix_tokens
        assert tokens.shape[1] == p + bp.tokens_out, "token counts equal token_plan"
        if state.size is not None:
            torch.testing.assert_close(state.size[:, p:].sum(1).squeeze(-1), torch.full((2,), float(n0)))
            assert torch.equal(state.size[:, :p], torch.ones(2, p, 1))
            # every token's sources, from the patch->token map
            counts = torch.zeros(2, bp.tokens_out).scatter_add_(1, state.pos, torch.ones(2, n0))
            torch.testing.assert_close(counts.unsqueeze(-1), state.size[:, p:])
            if bp.mode == "local":
                for b in range(2):
                    for t in range(bp.tokens_out):
                        wins = window_of[state.pos[b] == t].unique()
                        assert len(wins) == 1, "local merges never cross windows"
        seen.append(i)

    with torch.no_grad():
        trace_tokens(model, x, hook=hook)
    assert seen == list(range(plan.depth))


@given(configs)
def test_remove_gives_bit_identical_outputs(cfg):
    model = tiny_vit()
    x = images()
    with torch.no_grad():
        ref = model(x)
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            apply_dsm(model, **cfg)
        except ValueError:
            return
        model(x)
        remove_dsm(model)
        assert torch.equal(model(x), ref)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


HF_MODELS = [
    "ViTForImageClassification",
    "DeiTModel",
    "Dinov2WithRegistersModel",
    "CLIPVisionModel",
    "SiglipVisionModel",
]
ADAPTER_MODELS = ["cls", "distilled", "registers", "torchvision", "map_pool"] + [f"hf:{n}" for n in HF_MODELS]


@given(configs, st.sampled_from(ADAPTER_MODELS))
def test_every_adapter_conserves_sizes_and_follows_plan(cfg, name):
    from tests.conftest import VARIANTS, tiny_hf

    model = tiny_hf(name[3:]) if name.startswith("hf:") else VARIANTS[name]()
    try:
        apply_dsm(model, **cfg)
    except ValueError:
        return
    plan = token_plan(model)
    p, n0 = plan.num_prefix_tokens, plan.num_patches

    def hook(i, tokens, state):
        assert tokens.shape[1] == p + plan.blocks[i].tokens_out
        if state.size is not None:
            torch.testing.assert_close(state.size[:, p:].sum(1).squeeze(-1), torch.full((2,), float(n0)))
            assert torch.equal(state.size[:, :p], torch.ones(2, p, 1)), "prefix tokens never merged"

    with torch.no_grad():
        trace_tokens(model, images(), hook=hook)


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


def test_a_models_plan_table_shows_the_gflops_column_and_the_dense_ratio_the_readme_promises():
    from dsm_lightning import apply_dsm, token_plan
    from tests.conftest import tiny_vit

    table = token_plan(apply_dsm(tiny_vit(), r=4)).table()
    assert "GFLOPs" in table.splitlines()[0] and table.splitlines()[-1].endswith("x dense")
