"""Hugging Face ``DINOv3ViTModel`` / ``DINOv3ViTBackbone`` (RoPE, registers, LayerScale): r=0 bit-identical,
equal to the loop reference that rotates every token from its explicit position (both rules, eager and SDPA),
remove_dsm exact, prefix tokens never merge, adaptive merging, backbone feature maps. The guard, compile, ONNX
export and the callback: tests/test_rope.py."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_lightning import apply_dsm, is_patched, remove_dsm, token_plan, trace_tokens
from dsm_lightning.adapters import HuggingFaceDinov3Adapter, get_adapter
from dsm_lightning.adapters.hf_dinov3 import dinov3_rope_at
from dsm_lightning.merge import MergeState
from tests.conftest import images
from tests.rope_models import tiny_dinov3
from tests.rope_reference import dinov3_position_rope, ref_dinov3

transformers = pytest.importorskip("transformers")

ATTN = ["sdpa", "eager"]
RULES = ["destination", "centroid"]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("gated", [False, True])
def test_r0_bit_identical_and_remove_exact(attn, gated):
    model = tiny_dinov3(attn, use_gated_mlp=gated)
    x = images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x, output_hidden_states=True)
        masked = torch.zeros(2, 64, dtype=torch.bool)
        masked[:, ::3] = True
        dense_masked = model(x, bool_masked_pos=masked).last_hidden_state
        apply_dsm(model, r=0)
        out = model(x, output_hidden_states=True)
        assert torch.equal(model(x, bool_masked_pos=masked).last_hidden_state, dense_masked)
        assert torch.equal(out.last_hidden_state, dense.last_hidden_state)
        assert torch.equal(out.pooler_output, dense.pooler_output)
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, dense.hidden_states))
        apply_dsm(model, r=6, delay=1)
        merged = model(x, output_hidden_states=True)
        assert merged.last_hidden_state.shape == dense.last_hidden_state.shape
        assert len(merged.hidden_states) == len(dense.hidden_states)
        assert torch.equal(merged.hidden_states[1], dense.hidden_states[1])  # layer 0 is dense (delay=1)
        assert not torch.allclose(merged.last_hidden_state, dense.last_hidden_state)
        remove_dsm(model)
        assert not is_patched(model) and type(model).__name__ == "DINOv3ViTModel"
        assert torch.equal(model(x).last_hidden_state, dense.last_hidden_state)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


CONFIGS = {
    "dsm_global": dict(delay=1, r=6),
    "tome_keys": dict(r=5, matching="tome", metric="keys", protect=0.0),
    "windows_then_global_protect": dict(delay=0, r=6, windows=4, local_blocks=1, protect=0.2),
    "no_prop_attn": dict(delay=1, r=6, prop_attn=False),
}


@pytest.mark.parametrize("rule", ["destination", "centroid"])
@pytest.mark.parametrize("config,attn", [(c, "sdpa") for c in sorted(CONFIGS)] + [("dsm_global", "eager")])
def test_patched_equals_loop_reference(config, attn, rule, request):
    if rule == "centroid":
        request.getfixturevalue("centroid_rule")
    model = tiny_dinov3(attn)
    x = images(batch=2)
    with torch.no_grad():
        apply_dsm(model, **CONFIGS[config])
        assert get_adapter(model).rope_position == rule
        plan = token_plan(model)
        out = model(x).last_hidden_state
        ref = ref_dinov3(model, x, plan, rule)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{config} / {attn} / {rule}")


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_rope_at_integer_positions_is_hfs_table(grid):
    model = tiny_dinov3()
    adapter = get_adapter(model)
    cos, sin = adapter.dense_rope(model, grid)
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    coords = torch.stack([rows, cols], -1).reshape(1, -1, 2).float()
    got_cos, got_sin = dinov3_rope_at(model.rope_embeddings, coords, grid, cos.dtype)
    torch.testing.assert_close(got_cos[0, 0], cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_sin[0, 0], sin, rtol=1e-6, atol=1e-6)
    x = images(size=(grid[0] * 4, grid[1] * 4))
    with torch.no_grad():  # and HF's forward builds that same table
        dense = model(x).last_hidden_state
        apply_dsm(model, r=0)
        assert torch.equal(model(x).last_hidden_state, dense)


def test_prefix_tokens_never_merge():
    model = tiny_dinov3()
    apply_dsm(model, delay=0, r=8)
    plan = token_plan(model)
    assert plan.num_prefix_tokens == 5

    def hook(i, tokens, state):
        if state.size is not None:
            assert torch.equal(state.size[:, :5], torch.ones_like(state.size[:, :5]))
            assert int(state.pos.max()) < tokens.shape[1] - 5  # every patch sits in a patch token

    with torch.no_grad():
        trace = trace_tokens(model, images(), hook=hook)
    assert trace.tokens.shape[1] == 5 + plan.blocks[-1].tokens_out


@pytest.mark.parametrize("rule", ["destination", "centroid"])
def test_adaptive_merging_matches_one_image_at_a_time(rule, request):
    if rule == "centroid":
        request.getfixturevalue("centroid_rule")
    model = tiny_dinov3()
    x = images(batch=3)
    with torch.no_grad():
        apply_dsm(model, delay=1, r=6, threshold=0.3)
        batch = model(x).last_hidden_state
        alone = torch.cat([model(x[i : i + 1]).last_hidden_state for i in range(3)])
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-5)


def test_backbone_feature_maps():
    model = tiny_dinov3(backbone=True, out_features=["stem", "stage1", "stage4"], return_class_token=True)
    x = images()
    with torch.no_grad():
        ref = model(x)
        apply_dsm(model, r=0)
        exact = model(x)
        apply_dsm(model, delay=1, r=6)
        merged = model(x, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(exact.feature_maps, ref.feature_maps))
    assert all(torch.equal(a, b) for a, b in zip(exact.cls_tokens, ref.cls_tokens))
    assert [m.shape for m in merged.feature_maps] == [m.shape for m in ref.feature_maps]
    assert torch.equal(merged.feature_maps[1], ref.feature_maps[1])  # layer 1 is dense (delay=1)
    assert not torch.allclose(merged.feature_maps[-1], ref.feature_maps[-1])
    assert len(merged.hidden_states) == 5


def test_refusals_name_the_fix():
    model = tiny_dinov3()
    apply_dsm(model, r=4)
    with pytest.raises(ValueError, match="output_attentions=True is not available while DSM is applied"):
        model(images(), output_attentions=True)
    assert isinstance(model(images(), return_dict=False), tuple)
    flash = tiny_dinov3()
    for layer in flash.model.layer:
        layer.attention.config._attn_implementation = "flash_attention_2"
    from dsm_lightning import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        apply_dsm(flash)


@pytest.mark.slow
@settings(max_examples=10)
@given(st.integers(0, 2**16), st.integers(1, 8), st.sampled_from(["dsm", "tome"]), st.sampled_from(RULES))
def test_every_token_rotates_at_a_position_of_its_own_patches(seed, r, matching, rule):
    """Through real merges, the (cos, sin) each layer gets: "destination" is HF's table row of one of the token's
    own patches; "centroid" is HF's rotation at the mean (row, col) of its patches (inside their hull: tested on
    the positions in tests/test_eva.py); both are its own patch's row when nothing merged into it."""
    model = tiny_dinov3(seed=seed % 5)
    adapter = HuggingFaceDinov3Adapter(rule)
    apply_dsm(model, r=r, delay=0, matching=matching, protect=0.0)
    plan = token_plan(model)
    after = []
    with torch.no_grad():
        trace_tokens(model, images(seed=seed), hook=lambda i, t, s: after.append(s))
    cos_table, sin_table = adapter.dense_rope(model, plan.grid)
    inputs = adapter.block_inputs(model, plan)
    for index, state in enumerate([MergeState(), *after[:-1]]):  # the state before each layer, as the engine calls
        _, (cos, sin) = inputs(index, state)
        if state.pos is None:
            assert torch.equal(cos, cos_table)
            continue
        for b in range(2):
            for j in range(cos.shape[2]):
                src = [int(s) for s in (state.pos[b] == j).nonzero().flatten()]
                if rule == "destination":
                    assert any(torch.equal(cos[b, 0, j], cos_table[s]) for s in src), "no row of its own patches"
                else:
                    want_cos, want_sin = dinov3_position_rope(model, (None, len(src), set(src), -1), rule, plan.grid)
                    torch.testing.assert_close(cos[b, 0, j], want_cos, rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(sin[b, 0, j], want_sin, rtol=1e-5, atol=1e-5)
                if len(src) == 1:
                    torch.testing.assert_close(cos[b, 0, j], cos_table[src[0]], rtol=1e-5, atol=1e-5)
                    torch.testing.assert_close(sin[b, 0, j], sin_table[src[0]], rtol=1e-5, atol=1e-5)
