"""torch.compile: fullgraph for every variant, bounded graph count, inductor equals eager, callback switch."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from dsm_lightning import DSMCallback, apply_dsm, is_patched
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


def test_callback_compile_switch(tmp_path):
    from tests.lightning_helpers import make_image_folder, tiny_classifier, tiny_data, trainer

    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()
    seen = []
    original = module.validation_step

    def spy(batch, batch_idx):
        seen.append("forward" in module.model.__dict__)
        return original(batch, batch_idx)

    module.validation_step = spy

    def run(compile_opt):
        callback = DSMCallback(delay=1, r=2, compare_dense=True, compile=compile_opt, min_agreement=None)
        return trainer(callbacks=[callback]).validate(module, datamodule=data, verbose=False)[0]

    eager = run(False)
    compiled = run({"backend": "eager", "fullgraph": True})
    assert any(seen) and not is_patched(module.model) and "forward" not in module.model.__dict__
    assert compiled["val/loss"] == pytest.approx(eager["val/loss"], rel=1e-5)
    assert compiled["dsm/agreement_top1"] == pytest.approx(eager["dsm/agreement_top1"])
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
