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
