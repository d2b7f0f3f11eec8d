"""Hugging Face ``transformers`` encoders: exact at r=0, equal to the slow reference when merging, reversible, and
the outputs users read (``last_hidden_state``, ``pooler_output``, ``logits``, ``hidden_states``) keep their meaning."""

from __future__ import annotations

import copy
import io
import pickle
from pathlib import Path

import pytest
import torch

from dsm_lightning import UnsupportedModelError, apply_dsm, is_patched, remove_dsm, token_plan, trace_tokens
from tests.conftest import HF_CLASSES, images, tiny_hf
from tests.reference import ref_forward_tokens

pytest.importorskip("transformers")

ATTN = ["sdpa", "eager"]


def main_output(out):
    """The tensor a user reads from each class's output."""
    for key in ("logits", "image_embeds", "pooler_output"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    return out.last_hidden_state


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("name", sorted(HF_CLASSES))
def test_r0_is_exact_and_remove_restores(name, attn):
    model = tiny_hf(name, attn)
    x = images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)
        apply_dsm(model, r=0, delay=0)
        assert is_patched(model)
        out = model(x)
        for key in ("last_hidden_state", "pooler_output", "logits", "image_embeds"):
            if getattr(ref, key, None) is not None:
                assert torch.equal(getattr(out, key), getattr(ref, key)), key
        apply_dsm(model, r=6, delay=1)
        merged = model(x)
        assert main_output(merged).shape == main_output(ref).shape
        assert not torch.equal(main_output(merged), main_output(ref))
        remove_dsm(model)
        assert not is_patched(model)
        assert type(model).__name__ == name
        assert torch.equal(main_output(model(x)), main_output(ref))
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


CASES = {
    "tome_like": dict(delay=0, r=6, local_blocks=0),
    "windows_then_global": dict(delay=1, r=6, local_blocks=2),
    "uneven_windows_protect": dict(delay=1, r=5, local_blocks=2, windows=(2, 3), protect=0.1),
    "proportional_keys": dict(delay=1, r=0.3, local_blocks=1, metric="keys"),
}
ENCODERS = ["ViTModel", "DeiTModel", "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"]


@pytest.mark.parametrize(
    "case,attn", [(c, "sdpa") for c in sorted(CASES)] + [("uneven_windows_protect", "eager"), ("tome_like", "eager")]
)
@pytest.mark.parametrize("name", ENCODERS)
def test_merged_matches_reference(name, case, attn):
    """``last_hidden_state`` of the patched encoder equals the loop-based reference, unmerged to the dense layout."""
    from tests.reference import HFOps

    model = tiny_hf(name, attn)
    apply_dsm(model, **CASES[case])
    x = images(batch=2, size=(36, 32))  # 9x8 grid: uneven windows
    plan = token_plan(model, img_size=(36, 32))
    n0 = plan.grid[0] * plan.grid[1]
    with torch.no_grad():
        fast = model(x, interpolate_pos_encoding=True).last_hidden_state if "Dinov2" not in name else model(x)[0]
        for b in range(2):
            prefix, patches = ref_forward_tokens(model, x[b], plan)
            dense = [None] * n0
            for vec, _, src in patches:
                for s in src:
                    dense[s] = vec
            slow = HFOps.head(model, torch.stack(list(prefix) + dense))
            torch.testing.assert_close(fast[b], slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["ViTForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_task_model_heads_read_the_dense_layout(name):
    """The classifier of a task model gets the unmerged sequence: logits equal its head applied to the patched
    encoder's ``last_hidden_state``; DINOv2's patch mean is the size-weighted mean of the merged tokens."""
    model = tiny_hf(name)
    apply_dsm(model, delay=1, r=6)
    x = images()
    with torch.no_grad():
        logits = model(x).logits
        encoder = model.vit if hasattr(model, "vit") else model.dinov2_with_registers
        seq = encoder(x).last_hidden_state
        if hasattr(model, "vit"):
            expected = model.classifier(seq[:, 0])
        else:
            patches = seq[:, 1 + model.config.num_register_tokens :]
            expected = model.classifier(torch.cat([seq[:, 0], patches.mean(1)], 1))
    torch.testing.assert_close(logits, expected)


def test_registers_and_distillation_token_are_never_merged():
    for name, prefix in [("Dinov2WithRegistersModel", 4), ("DeiTModel", 2), ("SiglipVisionModel", 0)]:
        model = tiny_hf(name)
        apply_dsm(model, delay=0, r=8)
        assert token_plan(model).num_prefix_tokens == prefix

        def hook(i, tokens, state, prefix=prefix):
            if state.size is not None and prefix:
                assert torch.equal(state.size[:, :prefix], torch.ones_like(state.size[:, :prefix]))

        with torch.no_grad():
            trace = trace_tokens(model, images(), hook=hook)
        assert trace.tokens.shape[1] == prefix + token_plan(model).blocks[-1].tokens_out


def test_hidden_states_are_dense_and_attentions_refused():
    model = tiny_hf("ViTModel")
    x = images()
    with torch.no_grad():
        dense = model(x, output_hidden_states=True).hidden_states
        apply_dsm(model, delay=2, r=6)
        merged = model(x, output_hidden_states=True).hidden_states
        assert len(merged) == len(dense) == 7
        for i in range(3):  # embeddings and the two delayed (dense) layers: exactly the dense model's
            assert torch.equal(merged[i], dense[i])
        assert all(m.shape == d.shape for m, d in zip(merged, dense))
        with pytest.raises(ValueError, match="output_attentions=True is not available while DSM is applied"):
            model(x, output_attentions=True)
        with pytest.raises(ValueError, match="bool_masked_pos"):
            model(x, bool_masked_pos=torch.zeros(2, 64, dtype=torch.bool))
        assert isinstance(model(x, return_dict=False), tuple)


def test_other_input_sizes_interpolate_positions():
    model = tiny_hf("ViTForImageClassification")
    x = images(size=(48, 40))
    with torch.no_grad():
        ref = model(x, interpolate_pos_encoding=True).logits
        apply_dsm(model, r=0, delay=0)
        assert torch.equal(model(x, interpolate_pos_encoding=True).logits, ref)
        with pytest.raises(ValueError, match="doesn't match model"):  # HF's own message, kept
            model(x)
        dinov2 = tiny_hf("Dinov2Model")
        ref = dinov2(x).last_hidden_state
        apply_dsm(dinov2, r=0, delay=0)
        assert torch.equal(dinov2(x).last_hidden_state, ref)


def test_unsupported_attention_and_models_get_one_clear_error():
    model = tiny_hf("ViTModel")
    for layer in model.layers:
        layer.attention.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        apply_dsm(model)
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1]))
    with pytest.raises(UnsupportedModelError, match="Dinov2WithRegistersModel"):
        apply_dsm(swin)


