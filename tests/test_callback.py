"""dsm_lightning/callback.py: DSMCallback merges only in evaluation stages, restores everything, logs the trade-off."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import seed_everything

from dsm_lightning import DSMCallback, DSMConfig, UnsupportedModelError, apply_dsm, get_config, is_patched
from tests.lightning_helpers import make_image_folder, spy_patched, tiny_classifier, tiny_data, trainer


def test_patched_in_validation_restored_after(tmp_path):
    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()
    seen = spy_patched(module)
    cb = DSMCallback(delay=1, r=2, local_blocks=1, compare_dense=True, min_agreement=None)
    out = trainer(callbacks=[cb]).validate(module, datamodule=data, verbose=False)[0]
    assert seen and all(seen), "validation runs merged"
    assert not is_patched(module.model), "restored after validation"
    for key in (
        "dsm/images_per_sec",
        "dsm/gflops_per_image",
        "dsm/agreement_top1",
        "dsm/dense_images_per_sec",
        "dsm/speedup",
        "dsm/flops_reduction",
    ):
        assert key in out, key
    assert out["dsm/flops_reduction"] > 1.0
    assert 0.0 <= out["dsm/agreement_top1"] <= 1.0
    assert out["val/top1"] >= 0.0


def test_dsm_changes_eval_but_not_the_module(tmp_path):
    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()
    dense = trainer().validate(module, datamodule=data, verbose=False)[0]
    merged = trainer(callbacks=[DSMCallback(delay=1, r=4, local_blocks=0, min_agreement=None)]).validate(
        module, datamodule=data, verbose=False
    )[0]
    again = trainer().validate(module, datamodule=data, verbose=False)[0]
    assert merged["val/loss"] != dense["val/loss"]
    assert again["val/loss"] == dense["val/loss"], "restoring leaves the dense model bit-identical"


def test_fit_weights_bit_identical_with_and_without_callback(tmp_path):
    data_root = make_image_folder(tmp_path)

    def fit(callbacks):
        seed_everything(0)
        module = tiny_classifier(lr=1e-2)
        trainer(callbacks=callbacks, max_epochs=2, num_sanity_val_steps=2, deterministic=True).fit(
            module, datamodule=tiny_data(data_root)
        )
        return module.state_dict()

    plain = fit([])
    with_dsm = fit([DSMCallback(delay=1, r=4)])
    assert plain.keys() == with_dsm.keys()
    assert all(torch.equal(plain[k], with_dsm[k]) for k in plain)


def test_restored_on_exception(tmp_path):
    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()

    def boom(batch, batch_idx):
        assert is_patched(module.model)
        raise RuntimeError("boom")

    module.validation_step = boom
    with pytest.raises(RuntimeError, match="boom"):
        trainer(callbacks=[DSMCallback(delay=1, r=2, min_agreement=None)]).validate(
            module, datamodule=data, verbose=False
        )
    assert not is_patched(module.model)


def test_module_without_vit_fails_at_setup(tmp_path):
    from lightning.pytorch.demos.boring_classes import BoringModel

    with pytest.raises(UnsupportedModelError, match="found no supported ViT"):
        trainer(callbacks=[DSMCallback()]).validate(BoringModel(), verbose=False)


def test_impossible_config_fails_at_setup(tmp_path):
    data = tiny_data(make_image_folder(tmp_path))
    with pytest.raises(ValueError, match="delay=9 must be < depth=4"):
        trainer(callbacks=[DSMCallback(delay=9)]).validate(tiny_classifier(), datamodule=data, verbose=False)


def test_explicit_attr_and_stage_selection(tmp_path):
    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()
    seen = spy_patched(module, "test_step")
    trainer(callbacks=[DSMCallback(delay=1, r=2, model_attr="model", stages=["validate"], min_agreement=None)]).test(
        module, datamodule=data, verbose=False
    )
    assert seen and not any(seen), "test stage not selected: dense"
    with pytest.raises(AttributeError, match="has no 'backbone'"):
        trainer(callbacks=[DSMCallback(model_attr="backbone")]).validate(module, datamodule=data, verbose=False)


def test_checkpoint_never_overrides_constructor_settings(tmp_path):
    assert DSMCallback(delay=4, schedule="constant").config == DSMConfig(delay=4, schedule="constant")
    data = tiny_data(make_image_folder(tmp_path))
    module = tiny_classifier()
    t = trainer(
        callbacks=[DSMCallback(delay=1, r=2, min_agreement=None)],
        max_epochs=1,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path / "run"),
    )
    t.fit(module, datamodule=data)
    ckpt_path = tmp_path / "m.ckpt"
    t.save_checkpoint(ckpt_path)
    ckpt = torch.load(ckpt_path, weights_only=False)
    assert set(ckpt["state_dict"]) == set(tiny_classifier().state_dict()), "nothing of DSM in the weights"
    assert not any("DSMCallback" in k for k in ckpt.get("callbacks", {})), "no settings in the checkpoint"
    mine = DSMCallback(delay=2, r=1, min_agreement=None)
    trainer(callbacks=[mine]).validate(module, datamodule=data, ckpt_path=str(ckpt_path), verbose=False)
    assert mine.config == DSMConfig(delay=2, r=1), "the user's constructor arguments stand"


def test_config_and_fields_are_exclusive():
    with pytest.raises(ValueError, match="either config"):
        DSMCallback(delay=2, config=DSMConfig(r=4))
    with pytest.raises(ValueError, match="stages"):
        DSMCallback(stages=["fit"])
    assert DSMCallback(stages="validate").stages == ("validate",), "one stage name is accepted as a string"


def test_callback_on_torchvision_vit(tmp_path):
    """The callback finds and patches a torchvision ViT like a timm one."""
    from dsm_lightning.app.module import ImageClassifier

    data = tiny_data(make_image_folder(tmp_path))
    module = ImageClassifier(
        "torchvision:VisionTransformer",
        num_classes=3,
        top_k=2,
        model_kwargs=dict(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64),
    )
    seen = spy_patched(module)
    out = trainer(callbacks=[DSMCallback(delay=1, r=2, compare_dense=True, min_agreement=None)]).validate(
        module, datamodule=data, verbose=False
    )[0]
    assert seen and all(seen) and not is_patched(module.model)
    assert out["dsm/flops_reduction"] > 1.0 and 0.0 <= out["dsm/agreement_top1"] <= 1.0


def test_the_config_is_one_object_and_fields_by_name_are_a_shorthand():
    from dsm_lightning import DSMConfig

    assert DSMCallback(delay=4).config == DSMConfig(delay=4) == DSMCallback(DSMConfig(delay=4)).config
    assert DSMCallback(r=[0, 2, 2, 2]).config.r == (0, 2, 2, 2)
    with pytest.raises(TypeError, match="unexpected argument 'delya'; did you mean 'delay'"):
        DSMCallback(delya=4)
    with pytest.raises(ValueError, match="either config= or the DSMConfig fields"):
        DSMCallback(DSMConfig(delay=2), r=3)


def test_command_line_shows_every_config_field_once_and_takes_the_shorthand(capsys):
    from dsm_lightning.app.cli import cli, config_shorthand

    assert config_shorthand(["--dsm.delay=4", "--dsm.r", "8", "--dsm.min_agreement=0.9", "--dsm.config=a.yaml"]) == [
        "--dsm.config.delay=4",
        "--dsm.config.r",
        "8",
        "--dsm.min_agreement=0.9",
        "--dsm.config=a.yaml",
    ]
    with pytest.raises(SystemExit):
        cli(["validate", "--model.model_name=vit_tiny_patch16_224", "--dsm.delay=3", "--print_config"])
    import yaml

    printed = yaml.safe_load(capsys.readouterr().out)["dsm"]
    assert printed["config"]["delay"] == 3 and set(printed["config"]) >= {"r", "flops_target", "protect", "matching"}
    assert "delay" not in printed, "no mirror of the config's fields on the callback"


def test_two_callbacks_for_two_vits_on_one_trainer(tmp_path):
    from lightning.pytorch import LightningModule

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
