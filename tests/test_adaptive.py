"""Adaptive merging (``DSMConfig.threshold``): per-image token counts with padding, against plain references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_lightning import (
    DSMConfig,
    adaptive_flops,
    apply_dsm,
    fit_thresholds,
    is_patched,
    remove_dsm,
    token_plan,
    trace_tokens,
)
from dsm_lightning.adaptive import BudgetKeeper, shift_thresholds
from dsm_lightning.merge import bipartite_soft_matching, bucket_tokens, merge_wavg, threshold_soft_matching
from tests.conftest import images, tiny_vit


@st.composite
def padded_batches(draw):
    """Token batches whose images hold different numbers of live tokens (padding rows behind them)."""
    batch = draw(st.integers(1, 4))
    n = draw(st.integers(2, 30))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    lengths = [draw(st.integers(2, n)) for _ in range(batch)]
    alive = torch.arange(n).expand(batch, -1) < torch.tensor(lengths).unsqueeze(1)
    size = torch.randint(1, 6, (batch, n, 1), generator=g).to(torch.float64) * alive.unsqueeze(-1)
    x = torch.randn(batch, n, 4, generator=g, dtype=torch.float64) * alive.unsqueeze(-1)
    metric = torch.randn(batch, n, 3, generator=g, dtype=torch.float64)
    metric[:, :, 0] = metric[:, :, 0].round()  # coarse values: ties on the threshold
    threshold = draw(st.sampled_from([-1.0, 0.0, 0.3, 0.7, 0.95, 2.0]))
    return x, size, metric, alive, threshold, draw(st.integers(0, 2)), draw(st.booleans())


@given(padded_batches(), st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_each_image_merges_as_the_fixed_matching_with_its_own_count(data, buckets):
    """An image merges every proposal at or above the threshold: exactly the fixed matching with r = that count,
    its tokens first in the same order, whatever the other images of the batch and the number of buckets."""
    x, size, metric, alive, threshold, num_prefix, tome = data
    prefix = torch.randn(x.shape[0], num_prefix, x.shape[-1], dtype=x.dtype)
    xp = torch.cat([prefix, x], dim=1)
    sp = torch.cat([torch.ones(x.shape[0], num_prefix, 1, dtype=x.dtype), size], dim=1)
    parity, sort = (num_prefix % 2, num_prefix > 0) if tome else (0, False)
    m = threshold_soft_matching(metric, threshold, alive, buckets, None, num_prefix, parity, sort)
    out, out_size = merge_wavg(m.merge, xp, sp, padded=True)
    n = x.shape[1]
    assert out.shape[1] - num_prefix in {bucket_tokens(c, n, buckets) for c in range(n + 1)}
    torch.testing.assert_close(out_size.sum(1), sp.sum(1))  # sizes conserve the token count
    torch.testing.assert_close((out * out_size).sum(1), (xp * sp).sum(1))  # weighted sums are conserved
    for i in range(x.shape[0]):
        length = int(alive[i].sum())
        unit = metric[i : i + 1, :length] / metric[i : i + 1, :length].norm(dim=-1, keepdim=True)
        scores = unit[:, parity % 2 :: 2] @ unit[:, 1 - parity % 2 :: 2].transpose(1, 2)
        r = int((scores.amax(-1) >= threshold).sum()) if scores.shape[-1] else 0
        ref = bipartite_soft_matching(metric[i : i + 1, :length], r, None, num_prefix, parity, sort)
        live = slice(0, num_prefix + length)
        ref_x, ref_size = merge_wavg(ref.merge, xp[i : i + 1, live], sp[i : i + 1, live])
        kept = num_prefix + length - r
        torch.testing.assert_close(out[i : i + 1, :kept], ref_x)
        torch.testing.assert_close(out_size[i : i + 1, :kept], ref_size)
        assert (out_size[i, kept:] == 0).all() and (out[i, kept:] == 0).all()  # padding only behind
        torch.testing.assert_close(m.new_index[i : i + 1, :length], ref.new_index)
        torch.testing.assert_close(out[i, :num_prefix], prefix[i])  # prefix tokens never merge


def test_bucket_levels():
    assert [bucket_tokens(c, 256, 16) for c in (0, 1, 16, 17, 255, 256)] == [0, 16, 16, 32, 256, 256]
    assert {bucket_tokens(c, 196, 8) for c in range(197)} == {0, 25, 50, 75, 100, 125, 150, 175, 196}


def test_batch_results_equal_per_image_results_and_prefix_is_untouched():
    """A prediction does not depend on the images sharing its batch (padding only ever sits behind)."""
    model = apply_dsm(tiny_vit(), threshold=0.2, protect=0.2)
    x = images(batch=5)
    x[1] *= 0.05  # a flat image merges far more than the others
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(5)])
        trace = trace_tokens(model, x)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    live = (trace.state.size[..., 0] > 0).sum(1)
    assert live.unique().numel() > 1, "images keep different numbers of tokens"
    torch.testing.assert_close(trace.state.size.sum(1).squeeze(-1), torch.full((5,), 65.0))


def test_threshold_none_is_the_fixed_model_and_above_one_merges_nothing():
    model = tiny_vit()
    x = images(batch=3)
    with torch.no_grad():
        dense = model(x)
        apply_dsm(model, DSMConfig(r=4, threshold=2.0))
        trace = trace_tokens(model, x)
        assert trace.tokens.shape[1] == 65 and (trace.state.size == 1).all()
        torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-5)
        apply_dsm(model, DSMConfig(r=4))
        fixed = model(x)
        remove_dsm(model)
        assert torch.equal(model(x), dense)
    assert fixed.shape == dense.shape


def test_fit_thresholds_matches_the_fixed_plans_average_tokens():
    model = tiny_vit()
    x = images(batch=16)
    x[:8] *= 0.1
    fixed = DSMConfig(flops_target=0.6)
    fitted = fit_thresholds(model, x, fixed)
    assert not is_patched(model) and len(fitted.threshold) == 6
    assert fitted.replace(threshold=None) == fixed
    apply_dsm(model, fitted)
    flops = adaptive_flops(model, x)
    planned = token_plan(model, fixed).flops_ratio(32, 128)
    assert abs(float(flops.per_image.mean()) - planned) < 0.03  # average FLOPs follow the fixed plan
    assert float(flops.per_image.std()) > 0.01  # while images differ
    # the batch runs regrouped by token count: it spends about what its images need (bucket rounding on top), far
    # less than its longest image times the batch size
    mean = float(flops.per_image.mean())
    assert mean - 1e-9 <= flops.spent <= 1.1 * mean < float(flops.per_image.max())


def test_adaptive_flops_returns_the_tokens_the_model_outputs_from():
    model = tiny_vit()
    x = images(batch=6)
    x[:3] *= 0.1
    apply_dsm(model, fit_thresholds(model, x, DSMConfig(flops_target=0.6)))
    counted = adaptive_flops(model, x)
    with torch.no_grad():
        out = model.forward_head(model.norm(counted.tokens))
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)  # one pass: FLOPs and outputs


def test_fit_thresholds_leaves_a_patched_model_as_it_was():
    model = apply_dsm(tiny_vit(), r=3)
    before = model.state_dict()
    fit_thresholds(model, images(batch=4), DSMConfig(flops_target=0.7))
    assert token_plan(model).config == DSMConfig(r=3)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "bad, fix",
    [
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": -1.5}, "threshold"),
        ({"threshold": 0.5, "prop_attn": False}, "prop_attn=True"),
        ({"buckets": 0}, "buckets"),
    ],
)
def test_bad_threshold_settings_name_the_fix(bad, fix):
    with pytest.raises(ValueError, match=fix):
        DSMConfig(**bad)


def test_per_block_threshold_length_is_checked():
    with pytest.raises(ValueError, match="one entry per block"):
        apply_dsm(tiny_vit(), threshold=(0.5, 0.5))
        trace_tokens(tiny_vit(), images())


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_a_stage_compiles_a_bounded_number_of_graphs():
    """A stage at one input size: batches of 8 whose token counts differ, then a last batch of 3."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    from dsm_lightning import compile_blocks

    torch._dynamo.reset()
    model = apply_dsm(tiny_vit(), threshold=0.3)
    batches = [images(batch=8, seed=s) for s in range(6)] + [images(batch=3, seed=9)]
    for i, x in enumerate(batches):
        x[: i % 4] *= 0.05  # a different mix of flat and busy images in every batch
    with torch.no_grad():
        eager = [model(x) for x in batches]
        counter = CompileCounter()
        compile_blocks(model, backend=counter)
        for x, expected in zip(batches, eager):
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 8
        with torch.compiler.set_stance("fail_on_recompile"):
            model(images(batch=8, seed=42) * 0.3)
    torch._dynamo.reset()


