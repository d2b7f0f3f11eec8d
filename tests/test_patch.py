"""dsm_lightning/patch.py: apply_dsm / remove_dsm / unpatched against the original model, plans, copies, pickles."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dsm_lightning import apply_dsm, get_config, is_patched, remove_dsm, token_plan, trace_tokens
from tests.conftest import images, tiny_vit


def test_r0_equals_unpatched(variant):
    name, model = variant
    x = images()
    with torch.no_grad():
        ref = model(x)
        apply_dsm(model, delay=1, r=0)
        out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6, msg=f"{name}: r=0 differs from the dense model")


def test_r0_dynamic_img_size_non_square():
    model = tiny_vit(dynamic_img_size=True, qk_norm=True, init_values=0.3)
    x = images(size=(40, 24))
    with torch.no_grad():
        ref = model(x)
        apply_dsm(model, r=0)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)


def test_remove_restores_bit_identical(variant):
    name, model = variant
    x = images()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    cls_before = type(model)
    with torch.no_grad():
        ref = model(x)
        apply_dsm(model, delay=1, r=4, local_blocks=1)
        merged = model(x)
        assert set(model.state_dict()) == set(state_before), "patching must not add parameters or buffers"
        apply_dsm(model, delay=2, r=3)  # re-configure while patched
        remove_dsm(model)
        remove_dsm(model)  # idempotent
        out = model(x)
    assert type(model) is cls_before and not is_patched(model)
    assert torch.equal(out, ref), name
    assert not torch.allclose(merged, ref), f"{name}: merging r=4 should change the output"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state_before.items())


def test_apply_twice_reconfigures():
    model = tiny_vit()
    apply_dsm(model, delay=1, r=2)
    apply_dsm(model, r=5)
    plan = token_plan(model)
    assert plan.config.delay == 1 and plan.r == 5
    assert type(model).__mro__[1].__name__ == "VisionTransformer"  # one level of patching only


def test_forward_features_and_head_keep_working(variant):
    _name, model = variant
    x = images()
    with torch.no_grad():
        dense_feats = model.forward_features(x) if hasattr(model, "forward_features") else None
        apply_dsm(model, delay=1, r=6)
        out = model(x)
        assert out.shape[-1] == 7 and torch.isfinite(out).all()
        if dense_feats is not None:
            feats = model.forward_features(x)
            assert feats.shape == dense_feats.shape, "forward_features keeps the dense token layout"
            torch.testing.assert_close(model.forward_head(feats), out)


def test_avg_pool_is_size_weighted():
    """With avg pooling the pooled feature equals the size-weighted mean of the merged tokens."""
    from dsm_lightning import trace_tokens

    model = tiny_vit(class_token=False, global_pool="avg", fc_norm=False)
    x = images()
    with torch.no_grad():
        apply_dsm(model, delay=1, r=8)
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        tr = trace_tokens(model, x)
        tokens = model.norm(tr.tokens)
        size = tr.state.size
        weighted = (tokens * size).sum(1) / size.sum(1)
    torch.testing.assert_close(pooled, weighted, rtol=1e-5, atol=1e-6)


def test_unpatched_runs_dense_then_restores_the_patch():
    from dsm_lightning import get_config
    from dsm_lightning.patch import unpatched

    model = tiny_vit()
    x = images()
    with torch.no_grad():
        dense = model(x)
        apply_dsm(model, delay=1, r=6)
        merged = model(x)
        config = get_config(model)
        with unpatched(model):
            assert torch.equal(model(x), dense)
        assert torch.equal(model(x), merged) and get_config(model) == config and is_patched(model)


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_patched_model_round_trips_whole(how):
    model = tiny_vit().eval()
    apply_dsm(model, delay=1, r=3)
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # a whole module is code, not weights: trusted files only
    else:
        loaded = copy.deepcopy(model)
    assert is_patched(loaded) and get_config(loaded) == get_config(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    remove_dsm(loaded)
    assert type(loaded) is type(tiny_vit()) and loaded.state_dict().keys() == model.state_dict().keys()


def test_shallow_copy_of_a_patched_model_can_be_unpatched_or_repatched_without_touching_the_original():
    model = apply_dsm(tiny_vit(), delay=1, r=3)
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
        shallow = remove_dsm(copy.copy(model))
        assert is_patched(model) and not is_patched(shallow)
        assert torch.equal(model(x), expected), "the original still runs merged"
        assert torch.equal(shallow(x), tiny_vit()(x)), "the copy runs dense"
        assert shallow.blocks[0].attn.qkv.weight is model.blocks[0].attn.qkv.weight, "weights stay shared"
        again = apply_dsm(copy.copy(model), r=1)
        assert get_config(again).r == 1 and get_config(model).r == 3 and torch.equal(model(x), expected)


def test_default_config_runs_a_dynamic_size_model_on_a_tiny_grid():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, depth=4).eval()
    apply_dsm(model)  # defaults: no local phase, so a 2x2 grid needs no windows
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


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
