"""LightningCLI, the prediction writer and bad-input errors (single process)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsm_lightning.app.cli import cli as main
from dsm_lightning.app.data import ImageFiles
from dsm_lightning.app.module import ImageClassifier
from tests.lightning_helpers import TINY_KW, make_image_folder, read_csv, read_tsv


def cli_args(tmp_path: Path, data_dir: Path, output: Path, *extra: str):
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--dsm.delay=1",
        "--dsm.r=2",
        "--dsm.min_agreement=null",
        f"--writer.output={output}",
        "--model.model_name=vit_tiny_patch16_224",
        "--model.num_classes=3",
        "--model.top_k=2",
        f"--model.model_kwargs={json.dumps(TINY_KW)}",
        f"--data.predict_dir={data_dir}",
        "--data.batch_size=5",
        "--data.crop_pct=1.0",
        f"--trainer.default_root_dir={tmp_path}",
        *extra,
    ]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_cli_predict_writes_every_image_once(tmp_path, suffix):
    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    out = tmp_path / f"preds{suffix}"
    main(["predict", *cli_args(tmp_path, data, out)])
    if suffix == ".csv":
        rows = read_csv(out)
        paths = [r["path"] for r in rows]
        assert {"top1_class", "top1_score", "top2_class", "target"} <= set(rows[0])
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        paths = [r["path"] for r in rows]
        assert all(len(r["classes"]) == 2 for r in rows)
    expected = sorted(str(p) for p in data.rglob("*.png"))
    assert sorted(paths) == expected and len(paths) == len(set(paths)) == 12
    assert not list(tmp_path.glob(".preds*")), "no part or temp files left"


def test_an_existing_output_is_refused_at_start_unless_overwrite(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    out = tmp_path / "preds.csv"
    out.write_text("an earlier run's predictions\n")
    with pytest.raises(FileExistsError, match=r"--writer.overwrite=true to replace"):
        main(["predict", *cli_args(tmp_path, data, out)])
    assert out.read_text() == "an earlier run's predictions\n"
    main(["predict", *cli_args(tmp_path, data, out, "--writer.overwrite=true")])
    assert len(read_csv(out)) == 2
    assert "replacing the file that was there" in capsys.readouterr().out


def test_an_output_that_appears_during_the_run_is_left_alone(tmp_path, capsys):
    from lightning.pytorch import Callback

    from dsm_lightning.app.data import ImageFolderDataModule
    from dsm_lightning.app.writer import PredictionWriter
    from tests.lightning_helpers import tiny_classifier, trainer

    class Intruder(Callback):  # another program writes the output while the run goes
        def on_predict_batch_end(self, *args, **kwargs):
            if not out.exists():
                out.write_text("someone else's file\n")

    data = make_image_folder(tmp_path / "imgs", classes=1, per_class=2)
    out = tmp_path / "preds.csv"
    datamodule = ImageFolderDataModule(predict_dir=str(data), batch_size=1, crop_pct=1.0, img_size=32)
    run = trainer(callbacks=[PredictionWriter(str(out)), Intruder()], default_root_dir=tmp_path)
    run.predict(tiny_classifier(), datamodule=datamodule, return_predictions=False)
    assert out.read_text() == "someone else's file\n"
    kept = list(tmp_path.glob("preds.*.csv"))
    assert len(kept) == 1 and len(read_csv(kept[0])) == 2
    assert "appeared while the run went and was left alone" in capsys.readouterr().out


def test_cli_validate_with_dsm(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    args = cli_args(tmp_path, data, tmp_path / "p.csv", f"--data.val_dir={data}")
    main(["validate", *args])


def test_unreadable_image_stops_on_request_and_leaves_no_output(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False)
    (data / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds.csv"
    with pytest.raises(RuntimeError, match=r"cannot read image .*broken.png.*remove or replace.*bad_images=skip"):
        main(["predict", *cli_args(tmp_path, data, out, "--data.bad_images=stop")])
    assert not out.exists()


def test_predict_skips_unreadable_images_by_default_and_lists_them(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", labelled=False)  # 12 images, batches of 5
    for name in ("a_broken.png", "b_broken.jpg", "c_truncated.png"):
        (data / name).write_bytes(b"not an image")
    good = next(iter(sorted(data.glob("*.png"))))
    (data / "d_truncated.png").write_bytes(good.read_bytes()[:40])  # a real header, cut short
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning, match="skipped .*broken"):
        main(["predict", *cli_args(tmp_path, data, out)])
    rows = read_csv(out)
    assert len(rows) == 12 and not any("broken" in r["path"] or "truncated" in r["path"] for r in rows)
    listed = read_tsv(tmp_path / "preds.csv.skipped.tsv")
    assert sorted(Path(row["path"]).name for row in listed) == [
        "a_broken.png",
        "b_broken.jpg",
        "c_truncated.png",
        "d_truncated.png",
    ]
    assert all(len(row) == 2 and row["reason"] for row in listed), "each with its reason"
    assert "4 files skipped" in capsys.readouterr().out


def test_batch_of_only_unreadable_images_is_skipped_whole(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, per_class=1)  # 3 images
    for i in range(6):
        (data / f"0{i}_bad.png").write_bytes(b"")  # sorted first: the first batch of 5 is all bad
    out = tmp_path / "preds.jsonl"
    with pytest.warns(UserWarning):
        main(["predict", *cli_args(tmp_path, data, out)])
    assert len(out.read_text().splitlines()) == 3
    assert len(read_tsv(tmp_path / "preds.jsonl.skipped.tsv")) == 6


def test_validate_stops_on_unreadable_image_by_default(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    (data / "class0" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(RuntimeError, match=r"broken.png.*bad_images=skip"):
        main(["validate", *cli_args(tmp_path, data, tmp_path / "p.csv", f"--data.val_dir={data}")])


def test_symlink_loops_list_each_image_once_without_hanging(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, per_class=1)
    (data / "sub").mkdir()
    (data / "sub" / "up").symlink_to(data, target_is_directory=True)
    (data / "loop1").symlink_to(data, target_is_directory=True)
    (data / "sub" / "loop2").symlink_to(data / "sub", target_is_directory=True)
    files = ImageFiles(str(data), labelled=False)
    assert len(files) == 3


def test_output_that_is_a_directory_is_refused_before_inference(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False)
    (tmp_path / "out.csv").mkdir()  # a directory named like a file
    with pytest.raises(IsADirectoryError, match="is a directory; pass a file name"):
        main(["predict", *cli_args(tmp_path, data, tmp_path / "out.csv")])

    assert not list(tmp_path.glob(".preds*"))


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFiles(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFiles(str(tmp_path / "empty"))
    from dsm_lightning.app.data import ImageFolderDataModule

    with pytest.raises(FileNotFoundError, match=r"data.val_dir"):
        ImageFolderDataModule(val_dir=str(tmp_path / "nope"))


def test_checkpoint_loading_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    module = ImageClassifier("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_KW)
    sd = {k: v.contiguous() for k, v in module.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = ImageClassifier(
            "vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_KW, checkpoint_path=str(tmp_path / name)
        )
        assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in sd.items())
    with pytest.raises(ValueError, match=r"does not match.*shape mismatches: head.weight.*num_classes"):
        ImageClassifier(
            "vit_tiny_patch16_224", num_classes=5, model_kwargs=TINY_KW, checkpoint_path=str(tmp_path / "w.pt")
        )
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


def test_config_paths_resolve_against_the_config_and_flags_against_the_cwd(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "project" / "imgs", labelled=False, per_class=1)
    make_image_folder(tmp_path / "elsewhere" / "other", labelled=False, per_class=2)
    config = tmp_path / "project" / "conf" / "run.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  predict_dir: ../imgs\n")
    monkeypatch.chdir(tmp_path / "elsewhere")
    base = [a for a in cli_args(tmp_path, Path("unused"), tmp_path / "a.csv") if "predict_dir" not in a]
    main(["predict", "--config", str(config), *base])
    assert len(read_csv(tmp_path / "a.csv")) == 3
    main(["predict", "--config", str(config), *base, "--data.predict_dir=other", f"--writer.output={tmp_path}/b.csv"])
    assert len(read_csv(tmp_path / "b.csv")) == 6, "a flag after the config is cwd-relative"


def run_console(*args: str, env_extra=None):
    import os
    import subprocess
    import sys

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "dsm_lightning", *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_console_user_error_is_one_line_with_the_fix_and_exit_1(tmp_path):
    proc = run_console("predict", "--data.predict_dir", str(tmp_path / "missing"))
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dsm-lightning: error:")]
    assert len(lines) == 1 and "FileNotFoundError: data.predict_dir=" in lines[0]
    assert "pass an existing image folder" in lines[0] and "Traceback" not in proc.stderr
    assert "DSM_LIGHTNING_TRACEBACK=1" in proc.stderr.splitlines()[-1]
    verbose = run_console(
        "predict", "--data.predict_dir", str(tmp_path / "missing"), env_extra={"DSM_LIGHTNING_TRACEBACK": "1"}
    )
    assert verbose.returncode != 0 and "Traceback (most recent call last)" in verbose.stderr
