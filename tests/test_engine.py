"""The block loop (``dsm_lightning.engine``): adaptive batches regrouped by token count against the padded batch."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_lightning import adaptive_flops, apply_dsm, engine, trace_tokens
from tests.conftest import images, tiny_vit


def _padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run adaptive batches whole, padded to their longest image (the loop before regrouping)."""
    monkeypatch.setattr(engine, "_partition", lambda levels, cost: [(0, len(levels))])


def _mixed_batch(batch: int = 9) -> torch.Tensor:
    x = images(batch=batch, seed=3)
    x[::3] *= 0.05  # flat images merge far more than busy ones
    x[1::3] *= 0.4
    return x


@pytest.mark.parametrize("protect", [0.0, 0.2])
def test_regrouped_batches_give_the_padded_batchs_outputs_and_token_counts(monkeypatch, protect):
    model = apply_dsm(tiny_vit(), threshold=0.8, protect=protect, buckets=8)
    x = _mixed_batch()
    with torch.no_grad():
        regrouped = model(x)
        trace = trace_tokens(model, x)
        spent = adaptive_flops(model, x)
        _padded(monkeypatch)
        padded = model(x)
        padded_trace = trace_tokens(model, x)
        padded_spent = adaptive_flops(model, x)
    torch.testing.assert_close(regrouped, padded, rtol=1e-5, atol=1e-5)
    live = (trace.state.size[..., 0] > 0).sum(1)
    assert live.unique().numel() > 2, "the batch holds images of several token counts"
    assert torch.equal(live, (padded_trace.state.size[..., 0] > 0).sum(1))
    assert trace.state.lengths == tuple(live.tolist())
    assert torch.equal(trace.state.pos, padded_trace.state.pos)
    torch.testing.assert_close(spent.per_image, padded_spent.per_image)
    assert spent.spent < padded_spent.spent  # the point of regrouping
    # what is left is bucket rounding (8 levels of 8 tokens here) and the runs _partition joins to save calls
    assert spent.spent <= 1.25 * float(spent.per_image.mean())


def test_a_regrouped_batch_equals_its_images_run_one_by_one():
    model = apply_dsm(tiny_vit(), threshold=0.8, buckets=8)
    x = _mixed_batch(7)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_hooks_see_the_whole_batch_in_input_order():
    model = apply_dsm(tiny_vit(), threshold=0.8, buckets=8)
    x = _mixed_batch()
    seen = []

    def look(index, tokens, state):
        seen.append((tokens.shape[0], tokens.shape[0] if state.size is None else state.size.shape[0]))

    with torch.no_grad():
        trace_tokens(model, x, look)
    assert seen and all(b == 9 and p == 9 for b, p in seen)


def _cost(levels, runs, call_cost):
    return sum((j - i) * levels[i] + call_cost for i, j in runs)


@given(st.lists(st.integers(1, 300), min_size=1, max_size=7), st.integers(0, 64))
@settings(max_examples=80, deadline=None)
def test_partition_is_the_cheapest_split_into_runs_of_two_or_more(levels, call_cost):
    levels = sorted(levels, reverse=True)
    runs = engine._partition(levels, call_cost)
    n = len(levels)
    assert runs[0][0] == 0 and runs[-1][1] == n and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    assert all(j - i >= (2 if n > 1 else 1) for i, j in runs)
    best = None
    for k in range(n):  # every split into contiguous runs of at least two (one image alone only in a batch of one)
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            split = list(zip(bounds, bounds[1:]))
            if all(j - i >= (2 if n > 1 else 1) for i, j in split):
                cost = _cost(levels, split, call_cost)
                best = cost if best is None else min(best, cost)
    assert _cost(levels, runs, call_cost) == best


@pytest.mark.parametrize(
    "setting, load, expected",
    [("auto", 100.0, 1), ("auto", 0.1, None), ("off", 100.0, None), ("3", 0.1, 3)],
)
def test_merged_blocks_run_on_one_thread_on_a_busy_cpu_and_give_the_threads_back(monkeypatch, setting, load, expected):
    monkeypatch.setenv("DSM_CPU_THREADS", setting)
    monkeypatch.setattr(engine.os, "getloadavg", lambda: (load, load, load))
    assert engine.busy_threads() == expected
    model = apply_dsm(tiny_vit(), r=4)
    x = images(batch=2)
    before = torch.get_num_threads()
    seen = []
    with torch.no_grad():
        out = trace_tokens(model, x, lambda i, tokens, state: seen.append(torch.get_num_threads())).tokens
        monkeypatch.setenv("DSM_CPU_THREADS", "off")
        reference = trace_tokens(model, x).tokens
    assert set(seen) == {before if expected is None else expected}
    assert torch.get_num_threads() == before
    torch.testing.assert_close(out, reference)


def test_a_bad_thread_setting_names_the_fix(monkeypatch):
    from dsm_lightning.errors import InputError

    monkeypatch.setenv("DSM_CPU_THREADS", "many")
    with pytest.raises(InputError, match="'auto', 'off' or a number"):
        engine.busy_threads()


def _host_reads(model, x, monkeypatch) -> int:
    """Values a forward reads back from tensors to the host (``.item()``, ``int()``, ``bool()``, ``.tolist()``)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads = [0]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                reads[0] += 1
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted(self):
        reads[0] += 1
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counted)
    with torch.no_grad(), Count():
        model(x)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    return reads[0]


def test_the_fixed_path_reads_nothing_back_and_adaptive_one_list_per_merge_of_a_sub_batch(monkeypatch):
    from dsm_lightning import get_adapter, token_plan

    x = _mixed_batch()
    fixed = apply_dsm(tiny_vit(), r=4)
    assert _host_reads(fixed, x, monkeypatch) == 0
    adaptive = apply_dsm(tiny_vit(), threshold=0.8, buckets=8)
    merging = [b.index for b in token_plan(adaptive).blocks if b.mode == "global" and b.merges]
    assert len(merging) > 1
    assert _host_reads(adaptive, x[:1], monkeypatch) == len(merging)  # the image's token count, once per merge
    calls = []
    blocks = get_adapter(adaptive).blocks(adaptive)
    handles = [blocks[i].register_forward_hook(lambda *a: calls.append(1)) for i in merging]
    reads = _host_reads(adaptive, x, monkeypatch)
    for h in handles:
        h.remove()
    assert reads == len(calls) > len(merging)  # each sub-batch reads its images' counts when it merges
