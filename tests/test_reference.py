"""The vectorised engine equals the slow loop-based reference of tests/reference.py."""

from __future__ import annotations

import pytest
import torch

from dsm_lightning import DSMConfig, apply_dsm, token_plan, trace_tokens
from tests.conftest import images, tiny_vit
from tests.reference import ref_forward

CASES = {
    "tome_like": dict(delay=0, r=6, local_blocks=0),
    "dsm_default_windows": dict(delay=1, r=6, local_blocks=2),
    "dsm_uneven_windows": dict(delay=1, r=5, local_blocks=2, windows=(2, 3)),
    "per_block_r": dict(delay=2, r=[0, 0, 9, 4, 7, 2], local_blocks=1),
    "no_prop_attn": dict(delay=1, r=6, local_blocks=1, prop_attn=False),
    "proportional": dict(delay=1, r=0.3, local_blocks=1),
    "token_metric": dict(delay=1, r=6, local_blocks=1, metric="tokens"),
    "protect": dict(delay=0, r=0.25, local_blocks=1, protect=0.2),
    "protect_tokens_windows": dict(delay=1, r=6, local_blocks=2, windows=(2, 3), metric="tokens", protect=0.1),
    "official_tome": DSMConfig.tome(6).to_dict(),
    "tome_matching_dsm_options": dict(delay=1, r=0.3, local_blocks=1, protect=0.2, matching="tome"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "model_kw",
    [dict(), dict(init_values=0.4, qk_norm=True, reg_tokens=2), dict(class_token=False, global_pool="avg")],
    ids=["cls", "ls_qknorm_reg", "avg"],
)
def test_matches_reference(case, model_kw):
    x = images(batch=2, size=(36, 32))  # 9x8 grid: uneven windows
    model = tiny_vit(**model_kw, dynamic_img_size=True)
    apply_dsm(model, **CASES[case])
    plan = token_plan(model, img_size=(36, 32))
    with torch.no_grad():
        fast = model(x)
        slow = ref_forward(model, x, plan)
    torch.testing.assert_close(fast, slow, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["tome_like", "dsm_default_windows", "proportional", "protect", "official_tome"])
def test_torchvision_matches_reference(case):
    from tests.conftest import tiny_torchvision

    model = tiny_torchvision()
    x = images(batch=2)
    apply_dsm(model, **CASES[case])
    plan = token_plan(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_forward(model, x, plan), rtol=1e-4, atol=1e-4)


def test_tome_matching_changes_the_merges():
    """The two matchings are different arbitrary choices (set parity, order of unmerged tokens), not one: different
    patches end up sharing a token."""
    x = images(batch=2, size=(36, 32))
    groups = []
    for matching in ("dsm", "tome"):
        model = apply_dsm(tiny_vit(dynamic_img_size=True), r=6, matching=matching)
        with torch.no_grad():
            groups.append(trace_tokens(model, x).state.pos)
    assert not torch.equal(groups[0], groups[1])
