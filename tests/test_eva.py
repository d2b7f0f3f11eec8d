"""timm ``Eva`` (RoPE ViTs: EVA-02, DINOv3, PE, RoPE-ViT): r=0 bit-identical, equal to the loop reference that applies
RoPE from explicit per-token positions (both position rules, every rope type), remove_dsm exact, the positions'
properties, adaptive merging, dense intermediates. The guard, compile, ONNX export and the callback:
tests/test_rope.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsm_lightning import DSMConfig, apply_dsm, remove_dsm, token_plan, trace_tokens
from dsm_lightning.adapters import TimmEvaAdapter, get_adapter, registered_adapters
from dsm_lightning.adapters.base import UnsupportedModelError
from dsm_lightning.adapters.eva import _dense_rope
from dsm_lightning.adapters.rope import rope_at, token_centroids
from dsm_lightning.errors import ConfigError
from dsm_lightning.merge import MergeState
from tests.rope_models import EVA_VARIANTS, tiny_eva
from tests.rope_reference import ref_forward

VARIANTS = EVA_VARIANTS


def images(n=2, size=16, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param, tiny_eva(**VARIANTS[request.param])


def test_r0_bit_identical_and_remove_exact(variant):
    name, model = variant
    x = images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x)
        apply_dsm(model, r=0)
        assert torch.equal(model(x), dense), f"{name}: r=0 differs"
        apply_dsm(model, r=3, delay=1)
        merged = model(x)
        remove_dsm(model)
        assert torch.equal(model(x), dense), f"{name}: remove_dsm is not exact"
    assert not torch.allclose(merged, dense)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


CONFIGS = {
    "dsm_global": dict(delay=1, r=3),
    "tome_keys": dict(r=2, matching="tome", metric="keys", protect=0.0),
    "local_then_global": dict(delay=0, r=2, windows=4, local_blocks=1),
    "no_prop_attn": dict(delay=1, r=3, prop_attn=False, protect=0.3),
}


@pytest.mark.parametrize("rule", ["centroid", "destination"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", ["cat", "mixed", "dinov3", "rope_attn_gqa", "post_norm_scale_mlp"])
def test_patched_equals_loop_reference(name, config, rule, request):
    if rule == "centroid":
        request.getfixturevalue("centroid_rule")
    model = tiny_eva(**VARIANTS[name])
    x = images(n=2)
    with torch.no_grad():
        apply_dsm(model, **CONFIGS[config])
        assert get_adapter(model).rope_position == rule
        plan = token_plan(model)
        out = model(x)
        ref = ref_forward(model, x, plan, rule)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{name} / {config} / {rule}")


@pytest.mark.parametrize("name", ["cat", "cat_rotate_half_swiglu_ls_qknorm", "cat_ref_shape_offset_xy", "mixed",
                                  "dinov3", "mrope"])  # fmt: skip
@pytest.mark.parametrize("grid", [(4, 4), (3, 5)])
def test_rope_at_integer_positions_is_timms_table(name, grid):
    """The recomputed embedding at every patch's own position equals the table timm builds (so a centroid that
    lands on a patch gets that patch's rotation)."""
    model = tiny_eva(**VARIANTS[name], dynamic_img_size=True)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, -1, 2).float()
    table = _dense_rope(model, grid)
    got = rope_at(model.rope, coords, grid, table.dtype)[0]
    torch.testing.assert_close(got.squeeze(0), table, rtol=1e-5, atol=1e-5)


@st.composite
def merge_maps(draw):
    """A random ``pos`` (patch -> token) map with every token holding at least one patch."""
    rows, cols = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    n0 = rows * cols
    n = draw(st.integers(1, n0))
    owners = list(range(n)) + draw(st.lists(st.integers(0, n - 1), min_size=n0 - n, max_size=n0 - n))
    perm = draw(st.permutations(list(range(n0))))
    return (rows, cols), torch.tensor([[owners[p] for p in perm]]), n


