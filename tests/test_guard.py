"""Quality guard: the most merging schedule whose agreement with dense meets the target, chosen on dense batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_lightning import DSMCallback, DSMConfig, apply_dsm, is_patched, remove_dsm, token_plan
from dsm_lightning.guard import guard_candidates, quality_guard
from tests.conftest import images, tiny_vit
from tests.lightning_helpers import make_image_folder, spy_patched, tiny_classifier, tiny_data, trainer


def _agreement(model, cfg, x, dense):
    apply_dsm(model, cfg)
    try:
        with torch.no_grad():
            return float((model(x).argmax(-1) == dense.argmax(-1)).float().mean())
    finally:
        remove_dsm(model)


def test_candidates_keep_fixed_fields_and_merge_less_in_order():
    model = tiny_vit()
    base = DSMConfig(delay=2, local_blocks=1, metric="tokens", protect=0.1, flops_target=0.5)
    cands = guard_candidates(base)
    assert cands[0] == base
    assert all(c.delay == 2 and c.local_blocks == 1 and c.metric == "tokens" and c.protect == 0.1 for c in cands)
    ratios = [token_plan(model, c).flops_ratio(32, 128) for c in cands]
    assert ratios == sorted(ratios), "most merging first"
    fixed_r = guard_candidates(DSMConfig(delay=1, r=8))
    assert [c.r for c in fixed_r] == [8, 6, 4, 2]
    assert [c.r for c in guard_candidates(DSMConfig(delay=1, r=(0, 4, 4, 2, 2, 0)))][-1] == (0, 1, 1, 0, 0, 0)


@pytest.mark.parametrize("target", [0.01, 0.75, 1.0])
def test_choice_meets_target_and_the_next_more_merging_trial_did_not(target):
    model = tiny_vit(depth=6)
    x = images(batch=24, seed=3)
    with torch.no_grad():
        dense = model(x)
    base = DSMConfig(delay=0, local_blocks=0, flops_target=0.4)
    result = quality_guard(model, x, dense, base, target, batch_size=8)
    assert not is_patched(model), "the guard leaves the model as it found it"
    cands = guard_candidates(base)
    if result.config is None:
        assert result.agreement == 1.0
        # bisection: the least merging candidate was tried and failed
        assert any(t["config"] == cands[-1].to_dict() and t["agreement"] < target for t in result.trials)
    else:
        assert result.agreement >= target
        assert _agreement(model, result.config, x, dense) == pytest.approx(result.agreement)
        i = cands.index(result.config)
        if i > 0:  # the bisection saw the more merging neighbour fail
            assert any(t["config"] == cands[i - 1].to_dict() and t["agreement"] < target for t in result.trials)
    if target == 0.01:
        assert result.config == base, "a trivial target keeps the requested schedule"
    assert len(result.trials) <= 3, "bisection over 7 candidates needs at most 3 evaluations"


def test_callback_guard_samples_the_stage_then_merges_every_batch_and_logs(tmp_path):
    data = tiny_data(make_image_folder(tmp_path, per_class=8))  # 24 images, batches of 4
    module = tiny_classifier()
    seen = spy_patched(module)
    cb = DSMCallback(delay=1, r=2, min_agreement=0.01, guard_images=8)
    out = trainer(callbacks=[cb]).validate(module, datamodule=data, verbose=False)[0]
    # two capture calls (8 sampled images in batches of 4) stop at the ViT; then all 6 stage batches merge
    assert seen == [False, False] + [True] * 6
    assert cb.guard is not None and cb.guard.config == cb.config and cb.guard.images == 8
    assert "drawn at random from the whole stage" in cb.guard.reason()
    assert out["dsm/guard_agreement"] >= 0.01 and out["dsm/guard_flops_ratio"] < 1.0
    assert out["dsm/guard_images"] == 8 and out["dsm/stage_cost_ratio"] > 0
    assert not is_patched(module.model)
    cost = [line for line in cb.quality.report() if line.startswith("Cost:")]
    assert cost and "compare_dense" not in cost[0]
    assert "not compare_dense's dense passes" in next(s for s in cb.quality.report(every_batch=True) if "Cost:" in s)


def test_callback_guard_on_a_stage_too_small_to_show_the_target_stays_dense_and_says_why(tmp_path):
    data = tiny_data(make_image_folder(tmp_path))  # 12 images
    module = tiny_classifier()
    seen = spy_patched(module)
    cb = DSMCallback(delay=1, r=2)
    with pytest.warns(UserWarning, match=r"12 images.*cannot show.*0.97.*at 90% confidence.*129"):
        out = trainer(callbacks=[cb]).validate(module, datamodule=data, verbose=False)[0]
    assert seen and not any(seen)
    assert cb.guard is not None and cb.guard.config is None and out["dsm/guard_flops_ratio"] == 1.0


def test_guard_returns_dense_when_no_schedule_agrees():
    model = tiny_vit()
    x = images(batch=16, seed=5)
    with torch.no_grad():
        unreachable = -model(x)  # "dense" predictions no forward pass makes: every candidate fails
    result = quality_guard(model, x, unreachable, DSMConfig(delay=1), 0.5)
    assert result.config is None and result.agreement == 1.0
    assert all(t["agreement"] < 0.5 for t in result.trials)
    assert "running dense" in result.summary()
    tested = quality_guard(model, x, unreachable, DSMConfig(delay=1), 0.5, confidence=0.9)
    assert tested.config is None and all(t["stopped"] and t["images"] < 16 for t in tested.trials)
    assert "cannot pass" in tested.summary(), "a candidate stops once its misses rule out a pass"


def test_callback_guard_dense_fallback_runs_dense_and_logs_it(tmp_path, monkeypatch):
    from dsm_lightning import guard as guard_module
    from dsm_lightning.guard import GuardResult

    def no_schedule(model, images, dense, config, target, **kwargs):
        return GuardResult(None, 1.0, target, images.shape[0], [])

    monkeypatch.setattr(guard_module, "quality_guard", no_schedule)
    data = tiny_data(make_image_folder(tmp_path, per_class=8))
    module = tiny_classifier()
    seen = spy_patched(module)
    cb = DSMCallback(delay=1, r=2, min_agreement=0.99, guard_images=8)
    out = trainer(callbacks=[cb]).validate(module, datamodule=data, verbose=False)[0]
    assert seen and not any(seen), "nothing met the target: the whole stage runs dense"
    assert out["dsm/guard_flops_ratio"] == 1.0 and "dsm/images_per_sec" not in out


def test_guard_settings_validated():
    with pytest.raises(ValueError, match="min_agreement"):
        DSMCallback(min_agreement=1.5)
    with pytest.raises(ValueError, match="guard_images"):
        DSMCallback(guard_images=0)
    cb = DSMCallback(delay=3, min_agreement=0.9, guard_images=64)
    assert cb.min_agreement == 0.9 and cb.guard_images == 64 and cb.config == DSMConfig(delay=3)


def test_guard_on_a_backbone_measures_token_cosine(tmp_path, capsys):
    """A ViT without a classifier head (a backbone under a dense head) is guarded by the mean per-token cosine
    similarity of its outputs with dense; a target no schedule meets keeps it dense."""
    from lightning.pytorch import LightningModule

    class Backbone(LightningModule):
        def __init__(self):
            super().__init__()
            self.vit = tiny_vit(num_classes=0, global_pool="")  # returns its tokens [B, T, C]

        def validation_step(self, batch, batch_idx):
            return self.vit(batch["image"]).sum()

    data = tiny_data(make_image_folder(tmp_path, per_class=4), img_size=32)
    loose = DSMCallback(delay=1, r=6, min_agreement=0.5, guard_images=4)
    out = trainer(callbacks=[loose]).validate(Backbone(), datamodule=data, verbose=False)[0]
    assert loose.guard is not None and loose.guard.measure == "cosine" and loose.guard.config is not None
    assert 0.5 <= out["dsm/guard_agreement"] <= 1.0 and out["dsm/guard_flops_ratio"] < 1.0
    strict = DSMCallback(delay=1, r=6, min_agreement=1.0, guard_images=4)
    out = trainer(callbacks=[strict]).validate(Backbone(), datamodule=data, verbose=False)[0]
    assert strict.guard.config is None and out["dsm/guard_flops_ratio"] == 1.0
    assert "mean token cosine similarity with dense" in capsys.readouterr().out


def test_token_cosine_is_per_image_and_exact_for_equal_outputs():
    from dsm_lightning.outputs import token_cosine

    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(token_cosine(x, x), torch.ones(3))
    y = x.clone()
    y[1] = -y[1]
    torch.testing.assert_close(token_cosine(y, x), torch.tensor([1.0, -1.0, 1.0]))
    assert token_cosine(x[:, 0], x[:, 0]).shape == (3,)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(8, 300), target=st.floats(0.5, 0.99), confidence=st.sampled_from([0.8, 0.9, 0.95]))
def test_binomial_pass_keeps_its_error_rate(n, target, confidence):
    """If the true agreement is exactly the target, the test passes with probability at most 1 - confidence (the
    exact binomial probability of every passing count, summed); and it never passes below the point estimate."""
    from math import comb

    from dsm_lightning.guard import binomial_pass

    passing = [k for k in range(n + 1) if binomial_pass(k, n, target, confidence)]
    assert all(binomial_pass(k, n, target, None) for k in passing), "stricter than the point estimate"
    if passing:
        assert passing == list(range(passing[0], n + 1)), "monotone in the count"
    risk = sum(comb(n, k) * target**k * (1 - target) ** (n - k) for k in passing)
    assert risk <= 1 - confidence + 1e-9


def test_guard_with_confidence_merges_no_more_than_the_point_estimate():
    model = tiny_vit()
    x = images(batch=32)
    with torch.no_grad():
        dense = model(x)
    plain = quality_guard(model, x, dense, DSMConfig(flops_target=0.55), 0.9)
    strict = quality_guard(model, x, dense, DSMConfig(flops_target=0.55), 0.9, confidence=0.9)
    assert strict.flops_ratio >= plain.flops_ratio and strict.confidence == 0.9
    assert "binomial test, 90% confidence" in strict.summary()


def test_quality_guard_statistics():
    from dsm_lightning.guard import evidence_below, images_needed, lower_bound

    assert images_needed(0.97, 0.9) == 129 and images_needed(0.99, 0.9) == 388
    assert binomial_pass_at(128, 129, 0.97) and not binomial_pass_at(127, 128, 0.97)
    for hits, n in [(250, 256), (90, 100), (5, 5)]:
        low = lower_bound(hits, n, 0.9)
        assert 0.0 < low < hits / n
        assert binomial_pass_at(hits, n, low + 1e-6) is False or low + 1e-6 >= hits / n
    # Ville: were the agreement exactly the target, the audit's evidence crosses 10 in at most ~10% of streams
    g = torch.Generator().manual_seed(0)
    crossed = 0
    for _ in range(400):
        stream = (torch.rand(400, generator=g) < 0.97).double().cumsum(0)
        crossed += any(evidence_below(float(h), i + 1, 0.97) >= 10 for i, h in enumerate(stream.tolist()) if i % 8 == 7)
    assert crossed / 400 <= 0.12
    assert evidence_below(70, 100, 0.97) > 10, "a gross shortfall is caught within 100 images"


def binomial_pass_at(hits, n, target):
    from dsm_lightning.guard import binomial_pass

    return binomial_pass(hits, n, target, 0.9)


def test_quality_guard_audit_steps_down_when_at_risk_and_not_otherwise():
    from dsm_lightning.guard import QualityGuard

    model, x = tiny_vit(depth=6), images(batch=16, seed=2)
    with torch.no_grad():
        dense = model(x)
    good, bad = QualityGuard(DSMConfig(delay=1), 0.5), QualityGuard(DSMConfig(delay=1), 0.5)
    for guard in (good, bad):
        result = guard.choose(model, x, dense, where="drawn at random from the whole stage", batch_size=8)
        assert result.config is not None and guard.schedule == result.config
    start = bad.current
    for _ in range(20):
        assert not good.observe(8, 8)
    stepped = [bad.observe(1, 8) for _ in range(20)]
    assert any(stepped) and (bad.current is None or bad.current > start)
    assert bad.steps and "stepped to" in bad.steps[0]
    m = bad.metrics()
    assert m["dsm/guard_steps_down"] >= 1 and m["dsm/audit_images"] % 8 == 0 and m["dsm/audit_agreement"] == 1 / 8
    assert bad.current is None and not bad.observe(0, 8), "dense: nothing left to audit"
    assert any("below the target" in line for line in bad.report())
    assert [bad.audits(i) for i in range(50)] == [QualityGuard(DSMConfig(), 0.5).audits(i) for i in range(50)]


def _split_easy_hard(vit, config, n_each, pool=2048, seed=0):
    """Random images on which ``config`` keeps (easy) or flips (hard) the dense model's top-1 prediction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(pool, 3, 32, 32, generator=g)
    with torch.no_grad():
        dense = vit(x).argmax(-1)
        apply_dsm(vit, config)
        merged = vit(x).argmax(-1)
        remove_dsm(vit)
    easy, hard = x[merged == dense], x[merged != dense]
    assert len(hard) >= n_each, f"only {len(hard)} hard images"
    return easy[:n_each], hard[:n_each]


