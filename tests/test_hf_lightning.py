"""Hugging Face models through Lightning: the callback in a user's LightningModule (keyword ``pixel_values=`` calls,
``ImageClassifierOutput``), ``ImageClassifier(model_name="hf:<folder>")`` and the CLI's predict."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import LightningModule

from dsm_lightning import DSMCallback, is_patched
from dsm_lightning.app.cli import cli as main
from dsm_lightning.app.module import ImageClassifier
from tests.conftest import tiny_hf
from tests.lightning_helpers import make_image_folder, read_csv, spy_patched, tiny_data, trainer

pytest.importorskip("transformers")


class HFModule(LightningModule):
    """What a user writes around a transformers classifier: keyword call, ``.logits``."""

    def __init__(self):
        super().__init__()
        self.model = tiny_hf("ViTForImageClassification", num_labels=3)
        self.seen = []

    def validation_step(self, batch, batch_idx):
        self.seen.append(is_patched(self.model))
        out = self.model(pixel_values=batch["image"])
        self.log("val/acc", (out.logits.argmax(-1) == batch["target"]).float().mean())


def test_callback_guard_and_metrics_with_a_transformers_model(tmp_path):
    data = tiny_data(make_image_folder(tmp_path, classes=3, per_class=4), img_size=32)
    module = HFModule()
    weights = {k: v.clone() for k, v in module.state_dict().items()}
    callback = DSMCallback(delay=1, r=4, compare_dense=True, min_agreement=0.01, guard_images=4)
    out = trainer(callbacks=[callback]).validate(module, datamodule=data, verbose=False)[0]
    assert callback.guard is not None and callback.guard.config is not None, "the guard saw the logits and chose"
    assert module.seen[0] is False and all(module.seen[1:]), "guard batch dense, the rest merged"
    assert out["dsm/flops_reduction"] > 1.0 and 0.0 <= out["dsm/agreement_top1"] <= 1.0
    assert not is_patched(module.model)
    assert all(torch.equal(v, weights[k]) for k, v in module.state_dict().items())


def test_guard_on_a_transformers_encoder_compares_its_tokens(tmp_path):
    """An encoder without a head (``ViTModel``): the guard reads ``last_hidden_state`` and measures token cosine."""

    class Backbone(HFModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_hf("ViTModel")

        def validation_step(self, batch, batch_idx):
            self.model(pixel_values=batch["image"])

    data = tiny_data(make_image_folder(tmp_path, classes=3, per_class=2), img_size=32)
    callback = DSMCallback(delay=1, r=4, min_agreement=0.5, guard_images=3)
    trainer(callbacks=[callback]).validate(Backbone(), datamodule=data, verbose=False)
    assert callback.guard is not None and callback.guard.measure == "cosine"
    assert callback.guard.config is not None and 0.5 <= callback.guard.agreement <= 1.0


def hf_folder(tmp_path, with_processor=True):
    model = tiny_hf("ViTForImageClassification", num_labels=3, id2label={0: "cat", 1: "dog", 2: "owl"})
    folder = tmp_path / "hf_vit"
    model.save_pretrained(folder)
    if with_processor:
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
            folder
        )
    return model, folder


def test_image_classifier_loads_a_local_transformers_folder(tmp_path):
    model, folder = hf_folder(tmp_path)
    module = ImageClassifier(model_name=f"hf:{folder}", top_k=2)
    assert module.class_names == ["cat", "dog", "owl"] and module.num_classes == 3
    cfg = module.data_config()
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(x), model(x).logits)
    data = tiny_data(make_image_folder(tmp_path / "imgs", classes=3, per_class=2))
    seen = spy_patched(module)
    trainer(callbacks=[DSMCallback(delay=1, r=4, min_agreement=None)]).validate(module, datamodule=data, verbose=False)
    assert seen and all(seen)
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        ImageClassifier(model_name=f"hf:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="num_labels=3"):
        ImageClassifier(model_name=f"hf:{folder}", num_classes=5)


def test_cli_predicts_with_a_transformers_folder(tmp_path):
    _, folder = hf_folder(tmp_path, with_processor=False)
    data = make_image_folder(tmp_path / "imgs", classes=2, per_class=3)
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match=r"preprocessor_config\.json not found"):
        main(
            [
                "predict",
                "--trainer.accelerator=cpu",
                "--trainer.devices=1",
                "--trainer.logger=false",
                "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--model.model_name=hf:{folder}",
                "--model.top_k=2",
                "--dsm.delay=1",
                "--dsm.r=4",
                "--dsm.min_agreement=null",
                f"--data.predict_dir={data}",
                "--data.batch_size=4",
                f"--writer.output={out}",
            ]
        )
    rows = read_csv(out)
    assert len(rows) == 6 and {r["top1_name"] for r in rows} <= {"cat", "dog", "owl"}
    json.dumps(rows)  # plain strings and numbers


def test_callback_guards_a_depth_model_through_its_backbone(tmp_path):
    """Depth Anything in a LightningModule: the callback finds its Dinov2Backbone, guards it on the feature maps
    (token cosine), merges, and restores it."""
    transformers = pytest.importorskip("transformers")

    class Depth(LightningModule):
        def __init__(self):
            super().__init__()
            backbone = transformers.Dinov2Config(
                hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28, patch_size=14,
                mlp_ratio=2, out_indices=[1, 2, 3, 4], reshape_hidden_states=False,
            )  # fmt: skip
            config = transformers.DepthAnythingConfig(
                backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                head_hidden_size=8, reassemble_hidden_size=32, patch_size=14,
            )  # fmt: skip
            torch.manual_seed(0)
            self.model = transformers.DepthAnythingForDepthEstimation(config).eval()

        def validation_step(self, batch, batch_idx):
            self.model(pixel_values=batch["image"]).predicted_depth.mean()

    data = tiny_data(make_image_folder(tmp_path, classes=2, per_class=3, size=56), img_size=56)
    module = Depth()
    callback = DSMCallback(delay=1, r=2, min_agreement=0.5, guard_images=3)
    trainer(callbacks=[callback]).validate(module, datamodule=data, verbose=False)
    assert type(callback._vit).__name__ == "Dinov2Backbone"
    assert callback.guard is not None and callback.guard.measure == "cosine" and callback.guard.config is not None
    assert not is_patched(module.model.backbone)
