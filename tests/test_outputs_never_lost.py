"""No output is lost or overwritten silently: config files, predictions, maps, pictures, skipped lists."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from dsm_lightning.app.cli import cli as main
from dsm_lightning.app.writer import PredictionWriter
from examples.saliency.app import maps_cli
from tests.lightning_helpers import make_image_folder, read_csv, read_tsv
from tests.test_cli_writer import cli_args
from tests.test_saliency_example import args as maps_args
from tests.test_saliency_example import tiny_saliency


def test_cli_never_writes_or_replaces_config_yaml_in_the_working_directory(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    monkeypatch.chdir(tmp_path)
    own = "# my own file\ndatabase: prod\n"
    (tmp_path / "config.yaml").write_text(own)
    main(["predict", *cli_args(tmp_path, data, tmp_path / "p.csv")])
    assert (tmp_path / "config.yaml").read_text() == own
    user_config = tmp_path / "mine.yaml"
    user_config.write_text("# my settings\ndata:\n  batch_size: 2\n")
    main(["predict", f"--config={user_config}", *cli_args(tmp_path, data, tmp_path / "p.csv")])
    assert user_config.read_text() == "# my settings\ndata:\n  batch_size: 2\n", "the --config input is untouched"
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == ["config.yaml", "mine.yaml"]


def test_with_a_logger_the_config_goes_to_the_versioned_log_folder(tmp_path, monkeypatch):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    monkeypatch.chdir(tmp_path)
    args = [a for a in cli_args(tmp_path, data, tmp_path / "p.csv") if a != "--trainer.logger=false"]
    logger = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}"]
    main(["predict", *args, *logger])
    main(["predict", *args, *logger])
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("config.yaml"))
    assert saved == ["lightning_logs/version_0/config.yaml", "lightning_logs/version_1/config.yaml"]


def test_a_second_run_on_the_same_output_is_refused_at_start_while_the_first_runs(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    out = tmp_path / "preds.csv"
    lock = tmp_path / ".preds.csv.lock"
    lock.write_text(str(os.getpid()))  # a live process holds the output
    with pytest.raises(FileExistsError, match=r"another run \(process \d+\) is writing"):
        main(["predict", *cli_args(tmp_path, data, out)])
    assert not out.exists()
    lock.write_text("999999999")  # a run that was killed: its lock is taken over
    main(["predict", *cli_args(tmp_path, data, out)])
    assert len(read_csv(out)) == 2 and not lock.exists(), "written, lock released"


def test_part_and_temporary_names_differ_between_runs(tmp_path):
    a, b = PredictionWriter(str(tmp_path / "p.csv")), PredictionWriter(str(tmp_path / "p.csv"))
    assert a._part(0) != b._part(0) and a._tmp != b._tmp


def test_limit_predict_batches_zero_is_refused_and_leaves_the_old_file_alone(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    out = tmp_path / "preds.csv"
    out.write_text("STALE FROM LAST RUN\n")
    with pytest.raises(ValueError, match="limit_predict_batches=0 predicts no image"):
        main(["predict", *cli_args(tmp_path, data, out, "--trainer.limit_predict_batches=0")])


def test_skipped_list_escapes_tabs_and_newlines_in_names(tmp_path):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=2)
    for name in ("bad\ttab.png", "bad\nname.png"):
        (data / name).write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    with pytest.warns(UserWarning):
        main(["predict", *cli_args(tmp_path, data, out)])
    rows = read_tsv(tmp_path / "preds.skipped.tsv")
    assert sorted(os.path.basename(r["path"]) for r in rows) == sorted(["bad\nname.png", "bad\ttab.png"])
    assert all(len(r) == 2 and r["reason"] for r in rows)


@pytest.mark.parametrize(("flag", "match"), [("--model.top_k=0", "top_k=0"), ("--model.top_k=-3", "top_k=-3")])
def test_top_k_below_one_is_refused(tmp_path, flag, match):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=1)
    with pytest.raises(ValueError, match=match):
        main(["predict", *cli_args(tmp_path, data, tmp_path / "p.csv", flag)])


@pytest.mark.parametrize("value", ["0", "-0.5", "1.5"])
def test_crop_pct_outside_0_1_is_refused(tmp_path, value):
    data = make_image_folder(tmp_path / "imgs", labelled=False, classes=1, per_class=1)
    with pytest.raises(ValueError, match="crop_pct"):
        main(["predict", *cli_args(tmp_path, data, tmp_path / "p.csv", f"--data.crop_pct={value}")])


def _noise(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(path)


def test_maps_keep_extensions_folders_and_symlinked_folders_apart(tmp_path):
    checkpoint = tiny_saliency(tmp_path)
    images = tmp_path / "imgs"
    for i, name in enumerate(("cat.jpg", "cat.png", "dog.png", "a/0001.png", "b/0001.png")):
        _noise(images / name, i)
    _noise(tmp_path / "outside" / "dog.png", 9)
    (images / "linked").symlink_to(tmp_path / "outside")
    out = tmp_path / "maps"
    run = maps_cli(["predict", *maps_args(tmp_path, checkpoint, images, out)])
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    expected = ["a/0001.png.png", "b/0001.png.png", "cat.jpg.png", "cat.png.png", "dog.png.png", "linked/dog.png.png"]
    assert written == expected
    assert run.trainer.callbacks and next(c for c in run.trainer.callbacks if hasattr(c, "output_dir")).written == 6


def test_maps_from_val_dir_keep_class_folders(tmp_path):
    checkpoint = tiny_saliency(tmp_path)
    images = tmp_path / "val"
    _noise(images / "class0" / "0001.png", 0)
    _noise(images / "class1" / "0001.png", 1)
    out = tmp_path / "maps"
    args = [
        a if not a.startswith("--data.predict_dir") else f"--data.val_dir={images}"
        for a in maps_args(tmp_path, checkpoint, images, out)
    ]
    maps_cli(["predict", *args])
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "class0/0001.png.png",
        "class1/0001.png.png",
    ]


def test_vis_pictures_keep_sub_folders(tmp_path, capsys):
    from dsm_lightning.app.vis import main as vis_main

    for i, name in enumerate(("a/img.png", "b/img.png")):
        _noise(tmp_path / "imgs" / name, i)
    vis_main(
        [
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(tmp_path / "vis"),
            "--model-name",
            "vit_tiny_patch16_224",
            "--img-size",
            "32",
            "--num-classes",
            "3",
        ]
    )
    written = sorted(p.relative_to(tmp_path / "vis").as_posix() for p in (tmp_path / "vis").rglob("*.png"))
    assert written == ["a/img.png_dsm.png", "b/img.png_dsm.png"]
    assert len(set(capsys.readouterr().out.split())) == 2