def test_a_class_sorted_stage_whose_first_classes_are_easy_is_not_certified_on_them_alone(monkeypatch):
    """The first half of the stage (the easy classes) agrees under every schedule; the second half flips under the
    requested one. A guard on the stage's head would certify the requested schedule; sampled from the whole stage,
    the guard sees the hard half and the stage keeps its promise."""
    from torch.utils.data import DataLoader, TensorDataset

    from tests.test_sampling import Classifier

    vit = tiny_vit(num_classes=3, depth=4)
    with torch.no_grad():  # centre the logits: a random-init ViT's top-1 then depends on the image
        vit.head.bias.sub_(vit(torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(9))).mean(0))
    requested = DSMConfig(delay=0, r=6, protect=0.0)
    easy, hard = _split_easy_hard(vit, requested, 24)
    stage = torch.cat([easy, hard])
    loader = DataLoader(TensorDataset(stage, torch.arange(48)), batch_size=4)
    cb = DSMCallback(config=requested, min_agreement=0.9, guard_images=24, guard_confidence=None, compare_dense=True)
    out = trainer(callbacks=[cb]).validate(Classifier(vit), dataloaders=loader, verbose=False)[0]
    assert cb.guard is not None and cb.guard.config != requested, "the hard half was in the guard's sample"
    if cb.guard.config is not None:
        assert out["dsm/agreement_top1"] >= 0.9, "the stage kept the promise"
    # the same stage with the guard on its head (what a loader of unknown order gets): certified on the easy half
    monkeypatch.setattr("dsm_lightning.sampling.sample_stage_inputs", lambda *a, **k: None)
    head = DSMCallback(config=requested, min_agreement=0.9, guard_images=24, guard_confidence=None, guard_audit=0)
    trainer(callbacks=[head]).validate(Classifier(vit), dataloaders=loader, verbose=False)
    assert head.guard is not None and head.guard.config == requested and head.guard.agreement == 1.0
