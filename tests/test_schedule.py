"""dsm_lightning/schedule.py: plan_tokens / split_windows / block_flops on random grids, windows and configs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_lightning import DSMConfig
from dsm_lightning.schedule import block_flops, plan_tokens, split_windows

WINDOWS = [1, 4, 9, (1, 2), (2, 1), (2, 3), (3, 2)]
DIMS = [(32, 64), (192, 768), (768, 3072)]


@st.composite
def plan_args(draw):
    """(depth, grid, num_prefix_tokens, config, dims) for plan_tokens: every config field in its valid range."""
    depth = draw(st.integers(1, 12))
    grid = (draw(st.integers(1, 16)), draw(st.integers(1, 16)))
    prefix = draw(st.integers(0, 4))
    delay = draw(st.integers(0, depth - 1))
    n = grid[0] * grid[1]
    per_block = st.lists(st.integers(0, max(1, n // 8)), min_size=depth, max_size=depth)
    r = draw(
        st.one_of(
            st.integers(0, max(1, n // 2)),
            st.sampled_from([0.05, 0.1, 0.25, 0.5]),
            st.none(),
            per_block.map(lambda rs: tuple([0] * delay + rs[delay:])),
        )
    )
    config = DSMConfig(
        delay=delay,
        r=r,
        windows=draw(st.sampled_from(WINDOWS)),
        local_blocks=draw(st.integers(0, depth - delay)),
        prop_attn=draw(st.booleans()),
        flops_target=draw(st.floats(0.2, 1.0)),
        schedule=draw(st.sampled_from(["constant", "proportional"])),
    )
    return depth, grid, prefix, config, draw(st.sampled_from(DIMS))


def plan_or_none(args):
    """The plan, or None where plan_tokens refuses the combination (an r too large for this grid: test_errors)."""
    try:
        return plan_tokens(*args)
    except ValueError:
        return None


@settings(max_examples=120)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 6), st.integers(1, 6))
def test_split_windows_tiles_the_grid_exactly(height, width, rows, cols):
    small = rows > height or cols > width or (height // rows) * (width // cols) < 2
    if small:
        with pytest.raises(ValueError, match="windows="):
            split_windows((height, width), (rows, cols))
        return
    groups = split_windows((height, width), (rows, cols))
    boxes = [box for group in groups for box in group]
    assert len(boxes) == rows * cols
    covered = [[0] * width for _ in range(height)]
    for r0, r1, c0, c1 in boxes:
        assert 0 <= r0 < r1 <= height and 0 <= c0 < c1 <= width
        for row in range(r0, r1):
            for col in range(c0, c1):
                covered[row][col] += 1
    assert all(count == 1 for line in covered for count in line), "windows are disjoint and cover the grid"
    shapes = [{(r1 - r0, c1 - c0) for r0, r1, c0, c1 in group} for group in groups]
    assert all(len(s) == 1 for s in shapes), "one shape per group"
    assert len({next(iter(s)) for s in shapes}) == len(groups), "one group per shape"
    heights, widths = [r1 - r0 for r0, r1, _, _ in boxes], [c1 - c0 for _, _, c0, c1 in boxes]
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1, "sides differ by one patch at most"
    assert min(h * w for h, w in zip(heights, widths)) >= 2, "every window can merge"


@settings(max_examples=100)
@given(plan_args())
def test_plan_token_counts_chain_and_never_grow(args):
    depth, grid, prefix, config, _dims = args
    plan = plan_or_none(args)
    if plan is None:
        return
    assert plan.depth == depth and plan.grid == grid and plan.num_prefix_tokens == prefix
    n = grid[0] * grid[1]
    merged_before = False
    for i, b in enumerate(plan.blocks):
        assert b.index == i and b.tokens_in == n, "each block starts from the previous block's tokens"
        assert 1 <= b.tokens_out <= b.tokens_in and 2 * b.tokens_out >= b.tokens_in, "a block at most halves"
        assert b.r == b.tokens_in - b.tokens_out and b.merges == (b.r > 0)
        assert (b.mode == "dense") == (b.r == 0)
        if i < config.delay:
            assert b.mode == "dense", "the delay's blocks stay dense"
        if b.mode == "local":
            assert config.delay <= i < config.delay + config.local_blocks and config.num_windows > 1
            assert sum(g.count * g.tokens_in for g in b.groups) == b.tokens_in
            assert sum(g.count * g.tokens_out for g in b.groups) == b.tokens_out
            assert all(g.tokens_in >= g.tokens_out >= 1 and g.r == g.tokens_in - g.tokens_out for g in b.groups)
        if b.mode == "global":
            assert i >= config.delay + (config.local_blocks if config.num_windows > 1 else 0), "local phase first"
        assert b.size_bias == (merged_before and config.prop_attn), "unequal sizes only after a merge"
        merged_before = merged_before or b.merges
        n = b.tokens_out
    assert plan.tokens_out == n
    for row, b in zip(plan.rows(), plan.blocks):
        assert row["tokens_in"] == b.tokens_in + prefix and row["tokens_out"] == b.tokens_out + prefix, "prefix kept"


@settings(max_examples=100)
@given(plan_args())
def test_first_local_block_merges_inside_the_split_windows(args):
    _depth, grid, _prefix, config, _dims = args
    plan = plan_or_none(args)
    if plan is None:
        return
    local = [b for b in plan.blocks if b.mode == "local"]
    if local:
        windows = split_windows(grid, config.window_grid)
        assert tuple(g.boxes for g in local[0].groups) == windows
        for g in local[0].groups:
            assert all((r1 - r0) * (c1 - c0) == g.tokens_in for r0, r1, c0, c1 in g.boxes)
        for before, after in zip(local, local[1:]):
            assert [g.tokens_out for g in before.groups] == [g.tokens_in for g in after.groups]


@settings(max_examples=100)
@given(plan_args())
def test_r0_and_a_full_flops_budget_plan_the_dense_model(args):
    depth, grid, prefix, config, dims = args
    n = grid[0] * grid[1]
    for dense_config in (config.replace(r=0), config.replace(r=None, flops_target=1.0)):
        plan = plan_or_none((depth, grid, prefix, dense_config, dims))
        if plan is None:  # only windows that do not fit the grid refuse a plan that merges nothing
            assert dense_config.local_blocks and dense_config.num_windows > 1
            with pytest.raises(ValueError, match="windows="):
                split_windows(grid, dense_config.window_grid)
            continue
        assert all(b.tokens_in == b.tokens_out == n and b.mode == "dense" for b in plan.blocks)
        assert plan.flops_ratio(*dims) == pytest.approx(1.0, rel=1e-12)


@settings(max_examples=120)
@given(
    st.integers(0, 600),
    st.integers(0, 600),
    st.integers(0, 50),
    st.integers(0, 50),
    st.integers(1, 1024),
    st.integers(1, 4096),
)
def test_block_flops_grow_with_the_token_counts(attn, mlp, more_attn, more_mlp, dim, hidden):
    base = block_flops(attn, mlp, dim, hidden)
    assert base >= 0
    assert block_flops(attn + more_attn, mlp, dim, hidden) >= base
    assert block_flops(attn, mlp + more_mlp, dim, hidden) >= base
    assert (block_flops(attn + more_attn, mlp + more_mlp, dim, hidden) > base) == (more_attn + more_mlp > 0)


@settings(max_examples=100)
@given(plan_args())
def test_the_flops_ratio_is_the_planned_blocks_over_the_dense_ones(args):
    depth, grid, prefix, _config, dims = args
    plan = plan_or_none(args)
    if plan is None:
        return
    p, n = prefix, grid[0] * grid[1]
    per_block = [block_flops(b.tokens_in + p, b.tokens_out + p, *dims) for b in plan.blocks]
    assert plan.block_flops(*dims) == per_block, "attention on the tokens entering, MLP on those leaving"
    dense = depth * block_flops(n + p, n + p, *dims)
    assert plan.flops_ratio(*dims) == pytest.approx(math.fsum(per_block) / dense, rel=1e-12)
    assert plan.flops_ratio(*dims) <= 1.0 + 1e-12
    assert (plan.flops_ratio(*dims) < 1.0) == any(b.merges for b in plan.blocks)
    assert plan.table(*dims).splitlines()[-1].endswith(f"{plan.flops_ratio(*dims):.3f}x dense")


@settings(max_examples=100)
@given(plan_args())
def test_a_flops_target_picks_the_plan_of_the_r_it_reports(args):
    depth, grid, prefix, config, dims = args
    config = config.replace(r=None)
    plan = plan_or_none((depth, grid, prefix, config, dims))
    if plan is None:
        return
    explicit = plan_tokens(depth, grid, prefix, config.replace(r=plan.r or 0), dims)
    assert explicit.blocks == plan.blocks, f"r=None resolved to r={plan.r}"
    if plan.flops_ratio(*dims) <= config.flops_target and plan.r:
        # the smallest r of the family that meets the budget: one step less misses it
        less = plan.r - 1 if isinstance(plan.r, int) else plan.r - 1 / 256
        smaller = plan_or_none((depth, grid, prefix, config.replace(r=less if less > 0 else 0), dims))
        assert smaller is not None and smaller.flops(*dims) > config.flops_target * plan_tokens(
            depth, grid, prefix, config.replace(r=0), dims
        ).flops(*dims)


def test_a_models_plan_table_shows_the_gflops_column_and_the_dense_ratio_the_readme_promises():
    from dsm_lightning import apply_dsm, token_plan
    from tests.conftest import tiny_vit

    table = token_plan(apply_dsm(tiny_vit(), r=4)).table()
    assert "GFLOPs" in table.splitlines()[0] and table.splitlines()[-1].endswith("x dense")