def test_pickle_deepcopy_and_save_keep_the_patch():
    model = tiny_hf("Dinov2ForImageClassification")
    apply_dsm(model, delay=1, r=6)
    x = images()
    with torch.no_grad():
        ref = model(x).logits
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert is_patched(clone)
            torch.testing.assert_close(clone(x).logits, ref, rtol=0, atol=0)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        remove_dsm(model)
        buffer.seek(0)
        assert torch.load(buffer, weights_only=True).keys() == model.state_dict().keys()


def test_hooks_on_every_layer_still_fire():
    model = tiny_hf("CLIPVisionModel")
    apply_dsm(model, delay=1, r=6)
    seen = []
    for i, layer in enumerate(model.encoder.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: seen.append((i, o.shape[1])))
    with torch.no_grad():
        model(images())
    plan = token_plan(model)
    assert seen == [(i, 1 + b.tokens_out) for i, b in enumerate(plan.blocks)]


REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference" / "dinov2_s14_fmnist.safetensors"


@pytest.mark.skipif(not REFERENCE.is_file(), reason="needs the shared reference checkpoint beside the checkout")
def test_real_dinov2_weights_give_the_same_outputs_in_transformers_and_timm():
    """The real DINOv2-S/14 as an HF Dinov2Model equals the timm reference, dense and merged (same config)."""
    from dsm_lightning.app.module import ImageClassifier
    from tools.convert import hf_dinov2_from_timm

    vit = ImageClassifier(checkpoint_path=str(REFERENCE)).model.float().eval()
    hf = hf_dinov2_from_timm(vit)
    x = images(batch=2, size=(224, 224))
    with torch.no_grad():
        for cfg in (None, dict(flops_target=0.55), dict(delay=0, local_blocks=0, r=16, metric="keys", protect=0.0)):
            if cfg is not None:
                apply_dsm(vit, **cfg)
                apply_dsm(hf, **cfg)
            torch.testing.assert_close(hf(x).last_hidden_state, vit.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["Dinov2Backbone", "Dinov2WithRegistersBackbone"])
def test_dinov2_backbone_feature_maps(name):
    """HF's DINOv2 backbones (DPT, Depth Anything): feature maps exact at r=0, dense NCHW shapes when merging,
    the stem and delayed stages unchanged."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=32, num_hidden_layers=6, num_attention_heads=2, image_size=32, patch_size=4, mlp_ratio=2)
    cfg.update(layerscale_value=0.5, out_features=["stem", "stage1", "stage4", "stage6"])
    if "Registers" in name:
        cfg.update(num_register_tokens=3)
    config_cls = transformers.Dinov2WithRegistersConfig if "Registers" in name else transformers.Dinov2Config
    torch.manual_seed(0)
    model = getattr(transformers, name)(config_cls(**cfg)).eval()
    x = images()
    with torch.no_grad():
        ref = model(x).feature_maps
        apply_dsm(model, r=0, delay=0)
        exact = model(x).feature_maps
        apply_dsm(model, delay=1, r=6)
        merged = model(x, output_hidden_states=True)
    assert len(ref) == 4 and all(torch.equal(a, b) for a, b in zip(exact, ref))
    assert [m.shape for m in merged.feature_maps] == [m.shape for m in ref]
    assert torch.equal(merged.feature_maps[0], ref[0]) and torch.equal(merged.feature_maps[1], ref[1])
    assert not torch.equal(merged.feature_maps[-1], ref[-1])
    assert len(merged.hidden_states) == 7


def test_depth_anything_runs_on_a_merged_backbone():
    transformers = pytest.importorskip("transformers")
    backbone = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28, patch_size=14, mlp_ratio=2,
        out_indices=[1, 2, 3, 4], reshape_hidden_states=False, apply_layernorm=True,
    )  # fmt: skip
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_hidden_size=8,
        reassemble_hidden_size=32, patch_size=14,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    x = images(size=(56, 56))
    with torch.no_grad():
        ref = model(x).predicted_depth
        apply_dsm(model.backbone, r=0, delay=0)
        assert torch.equal(model(x).predicted_depth, ref)
        apply_dsm(model.backbone, delay=1, r=2)
        merged = model(x).predicted_depth
    assert merged.shape == ref.shape and torch.isfinite(merged).all()