@given(merge_maps())
def test_centroid_inside_the_hull_of_its_sources(case):
    grid, pos, n = case
    centroid = token_centroids(pos, n, grid)[0]
    for j in range(n):
        src = (pos[0] == j).nonzero().flatten()
        rc = torch.stack([src // grid[1], src % grid[1]], -1).float()
        assert (centroid[j] >= rc.min(0).values - 1e-6).all() and (centroid[j] <= rc.max(0).values + 1e-6).all()
        if len(src) == 1:  # nothing merged into it: exactly its own patch
            assert torch.equal(centroid[j], rc[0])
        torch.testing.assert_close(centroid[j], rc.mean(0))  # the size-weighted centroid (size = patch count)


@given(st.integers(0, 2**16), st.integers(1, 6), st.sampled_from(["dsm", "tome"]), st.integers(0, 1))
def test_destination_is_one_of_its_sources(seed, r, matching, local):
    """Through real merges: each token's destination patch is one of its own patches, its only one when nothing
    merged into it."""
    model = tiny_eva(seed=seed % 7)
    apply_dsm(model, r=r, delay=0, matching=matching, local_blocks=local, windows=4, protect=0.0)
    plan = token_plan(model)
    after = []
    with torch.no_grad():
        trace_tokens(model, images(n=2, seed=seed), hook=lambda i, t, s: after.append(s))
    inputs = TimmEvaAdapter("destination").block_inputs(model, plan)
    for index, state in enumerate([MergeState(), *after[:-1]]):  # as the engine calls it: the state before a block
        inputs(index, state)
        if state.pos is None:
            continue
        for b in range(2):
            for j in range(inputs.rep.shape[1]):
                src = (state.pos[b] == j).nonzero().flatten().tolist()
                assert inputs.rep[b, j].item() in src
                if len(src) == 1:
                    assert inputs.rep[b, j].item() == src[0]


def test_adaptive_merging_matches_one_image_at_a_time():
    """Threshold (adaptive) merging: padded batches give each image what it gets alone."""
    model = tiny_eva()
    x = images(n=3)
    with torch.no_grad():
        apply_dsm(model, delay=1, r=3, threshold=0.5, protect=0.0)
        batch = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_avg_pool_is_size_weighted():
    model = tiny_eva(class_token=False, num_reg_tokens=0, global_pool="avg", use_fc_norm=False)
    x = images()
    with torch.no_grad():
        apply_dsm(model, delay=1, r=5, protect=0.0)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        tr = trace_tokens(model, x)
        tokens, size = model.norm(tr.tokens), tr.state.size
        torch.testing.assert_close(pooled, (tokens * size).sum(1) / size.sum(1), rtol=1e-5, atol=1e-6)


def test_forward_intermediates_give_the_full_grid():
    model = tiny_eva(**VARIANTS["dinov3"])
    x = images()
    with torch.no_grad():
        dense_final, dense = model.forward_intermediates(x, indices=[0, 3])
        apply_dsm(model, delay=1, r=3)
        final, inter = model.forward_intermediates(x, indices=[0, 3])
    assert [t.shape for t in inter] == [t.shape for t in dense] and final.shape == dense_final.shape
    assert torch.equal(inter[0], dense[0])  # block 0 is dense (delay=1)


def test_unknown_rope_is_refused_with_the_fix():
    model = tiny_eva()
    model.rope = torch.nn.Identity()
    with pytest.raises(UnsupportedModelError, match="RotaryEmbeddingCat"):
        apply_dsm(model, r=2)


def test_bad_position_rule_names_the_choices():
    with pytest.raises(ConfigError, match="centroid"):
        TimmEvaAdapter("mean")
    assert isinstance(get_adapter(tiny_eva()), TimmEvaAdapter) and TimmEvaAdapter in map(type, registered_adapters())


def test_default_config_runs_every_variant(variant):
    name, model = variant
    with torch.no_grad():
        apply_dsm(model, DSMConfig())
        out = model(images())
    assert torch.isfinite(out).all(), name