def test_callback_fits_thresholds_on_the_guards_images_and_logs_the_average_flops_spent(tmp_path):
    from dsm_lightning import DSMCallback
    from tests.lightning_helpers import make_image_folder, tiny_classifier, tiny_data, trainer

    data = tiny_data(make_image_folder(tmp_path, per_class=6))
    module = tiny_classifier()
    callback = DSMCallback(adaptive=True, guard_images=4, min_agreement=0.25, guard_confidence=None)
    trainer(callbacks=[callback]).validate(module, datamodule=data)
    chosen = callback.guard.config
    assert chosen is not None and isinstance(chosen.threshold, tuple) and len(chosen.threshold) == 4
    assert callback.guard.chosen["config"] == chosen.to_dict()
    metrics = callback.metrics
    assert 1.0 < metrics["dsm/flops_reduction"] < 4.0
    assert metrics["dsm/gflops_per_image"] < metrics["dsm/dense_gflops_per_image"]
    assert "padding included" in callback.summary("validate")
    assert not is_patched(module.model)


def test_callback_adaptive_needs_the_guard_or_fitted_thresholds():
    from dsm_lightning import DSMCallback

    with pytest.raises(ValueError, match="min_agreement"):
        DSMCallback(adaptive=True, min_agreement=None)
    DSMCallback(adaptive=True, min_agreement=None, config=DSMConfig(threshold=0.9))


