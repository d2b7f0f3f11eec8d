"""forward_intermediates of a patched timm model: timm's API, every output on the dense patch grid."""

from __future__ import annotations

import copy

import pytest
import torch

from dsm_lightning import apply_dsm, remove_dsm, token_plan
from tests.conftest import images, tiny_vit

CASES = [
    dict(),
    dict(indices=2),
    dict(indices=[0, 3], norm=True),
    dict(indices=[1, 4], output_fmt="NLC", return_prefix_tokens=True),
    dict(indices=[5], intermediates_only=True),
    dict(output_dict=True, return_prefix_tokens=True),
]


def flatten(out):
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in flatten(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in flatten(item)]
    return [out]


@pytest.mark.parametrize("kwargs", CASES)
def test_r0_equals_timm_exactly(kwargs):
    model = tiny_vit()
    x = images(batch=2)
    with torch.no_grad():
        expected = model.forward_intermediates(x, **kwargs)
        apply_dsm(model, delay=1, r=0)
        got = model.forward_intermediates(x, **kwargs)
    want, have = flatten(expected), flatten(got)
    assert len(want) == len(have) and all(torch.equal(a, b) for a, b in zip(want, have))


def test_merged_intermediates_keep_the_dense_grid_and_dense_blocks_are_exact():
    model = tiny_vit()
    dense = copy.deepcopy(model)
    x = images(batch=2)
    apply_dsm(model, delay=2, r=6)
    plan = token_plan(model)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        _, ref_inter = dense.forward_intermediates(x)
        features = model.forward_features(x)
    assert [t.shape for t in inter] == [t.shape for t in ref_inter], "NCHW on the dense patch grid"
    assert torch.equal(inter[0], ref_inter[0]) and torch.equal(inter[1], ref_inter[1]), "delayed blocks are dense"
    assert not torch.allclose(inter[-1], ref_inter[-1])
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    # every patch carries the value of the token holding it: at most tokens_out distinct vectors per image
    last = inter[-1][0].flatten(1).T  # [H*W, C]
    assert torch.unique(last, dim=0).shape[0] <= plan.blocks[-1].tokens_out
    remove_dsm(model)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model.forward_intermediates(x)[1], ref_inter))


@pytest.mark.parametrize("kind", ["torchvision", "transformers"])
def test_dense_intermediates_for_every_adapter(kind):
    """dense_intermediates: at r=0 every block output equals the unpatched model's (read with forward hooks); with
    merging, delayed blocks are unchanged and later ones keep the dense shape."""
    from dsm_lightning import dense_intermediates
    from tests.conftest import tiny_hf, tiny_torchvision

    model = tiny_torchvision() if kind == "torchvision" else tiny_hf("Dinov2WithRegistersModel")
    blocks = model.encoder.layers if kind == "torchvision" else model.encoder.layer
    x = images()
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    apply_dsm(model, r=0, delay=0)
    with torch.no_grad():
        exact = dense_intermediates(model, x)
        assert sorted(exact) == list(range(len(blocks)))
        for i, tokens in exact.items():
            assert torch.equal(tokens, seen[i]), i
        apply_dsm(model, delay=2, r=6)
        merged = dense_intermediates(model, x, indices=[0, 1, -1])
    assert sorted(merged) == [0, 1, len(blocks) - 1]
    assert torch.equal(merged[0], seen[0]) and torch.equal(merged[1], seen[1])
    assert merged[len(blocks) - 1].shape == seen[len(blocks) - 1].shape
    assert not torch.equal(merged[len(blocks) - 1], seen[len(blocks) - 1])
