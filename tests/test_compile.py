"""torch.compile: fullgraph for every variant, bounded graph count, inductor equals eager, callback switch; regional
compilation (compile_blocks): graphs shared across blocks, hooks kept, reversible."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from dsm_lightning import (
    DSMCallback,
    apply_dsm,
    compile_blocks,
    is_patched,
    remove_dsm,
    token_plan,
    uncompile_blocks,
)
from tests.conftest import images, tiny_vit


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_every_variant(variant):
    name, model = variant
    apply_dsm(model, delay=1, r=4, local_blocks=2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5, msg=name)
    assert counter.frame_count == 1, f"{name}: one graph, no breaks"


@pytest.mark.slow
def test_graph_count_bounded_across_batches_and_resolutions():
    """One graph per resolution plus one when the batch dimension turns dynamic: <= 6 here."""
    model = apply_dsm(tiny_vit(dynamic_img_size=True, patch_size=8, img_size=64), delay=1, r=4, local_blocks=2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    resolutions = [(64, 64), (64, 72), (72, 72)]
    with torch.no_grad():
        for res in resolutions:
            for batch in (2, 5, 8, 13):
                x = images(batch=batch, size=res)
                torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        assert counter.frame_count <= 6
        assert counter.frame_count < torch._dynamo.config.recompile_limit
        with torch.compiler.set_stance("fail_on_recompile"):
            for res in resolutions:
                for batch in (3, 21):
                    compiled(images(batch=batch, size=res))


@pytest.mark.slow
def test_inductor_matches_eager():
    model = apply_dsm(tiny_vit(qk_norm=True, init_values=0.3, reg_tokens=2), delay=1, r=4, local_blocks=2)
    compiled = torch.compile(model, fullgraph=True)
    x = images(batch=4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_callback_compile_switch(tmp_path):
    from tests.lightning_helpers import make_image_folder, tiny_classifier, tiny_data, trainer

    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()
    seen = []
    original = module.validation_step

    def spy(batch, batch_idx):
        blocks = module.model.blocks
        seen.append(("forward" in module.model.__dict__, all("forward" in b.__dict__ for b in blocks)))
        return original(batch, batch_idx)

    module.validation_step = spy

    def run(compile_opt):
        seen.clear()
        callback = DSMCallback(delay=1, r=2, compare_dense=True, compile=compile_opt, min_agreement=None)
        metrics = trainer(callbacks=[callback]).validate(module, datamodule=data, verbose=False)[0]
        assert not is_patched(module.model) and "forward" not in module.model.__dict__
        assert not any("forward" in b.__dict__ for b in module.model.blocks)  # compiled forwards are gone after
        return metrics, list(seen)

    eager, seen_eager = run(False)
    compiled, seen_compiled = run({"backend": "eager", "fullgraph": True})
    regional, seen_regional = run("blocks")  # compile_blocks: inductor, dynamic token counts
    assert not any(any(s) for s in seen_eager)
    assert all(whole and not blocks for whole, blocks in seen_compiled)
    assert all(blocks and not whole for whole, blocks in seen_regional)
    for metrics in (compiled, regional):
        assert metrics["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-5)
        assert metrics["dsm/agreement_top1"] == pytest.approx(eager["dsm/agreement_top1"])
        assert metrics["dsm/flops_reduction"] == pytest.approx(eager["dsm/flops_reduction"])
    with pytest.raises(ValueError, match="compile must be"):
        DSMCallback(compile="yes")


@pytest.mark.parametrize(
    "name",
    ["ViTForImageClassification", "DeiTModel", "Dinov2WithRegistersModel", "CLIPVisionModel", "SiglipVisionModel"],
)
def test_fullgraph_transformers_models(name):
    """A patched transformers model compiles to one graph, no breaks, and matches eager."""
    from tests.conftest import tiny_hf

    model = apply_dsm(tiny_hf(name), delay=1, r=4, local_blocks=2)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = images()
    with torch.no_grad():
        out, ref = compiled(x), model(x)
    key = "logits" if getattr(ref, "logits", None) is not None else "last_hidden_state"
    torch.testing.assert_close(getattr(out, key), getattr(ref, key), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"{name}: one graph, no breaks"


# ---------------------------------------------------------------- regional compilation (compile_blocks)


def _graphs_and_outputs(model, inputs, **options):
    """Compile ``model``'s blocks with a counting backend; return (graph count, compiled outputs, eager outputs)."""
    with torch.no_grad():
        eager = [model(x) for x in inputs]
    counter = CompileCounter()
    compile_blocks(model, backend=counter, **options)
    with torch.no_grad():
        out = [model(x) for x in inputs]
    return counter.frame_count, out, eager


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, graphs",
    [
        ({}, 2),  # the first merging block (no size bias yet), then every later block whatever its token count
        # + the dense blocks, which run their original forward. An explicit r keeps every merge's sizes above 1:
        # Dynamo always specialises sizes 0 and 1 (one more graph where a block keeps a single unmerged token)
        ({"delay": 2, "r": 3}, 3),
        ({"r": 3, "metric": "keys", "protect": 0.0}, 2),  # ToMe: odd and even token counts alike
    ],
)
def test_compile_blocks_shares_graphs_across_blocks(overrides, graphs):
    """Every block runs the same code, so all blocks, batch sizes and input sizes share a fixed, small set of
    graphs."""
    model = apply_dsm(tiny_vit(dynamic_img_size=True), **{"flops_target": 0.5, **overrides})
    inputs = [images(batch=2), images(batch=3), images(batch=5, size=(40, 40)), images(batch=2, size=(32, 40))]
    count, out, eager = _graphs_and_outputs(model, inputs)
    assert count == graphs
    for o, e in zip(out, eager):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compile_blocks_graphs_are_kept_per_model():
    """Each model has its own graph cache: many models and configs in one process never reach Dynamo's recompile
    limit (with fullgraph=True that would be a hard error), and a model compiled again reuses its graphs."""
    counter = CompileCounter()
    x = images()
    models = [apply_dsm(tiny_vit(seed=i), r=2 + i % 3, protect=0.1 * (i % 2), delay=i % 2) for i in range(6)]
    for model in models:
        with torch.no_grad():
            ref = model(x)
            compile_blocks(model, backend=counter)
            torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert counter.frame_count > torch._dynamo.config.recompile_limit  # more graphs in all than one cache allows
    before = counter.frame_count
    for model in models:  # compiled again (as DSMCallback does at every stage start): graphs reused
        compile_blocks(model, backend=counter)
        with torch.no_grad():
            model(x)
    assert counter.frame_count == before