def test_export_refuses_adaptive_merging_with_the_fix(tmp_path):
    pytest.importorskip("onnxscript")
    from dsm_lightning.export import ExportError, export_onnx

    model = apply_dsm(tiny_vit(), threshold=0.5)
    with pytest.raises(ExportError, match="threshold=None"):
        export_onnx(model, tmp_path / "m.onnx", image_size=32)


def test_adaptive_protection_without_a_class_token_names_the_fix():
    from dsm_lightning.errors import ConfigError

    model = apply_dsm(tiny_vit(class_token=False, global_pool="avg"), threshold=0.5)
    with pytest.raises(ConfigError, match="protect=0"):
        model(images())
    apply_dsm(model, threshold=0.5, protect=0.0)
    batched = model(images(batch=3))
    single = torch.cat([model(images(batch=3)[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["torchvision", "ViTForImageClassification-eager", "Dinov2Model-sdpa"])
def test_other_families_give_batch_independent_results(family):
    from tests.conftest import tiny_hf, tiny_torchvision

    if family == "torchvision":
        model = tiny_torchvision()
    else:
        name, attn = family.split("-")
        model = tiny_hf(name, attn=attn)
    apply_dsm(model, threshold=0.3)
    x = images(batch=3)
    x[0] *= 0.05
    with torch.no_grad():
        out = model(x)
        out = out if isinstance(out, torch.Tensor) else out[0]
        single = []
        for i in range(3):
            y = model(x[i : i + 1])
            single.append(y if isinstance(y, torch.Tensor) else y[0])
    torch.testing.assert_close(out, torch.cat(single), rtol=1e-4, atol=1e-5)


def test_fit_thresholds_on_no_images_or_non_finite_images_says_so_in_one_line():
    from dsm_lightning import DSMConfig, fit_thresholds, is_patched
    from tests.conftest import images, tiny_vit

    model = tiny_vit()
    x = images(batch=4)
    with pytest.raises(ValueError, match=r"needs a batch of images \[B, 3, H, W\] with B >= 1.*got \(0, 3, 32, 32\)"):
        fit_thresholds(model, x[:0], DSMConfig(flops_target=0.6))
    with pytest.raises(ValueError, match=r"needs a batch of images.*got \(3, 32, 32\)"):
        fit_thresholds(model, x[0], DSMConfig(flops_target=0.6))
    with pytest.raises(ValueError, match=r"needs float images.*got torch\.uint8"):
        fit_thresholds(model, (x * 50).clamp(0, 255).to(torch.uint8), DSMConfig(flops_target=0.6))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"non-finite pixels \(nan/inf\) in image\(s\) \[2\]"):
            fit_thresholds(model, x.clone().index_fill_(0, torch.tensor([2]), bad), DSMConfig(flops_target=0.6))
    assert not is_patched(model)


def test_the_plan_carries_the_thresholds_and_its_table_shows_them():
    model = tiny_vit()
    fitted = fit_thresholds(model, images(batch=16), DSMConfig(flops_target=0.6))
    plan = token_plan(model, fitted)
    fixed = token_plan(model, fitted.replace(threshold=None))
    assert plan.adaptive and not fixed.adaptive
    for block, plain in zip(plan.blocks, fixed.blocks):
        assert (block.tokens_in, block.tokens_out, block.mode) == (plain.tokens_in, plain.tokens_out, plain.mode)
        assert block.threshold == (fitted.threshold[block.index] if block.mode == "global" else None)
    assert "threshold" in plan.table() and "adaptive" in plan.table() and "threshold" not in fixed.table()
    fitting = fixed.fitting()
    assert [b.fit for b in fitting.blocks] == [b.mode == "global" for b in fixed.blocks]


def test_fitting_reaches_the_merge_through_the_plan_not_module_state():
    import ast
    import inspect

    from dsm_lightning import merge

    tree = ast.parse(inspect.getsource(merge))
    assert not any(isinstance(node, ast.Global) for node in ast.walk(tree))
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    }
    assert "ContextVar" not in calls
    assigned = [n for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))]
    module_state = [n for n in assigned if isinstance(n.value, ast.Call)]
    assert not module_state  # module-level values are constants, never objects a forward could write to


