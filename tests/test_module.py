"""dsm_lightning/app/module.py: a checkpoint's side-car preprocessing reaches the DataModule; load errors name it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dsm_lightning.app.data import ImageFolderDataModule
from dsm_lightning.app.module import ImageClassifier, load_checkpoint
from tests.conftest import tiny_vit
from tests.lightning_helpers import TINY_KW, make_image_folder, trainer


def _checkpoint(tmp_path, **sidecar):
    model = ImageClassifier("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_KW).model
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = {"timm_name": "vit_tiny_patch16_224", "create_kwargs": {**TINY_KW, "num_classes": 3}, **sidecar}
    weights.with_suffix(".json").write_text(json.dumps(meta))
    return str(weights)


def _resize_interpolation(dm, split="val"):
    resize = next(t for t in dm.datasets[split].transform.transforms if type(t).__name__ == "Resize")
    return resize.interpolation.value


def test_the_trainer_snippet_preprocesses_as_the_sidecar_says_unless_told_otherwise(tmp_path):
    from dsm_lightning import DSMCallback

    data = make_image_folder(tmp_path / "val", classes=3, per_class=2)
    ckpt = _checkpoint(tmp_path, preprocess="PIL -> RGB -> Resize(224, bilinear) -> ToTensor -> Normalize(...)")
    model = ImageClassifier(checkpoint_path=ckpt)
    assert model.data_config()["interpolation"] == "bilinear" and model.data_config()["crop_pct"] == 1.0
    dm = ImageFolderDataModule(val_dir=str(data), batch_size=3)
    trainer(callbacks=[DSMCallback(min_agreement=None)]).validate(model, datamodule=dm, verbose=False)
    assert _resize_interpolation(dm) == "bilinear", "timm's default for the model would be bicubic"
    told = ImageFolderDataModule(val_dir=str(data), batch_size=3, interpolation="nearest")
    trainer(callbacks=[DSMCallback(min_agreement=None)]).validate(model, datamodule=told, verbose=False)
    assert _resize_interpolation(told) == "nearest"


def test_structured_sidecar_preprocessing_wins_over_the_free_text(tmp_path):
    ckpt = _checkpoint(
        tmp_path,
        preprocess="Resize(256, bilinear) -> CenterCrop(224)",
        interpolation="bicubic",
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
    )
    cfg = ImageClassifier(checkpoint_path=ckpt).data_config()
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == pytest.approx(224 / 256)
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.25, 0.25, 0.25)


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        ({"interpolation": "evil"}, "'interpolation' must be one of"),
        ({"crop_pct": 0}, r"'crop_pct' must be a fraction in \(0, 1\]"),
        ({"std": [0, 1, 1]}, "'std' must be 3 finite numbers > 0"),
        ({"mean": "imagenet"}, "'mean' must be 3 finite numbers"),
    ],
)
def test_bad_sidecar_preprocessing_is_refused_naming_the_file(tmp_path, sidecar, match):
    with pytest.raises(ValueError, match=r"w\.json: " + match):
        ImageClassifier(checkpoint_path=_checkpoint(tmp_path, **sidecar))


def test_checkpoint_errors_name_the_file(tmp_path):
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
