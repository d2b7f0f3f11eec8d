"""r=0 equals the unpatched model; remove_dsm restores it bit for bit; merged forward runs for every variant."""

from __future__ import annotations

import torch

from dsm_lightning import apply_dsm, is_patched, remove_dsm, token_plan
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
