"""timm ``NaFlexVit``: images and NaFlex batches (``patch_coord`` / ``patch_valid`` padding). r=0 bit-identical,
remove_dsm exact, equal to the loop reference that keeps padding in the sequence and masks it (both position rules,
plain and RoPE blocks), padding never merging nor receiving a merge, adaptive merging, dense intermediates. The guard,
compile, ONNX export and the callback: tests/test_rope.py."""

from __future__ import annotations

import pytest
import torch

from dsm_lightning import apply_dsm, is_patched, remove_dsm, token_plan
from dsm_lightning.adapters import get_adapter
from tests.rope_models import NAFLEX_VARIANTS, tiny_naflex
from tests.rope_reference import ref_naflex

VARIANTS = NAFLEX_VARIANTS
#: Images of three sizes (two share a grid), 4 px patches: grids 6x4, 4x6, 6x4, 4x4.
SIZES = [(24, 16), (16, 24), (24, 16), (16, 16)]


def naflex_batch(sizes=SIZES, seed=1):
    """What timm's NaFlex collator gives: each image's patches in raster order, padding behind."""
    from timm.models.naflexvit import batch_patchify

    g = torch.Generator().manual_seed(seed)
    items = []
    for h, w in sizes:
        patches, (nh, nw) = batch_patchify(torch.randn(1, 3, h, w, generator=g), (4, 4))
        coord = torch.stack(torch.meshgrid(torch.arange(nh), torch.arange(nw), indexing="ij"), -1).reshape(-1, 2)
        items.append((patches[0], coord))
    n = max(len(p) for p, _ in items)
    batch = dict(
        patches=torch.zeros(len(items), n, items[0][0].shape[1]),
        patch_coord=torch.zeros(len(items), n, 2, dtype=torch.long),
        patch_valid=torch.zeros(len(items), n, dtype=torch.bool),
    )
    for i, (p, c) in enumerate(items):
        batch["patches"][i, : len(p)], batch["patch_coord"][i, : len(p)], batch["patch_valid"][i, : len(p)] = p, c, True
    return batch


def images(n=2, size=32, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_r0_bit_identical_and_remove_exact(name):
    model = tiny_naflex(**VARIANTS[name])
    x, batch = images(), naflex_batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense, dense_batch = model(x), model(batch)
        apply_dsm(model, r=0)
        assert torch.equal(model(x), dense) and torch.equal(model(batch), dense_batch), f"{name}: r=0 differs"
        apply_dsm(model, r=4, delay=1)
        merged, merged_batch = model(x), model(batch)
        remove_dsm(model)
        assert not is_patched(model)
        assert torch.equal(model(x), dense) and torch.equal(model(batch), dense_batch), f"{name}: remove not exact"
    assert not torch.allclose(merged, dense) and not torch.allclose(merged_batch, dense_batch)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


CONFIGS = {
    "dsm_global": dict(delay=1, r=4),
    "tome_keys_protect": dict(r=3, matching="tome", metric="keys", protect=0.2),
    "no_prop_attn": dict(delay=1, r=4, prop_attn=False),
}


#: (variant, config, position rule): both rules where there is RoPE.
CASES = [(n, c, r) for n in ["learned_avg", "map_pool_layerscale"] for c in sorted(CONFIGS) for r in ["destination"]]
CASES += [(n, c, r) for n in ["rope_axial", "rope_mixed_cls_regs", "rope_dinov3_swiglu"] for c in sorted(CONFIGS)
          for r in ["destination", "centroid"]]  # fmt: skip


@pytest.mark.parametrize("name,config,rule", CASES)
def test_naflex_batch_equals_masked_loop_reference(name, config, rule, request):
    """A padded batch of three grids equals the reference that keeps the padding in every attention, masked."""
    if rule == "centroid":
        request.getfixturevalue("centroid_rule")
    model = tiny_naflex(**VARIANTS[name])
    batch = naflex_batch()
    with torch.no_grad():
        apply_dsm(model, **CONFIGS[config])
        assert get_adapter(model).rope_position == rule
        plans = [token_plan(model, grid=(h // 4, w // 4)) for h, w in SIZES]
        out = model(batch)
        ref = ref_naflex(model, batch, plans, rule)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4, msg=f"{name} / {config} / {rule}")


@pytest.mark.parametrize("name", ["learned_avg", "rope_mixed_cls_regs"])
def test_images_equal_the_loop_reference(name):
    """Images [B, C, H, W] (one grid, no padding), windows then global merging included."""
    model = tiny_naflex(**VARIANTS[name])
    x = images()
    with torch.no_grad():
        apply_dsm(model, delay=0, r=4, windows=4, local_blocks=1)
        plan = token_plan(model)
        out = model(x)
        ref = ref_naflex(model, x, [plan, plan])
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_padding_never_merges_and_never_receives_a_merge():
    """Each image's features in the padded batch equal those of the image alone, without any padding (so no padding
    patch took part in a merge or an attention), and every padding row comes back zero."""
    model = tiny_naflex(**VARIANTS["rope_axial"])
    batch = naflex_batch()
    apply_dsm(model, delay=0, r=5)
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        feats = model.forward_features(**batch)["patches"]
        for i in range(len(SIZES)):
            n = int(batch["patch_valid"][i].sum())
            alone = model.forward_features(**{k: v[i : i + 1, :n] for k, v in batch.items()})["patches"]
            torch.testing.assert_close(feats[i, : prefix + n], alone[0], rtol=1e-5, atol=1e-5)
            assert torch.equal(feats[i, prefix + n :], torch.zeros_like(feats[i, prefix + n :]))


def test_adaptive_merging_matches_one_image_at_a_time():
    model = tiny_naflex(**VARIANTS["rope_axial"])
    batch = naflex_batch()
    with torch.no_grad():
        apply_dsm(model, delay=1, r=4, threshold=0.3, protect=0.0)
        out = model(batch)
        alone = torch.cat([model({k: v[i : i + 1] for k, v in batch.items()}) for i in range(len(SIZES))])
        x = images(3)
        batched, single = model(x), torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_forward_intermediates_give_the_full_grid_and_refuse_naflex_batches():
    model = tiny_naflex(**VARIANTS["rope_mixed_cls_regs"])
    x = images()
    with torch.no_grad():
        dense_final, dense = model.forward_intermediates(x, indices=[0, 3])
        apply_dsm(model, delay=1, r=4)
        final, inter = model.forward_intermediates(x, indices=[0, 3])
        assert [t.shape for t in inter] == [t.shape for t in dense] and final.shape == dense_final.shape
        assert torch.equal(inter[0], dense[0])  # block 0 is dense (delay=1)
        with pytest.raises(ValueError, match="pass images"):
            model.forward_intermediates(naflex_batch(), output_fmt="NLC")
        with pytest.raises(ValueError, match="attn_mask=None"):
            model.forward_features(x, attn_mask=torch.zeros(1))


def test_a_batch_not_in_the_collators_layout_is_refused():
    model = apply_dsm(tiny_naflex(), delay=1, r=4)
    batch = naflex_batch()
    batch["patch_valid"][0, 3] = False  # a hole inside the grid
    with pytest.raises(ValueError, match="raster order"):
        model(batch)
