"""What every RoPE family keeps under merging, checked once for all of them (timm ``Eva`` with two rope types, timm
``NaFlexVit``, Hugging Face DINOv3): the quality guard chooses on it and leaves it unpatched, compiled blocks equal
eager ones, the ONNX export runs in ONNX Runtime like PyTorch, and ``DSMCallback`` guards a stage and gives the
model back unchanged. Each family's own file tests what only it has (its rope types, layouts, refusals)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch
from torch import nn

from dsm_lightning import DSMCallback, DSMConfig, apply_dsm, compile_blocks, is_patched
from dsm_lightning.guard import quality_guard
from tests.conftest import images
from tests.rope_models import EVA_VARIANTS, NAFLEX_VARIANTS, tiny_dinov3, tiny_eva, tiny_naflex


class Family(NamedTuple):
    make: Callable[[], nn.Module]
    size: int  # image side in pixels
    r: int
    features: bool = False  # a backbone: the guard compares tokens (cosine), not top-1

    def out(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = model(x)
        return y.last_hidden_state if self.features else y


FAMILIES = {
    "eva-dinov3": Family(lambda: tiny_eva(**EVA_VARIANTS["dinov3"]), 16, 2),
    "eva-mixed": Family(lambda: tiny_eva(**EVA_VARIANTS["mixed"]), 16, 2),
    "naflex-rope_axial": Family(lambda: tiny_naflex(**NAFLEX_VARIANTS["rope_axial"]), 32, 4),
    "hf-dinov3": Family(tiny_dinov3, 32, 6, features=True),
}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def test_quality_guard_chooses_and_leaves_the_model_unpatched(family):
    model = family.make()
    x = images(4, (family.size, family.size))
    with torch.no_grad():
        dense = family.out(model, x)
    measure = "cosine" if family.features else "top1"
    result = quality_guard(model, x, dense, DSMConfig(delay=1, r=family.r), 0.25, measure=measure)
    assert result.trials and not is_patched(model)
    if family.features:
        assert result.config is not None


@pytest.mark.slow
def test_compile_blocks_matches_eager(family):
    model = apply_dsm(family.make(), delay=1, r=family.r)
    x = images(2, (family.size, family.size))
    with torch.no_grad():
        ref = family.out(model, x)
        compile_blocks(model, backend="eager")
        out = family.out(model, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_runs_in_onnx_runtime_like_pytorch(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from dsm_lightning.export import check_onnx, export_onnx

    model = apply_dsm(family.make(), DSMConfig(delay=1, r=family.r))
    path = export_onnx(model, tmp_path / "model.onnx", family.size, dynamic_batch=False)
    assert check_onnx(model, path, images(2, (family.size, family.size))) < 1e-4


def test_dsm_callback_guards_the_stage_and_gives_the_model_back(family, tmp_path):
    """The guard's batch runs dense, every later batch merged, and the model comes back unpatched and unchanged."""
    from lightning.pytorch import LightningModule

    from tests.lightning_helpers import make_image_folder, tiny_data, trainer

    class Module(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = family.make()
            self.seen = []

        def validation_step(self, batch, batch_idx):
            self.seen.append(is_patched(self.model))
            self.model(batch["image"])

    data = tiny_data(make_image_folder(tmp_path, classes=2, per_class=4), img_size=family.size)
    callback = DSMCallback(delay=1, r=family.r, min_agreement=0.01, guard_images=4)
    module = Module()
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer(callbacks=[callback]).validate(module, datamodule=data, verbose=False)
    assert callback.guard is not None and callback.guard.config is not None
    assert callback.guard.measure == ("cosine" if family.features else "top1")
    assert module.seen[0] is False and all(module.seen[1:]) and not is_patched(module.model)
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())
