"""LightningCLI, the prediction writer and bad-input errors (single process)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from dsm_lightning.cli import main
from dsm_lightning.data import ImageFiles
from dsm_lightning.module import ImageClassifier
from tests.lightning_helpers import TINY_KW, make_image_folder


def cli_args(tmp_path: Path, data_dir: Path, output: Path, *extra: str):
    return [
        "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--dsm.delay=1", "--dsm.r=2", "--dsm.min_agreement=null", f"--writer.output={output}",
        "--model.model_name=vit_tiny_patch16_224", "--model.num_classes=3", "--model.top_k=2",
        f"--model.model_kwargs={json.dumps(TINY_KW)}",
        f"--data.predict_dir={data_dir}", "--data.batch_size=5", "--data.crop_pct=1.0",
        f"--trainer.default_root_dir={tmp_path}", *extra,
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_cli_predict_writes_every_image_once(tmp_path, suffix):
    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    out = tmp_path / f"preds{suffix}"
    main(["predict", *cli_args(tmp_path, data, out)])
    if suffix == ".csv":
        rows = list(csv.DictReader(open(out)))
        paths = [r["path"] for r in rows]
        assert {"top1_class", "top1_score", "top2_class", "target"} <= set(rows[0])
    else:
        rows = [json.loads(line) for line in open(out)]
        paths = [r["path"] for r in rows]
        assert all(len(r["classes"]) == 2 for r in rows)
    expected = sorted(str(p) for p in data.rglob("*.png"))
    assert sorted(paths) == expected and len(paths) == len(set(paths)) == 12
    assert not list(tmp_path.glob(".preds*")), "no part or temp files left"


def test_cli_validate_with_dsm(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    args = cli_args(tmp_path, data, tmp_path / "p.csv", f"--data.val_dir={data}")
    main(["validate", *args])


def test_unreadable_image_leaves_no_output(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False)
    (data / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds.csv"
    with pytest.raises(RuntimeError, match="cannot read image .*broken.png.*remove or replace"):
        main(["predict", *cli_args(tmp_path, data, out)])
    assert not out.exists()
    assert not list(tmp_path.glob(".preds*"))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFiles(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFiles(str(tmp_path / "empty"))
    from dsm_lightning.data import ImageFolderDataModule

    with pytest.raises(FileNotFoundError, match="data.val_dir"):
        ImageFolderDataModule(val_dir=str(tmp_path / "nope"))


def test_checkpoint_loading_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    module = ImageClassifier("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_KW)
    sd = {k: v.contiguous() for k, v in module.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = ImageClassifier("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_KW,
                                 checkpoint_path=str(tmp_path / name))
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match="does not match.*shape mismatches: head.weight.*num_classes"):
        ImageClassifier("vit_tiny_patch16_224", num_classes=5, model_kwargs=TINY_KW,
                        checkpoint_path=str(tmp_path / "w.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageClassifier("vit_tiny_patch16_224", checkpoint_path=str(tmp_path / "missing.pt"))


def test_non_vit_model_in_cli(tmp_path):
    from dsm_lightning import UnsupportedModelError

    data = make_image_folder(tmp_path / "imgs")
    args = cli_args(tmp_path, data, tmp_path / "p.csv")
    args = [a for a in args if not a.startswith(("--model.model_kwargs", "--model.model_name"))]
    with pytest.raises(UnsupportedModelError, match="no supported ViT"):
        main(["predict", *args, "--model.model_name=resnet18"])
    assert not (tmp_path / "p.csv").exists()
