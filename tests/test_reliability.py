"""Regression tests for failures found by adversarial testing (issue 12, section 3)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from dsm_lightning import DSMConfig, apply_dsm, get_config, is_patched, remove_dsm, trace_tokens
from tests.conftest import images, tiny_vit


@pytest.mark.parametrize("how", ["pickle", "torch.save", "deepcopy"])
def test_patched_model_round_trips_whole(how):
    model = tiny_vit().eval()
    apply_dsm(model, delay=1, r=3)
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    elif how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)  # a whole module is code, not weights: trusted files only
    else:
        loaded = copy.deepcopy(model)
    assert is_patched(loaded) and get_config(loaded) == get_config(model)
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    remove_dsm(loaded)
    assert type(loaded) is type(tiny_vit()) and loaded.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sizes_stay_exact_and_outputs_track_fp32_in_half_precision(dtype):
    import timm

    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        img_size=384,
        patch_size=8,
        depth=4,
        embed_dim=64,
        num_heads=2,
        num_classes=0,
        global_pool="avg",
    ).eval()  # a 48x48 grid: 2304 patches
    apply_dsm(model, DSMConfig(delay=1, r=0.3))
    x = torch.randn(1, 3, 384, 384)
    with torch.no_grad():
        half = copy.deepcopy(model).to(dtype)
        trace = trace_tokens(half, x.to(dtype))
        ref, out = model(x), half(x.to(dtype)).float()
        dense, dense_half = remove_dsm(copy.deepcopy(model))(x), remove_dsm(half)(x.to(dtype)).float()
    sizes = trace.state.size[:, 1:]
    assert sizes.dtype == torch.float32 and float(sizes.sum()) == 48 * 48, "every patch counted exactly once"
    assert trace.tokens.dtype == dtype
    # pooled features: merging in half precision adds little to the error half precision has anyway
    merged_err, dense_err = (out - ref).abs().max().item(), (dense_half - dense).abs().max().item()
    assert merged_err <= 2 * dense_err + 0.01 * ref.abs().max().item(), (merged_err, dense_err)


def test_silent_coercions_are_refused():
    for kwargs in [dict(windows=(1.5, 2)), dict(windows="22"), dict(flops_target=True), dict(windows=(2, 2, 2))]:
        with pytest.raises(ValueError, match=r"windows|flops_target"):
            DSMConfig(**kwargs)


def test_two_callbacks_for_two_vits_on_one_trainer(tmp_path):
    from lightning.pytorch import LightningModule

    from dsm_lightning import DSMCallback
    from tests.lightning_helpers import make_image_folder, tiny_classifier, tiny_data, trainer

    class StudentTeacher(LightningModule):
        def __init__(self):
            super().__init__()
            self.classifier = tiny_classifier()
            self.student, self.teacher = self.classifier.model, tiny_classifier().model
            self.seen = []

        def data_config(self):
            return self.classifier.data_config()

        def validation_step(self, batch, batch_idx):
            self.seen.append((is_patched(self.student), is_patched(self.teacher)))
            self.student(batch["image"]), self.teacher(batch["image"])

    module = StudentTeacher()
    callbacks = [
        DSMCallback(delay=1, r=2, model_attr="student", min_agreement=None),
        DSMCallback(delay=1, r=1, model_attr="teacher", min_agreement=None),
    ]
    trainer(callbacks=callbacks).validate(module, datamodule=tiny_data(make_image_folder(tmp_path)), verbose=False)
    assert module.seen and all(s == (True, True) for s in module.seen)
    assert not is_patched(module.student) and not is_patched(module.teacher)


def test_callback_puts_back_a_patch_the_user_applied(tmp_path):
    from dsm_lightning import DSMCallback
    from tests.lightning_helpers import make_image_folder, tiny_classifier, tiny_data, trainer

    module = tiny_classifier()
    mine = DSMConfig(delay=2, r=1)
    apply_dsm(module.model, mine)
    configs = []
    original = module.validation_step

    def spy(batch, batch_idx):
        configs.append(get_config(module.model))
        return original(batch, batch_idx)

    module.validation_step = spy
    trainer(callbacks=[DSMCallback(delay=1, r=2, min_agreement=None)]).validate(
        module, datamodule=tiny_data(make_image_folder(tmp_path)), verbose=False
    )
    assert configs and all(c == DSMConfig(delay=1, r=2) for c in configs), "the callback's config while it runs"
    assert get_config(module.model) == mine, "the user's own patch is back afterwards"


def test_calibrate_refuses_bad_targets_labels_and_nan_images():
    from dsm_lightning import calibrate

    model = tiny_vit()
    x = images(batch=8, seed=1)
    with pytest.raises(ValueError, match="target=0: the budget is a fraction"):
        calibrate(model, [x], target=0, verbose=False)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 7\)"):
        calibrate(model, [(x, torch.full((8,), 99))], metric="accuracy", verbose=False)
    with pytest.raises(ValueError, match=r"non-finite outputs .* image\(s\) \[3\]"):
        calibrate(model, [x.clone().index_fill_(0, torch.tensor([3]), float("nan"))], verbose=False)
    assert not is_patched(model), "the model is left as it was"


def test_checkpoint_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    from dsm_lightning.app.module import load_checkpoint

    torch.save({"a": 1, "b": 2}, tmp_path / "ints.pt")
    with pytest.raises(ValueError, match=r"ints.pt is not a state_dict of tensors"):
        load_checkpoint(tiny_vit(), str(tmp_path / "ints.pt"))
    save_file(tiny_vit().state_dict(), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*w.safetensors as safetensors.*truncated"):
        load_checkpoint(tiny_vit(), str(tmp_path / "w.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match=r"cannot load .*junk.pt with torch.load"):
        load_checkpoint(tiny_vit(), str(tmp_path / "junk.pt"))


def test_default_config_runs_a_dynamic_size_model_on_a_tiny_grid():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", dynamic_img_size=True, depth=4).eval()
    apply_dsm(model)  # defaults: no local phase, so a 2x2 grid needs no windows
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_shallow_copy_of_a_patched_model_can_be_unpatched_or_repatched_without_touching_the_original():
    model = apply_dsm(tiny_vit(), delay=1, r=3)
    x = images(batch=2)
    with torch.no_grad():
        expected = model(x)
        shallow = remove_dsm(copy.copy(model))
        assert is_patched(model) and not is_patched(shallow)
        assert torch.equal(model(x), expected), "the original still runs merged"
        assert torch.equal(shallow(x), tiny_vit()(x)), "the copy runs dense"
        assert shallow.blocks[0].attn.qkv.weight is model.blocks[0].attn.qkv.weight, "weights stay shared"
        again = apply_dsm(copy.copy(model), r=1)
        assert get_config(again).r == 1 and get_config(model).r == 3 and torch.equal(model(x), expected)