@pytest.mark.slow
def test_compile_blocks_local_phase_and_uneven_grid():
    """Local (windowed) merging on an uneven grid compiles per block too, and equals eager."""
    model = apply_dsm(tiny_vit(dynamic_img_size=True), delay=1, r=6, local_blocks=2, windows=4)
    count, out, eager = _graphs_and_outputs(model, [images(size=(36, 32)), images(batch=3, size=(36, 32))])
    assert count <= 6
    for o, e in zip(out, eager):
        torch.testing.assert_close(o, e, rtol=1e-5, atol=1e-5)


def test_compile_blocks_keeps_hooks_and_is_reversible():
    """Hooks stay eager and see merged token counts; uncompile/remove give back bit-identical models."""
    model = tiny_vit()
    x = images()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        dense = model(x)
    apply_dsm(model, r=4)
    with torch.no_grad():
        merged = model(x)
    seen = []
    handle = model.blocks[2].register_forward_hook(lambda mod, args, out: seen.append(out.shape[1]))
    compile_blocks(model, backend="eager")
    assert all("forward" in block.__dict__ for block in model.blocks)
    with torch.no_grad():
        model(x)
    assert seen == [token_plan(model).blocks[2].tokens_out + 1]  # + cls
    handle.remove()
    clone = copy.deepcopy(model)  # compiled forwards are run-time state: not copied or pickled
    assert is_patched(clone) and not any("forward" in block.__dict__ for block in clone.blocks)
    uncompile_blocks(model)
    assert not any("forward" in block.__dict__ for block in model.blocks) and is_patched(model)
    compile_blocks(model, backend="eager")
    apply_dsm(model, r=3)  # re-configuring keeps the compiled forwards (same patched class)
    assert all("forward" in block.__dict__ for block in model.blocks)
    remove_dsm(model)  # takes them away: they were traced through the patched class
    assert not any("forward" in block.__dict__ for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), dense)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    compile_blocks(model, backend="eager")  # compiled dense, then patched: the dense forwards are dropped
    apply_dsm(model, r=4)
    assert not any("forward" in block.__dict__ for block in model.blocks)
    with torch.no_grad():
        assert torch.equal(model(x), merged)


@pytest.mark.slow
def test_compile_blocks_inductor_matches_eager():
    model = apply_dsm(tiny_vit(depth=2), r=0.25)
    x = images(batch=3)
    with torch.no_grad():
        ref = model(x)
        compile_blocks(model)
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)


def test_compile_blocks_transformers_model():
    from tests.conftest import tiny_hf

    model = apply_dsm(tiny_hf("Dinov2WithRegistersModel"), delay=1, r=0.2)
    count, out, eager = _graphs_and_outputs(model, [images(batch=b) for b in (2, 3)])
    assert count == 3
    for o, e in zip(out, eager):
        torch.testing.assert_close(o.last_hidden_state, e.last_hidden_state, rtol=1e-5, atol=1e-5)