def _stage(keeper: BudgetKeeper, spend, batches: int, batch: int = 32) -> float:
    """A simulated stage: ``spend(offset, i)`` is what batch i spends at the keeper's offset; returns the mean."""
    total = 0.0
    for i in range(batches):
        fraction = spend(keeper.offset, i)
        total += fraction
        keeper.observe(fraction, batch)
    return total / batches


@pytest.mark.parametrize("drift", [0.028, -0.05, 0.15, 0.0])
@pytest.mark.parametrize("true_slope", [0.12, 0.24, 0.5])
def test_the_budget_keeper_holds_a_drifting_stage_within_2_percent(drift, true_slope):
    target = 0.55
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(200, generator=g) * 0.02).tolist()  # batch to batch, as image content varies

    def spend(offset: float, i: int) -> float:
        return target * (1 + drift) + true_slope * offset + noise[i]

    keeper = BudgetKeeper(DSMConfig(threshold=0.8), target)
    spent = _stage(keeper, spend, 200)
    assert abs(spent / target - 1) < 0.02
    assert abs(keeper.spent - spent) < 1e-9
    assert keeper.changes <= 8  # a handful of shifts (compiled blocks recompile rarely)
    if drift == 0.0:
        assert abs(keeper.offset) * true_slope < 0.04 * target  # what it chased was noise, and it stayed small
    assert "target" in keeper.report()


def test_shift_thresholds_moves_the_cosine_distance_on_a_log_scale_and_keeps_blocks_that_merge_nothing():
    config = DSMConfig(threshold=(2.0, 0.9999, 0.5, -0.9))
    up = shift_thresholds(config, math.log(2)).threshold  # distances halve: merges less
    assert up == pytest.approx((2.0, 0.99995, 0.75, 0.05))
    down = shift_thresholds(config, -math.log(2)).threshold  # distances double, never below -1
    assert down == pytest.approx((2.0, 0.9998, 0.0, -1.0))
    assert shift_thresholds(config, 0.0).threshold == pytest.approx(config.threshold)
    with pytest.raises(TypeError, match="adaptive"):
        shift_thresholds(DSMConfig(), 0.1)


def test_the_callback_keeps_an_adaptive_stage_on_budget_and_reports_it():
    """Thresholds fitted on flat (redundant) images, a stage of busy ones: as fitted it spends far more than its
    target; with the keeper (the default) the stage lands within 2% and the summary says so."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from dsm_lightning import DSMCallback
    from tests.lightning_helpers import tiny_classifier

    module = tiny_classifier()
    fixed = DSMConfig(flops_target=0.6)
    fitted = fit_thresholds(module.model, images(batch=64, seed=1) * 0.2 + images(batch=64, seed=2) * 0.02, fixed)
    x = torch.cat([images(batch=64, seed=s) for s in range(10, 22)])
    pairs = TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    data = DataLoader(
        pairs,
        batch_size=16,
        collate_fn=lambda b: {"image": torch.stack([i for i, _ in b]), "target": torch.stack([t for _, t in b])},
    )
    spent = {}
    for keep in (False, True):
        callback = DSMCallback(fitted, min_agreement=None, keep_budget=keep)
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[callback]).validate(
            module, data, verbose=False
        )
        spent[keep] = callback.metrics["dsm/block_flops_spent"] / callback.metrics["dsm/block_flops_target"]
        assert not is_patched(module.model)
    assert spent[False] > 1.05  # the drift is real
    assert abs(spent[True] - 1) < 0.02
    assert "Adaptive budget" in callback.summary("validate") and "shifted" in callback.summary("validate")
