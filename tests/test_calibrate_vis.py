"""dsm_lightning/app/vis.py (merge pictures), the Pareto harness and side-car checkpoints, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsm_lightning import apply_dsm, token_plan
from dsm_lightning.app.vis import merge_figure, render_tokens, token_maps
from tests.conftest import images, tiny_vit

ROOT = Path(__file__).resolve().parents[1]


def test_token_maps_and_render():
    model = apply_dsm(tiny_vit(), delay=1, r=6, local_blocks=2)
    maps, _grid = token_maps(model, images(batch=1)[0])
    plan = token_plan(model)
    assert len(np.unique(maps["final"])) == plan.tokens_out
    # after the local phase no token spans two 4x4 windows of the 8x8 grid
    local = maps["local"]
    for token in np.unique(local):
        rows, cols = np.nonzero(local == token)
        assert len({(r // 4, c // 4) for r, c in zip(rows, cols)}) == 1
    rgb = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    assert render_tokens(rgb, maps["final"]).size == (32, 32)
    fig = merge_figure(model, images(batch=1)[0], (0.5,) * 3, (0.5,) * 3)
    assert fig.size == (32 * 3 + 8, 32)


def tiny_model_argv() -> list:
    """The Pareto harness's model arguments for the tiny 3-class test ViT."""
    from tests.lightning_helpers import TINY_KW

    return ["--model-name", "vit_tiny_patch16_224", "--num-classes", "3", "--model-kwargs", json.dumps(TINY_KW)]


def test_pareto_harness_runs_and_resumes(tmp_path):
    from benchmarks import pareto
    from tests.lightning_helpers import make_image_folder

    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    calib = make_image_folder(tmp_path / "calib", classes=3, per_class=3, seed=1)
    photos = make_image_folder(tmp_path / "photos", classes=1, per_class=3, seed=2, labelled=False)
    out = tmp_path / "p"
    argv = [
        *tiny_model_argv(),
        "--val-dir",
        str(data),
        "--calib-dir",
        str(calib),
        "--calib-images",
        "8",
        "--limit",
        "12",
        "--photos",
        str(photos),
        "--targets",
        "0.7",
        "--batch",
        "4",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert pareto.main(argv) == 0
    first = json.loads(out.with_suffix(".json").read_text())["rows"]
    names = {r["schedule"] for r in first}
    assert {"dense", "tome@0.70", "default@0.70", "dsm-d2-keys@0.70", "calibrated@0.55"} <= names
    assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".csv").exists()
    dense = next(r for r in first if r["schedule"] == "dense")
    assert dense["agreement"] == 1.0 and all(r["img_per_s"] > 0 for r in first)
    assert dense["photo_cos_min"] == pytest.approx(1.0) and all(-1 <= r["photo_cos_min"] <= 1 for r in first)
    tome = next(r for r in first if r["schedule"] == "tome@0.70")
    assert tome["agree_vs_tome"] == 0.0 and "Budget `flops_target=0.7`" in out.with_suffix(".md").read_text()
    assert pareto.main(argv) == 0
    second = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["schedule"]: r["eval_s"] for r in second} == {r["schedule"]: r["eval_s"] for r in first}


def test_pareto_harness_with_a_datamodule(tmp_path):
    from benchmarks import pareto
    from tests.lightning_helpers import make_image_folder

    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=2)
    out = tmp_path / "dm"
    dm_args = {"val_dir": str(data), "batch_size": 4, "img_size": 32, "crop_pct": 1.0}
    argv = [
        *tiny_model_argv(),
        "--datamodule",
        "dsm_lightning.app.data.ImageFolderDataModule",
        "--datamodule-args",
        json.dumps(dm_args),
        "--limit",
        "6",
        "--targets",
        "0.7",
        "--batch",
        "3",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    assert pareto.main(argv) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert {r["schedule"] for r in rows} >= {"dense", "tome@0.70"}
    assert all(0.0 <= r["top1"] <= 1.0 for r in rows)


def test_fmnist_pools_are_disjoint_and_exclude_shared_images(tmp_path):
    import gzip

    from benchmarks.fmnist_pool import excluded_indices, load_pool, pool_indices

    n = 1300
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    idx_dir = tmp_path / "idx"
    idx_dir.mkdir()
    header = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (idx_dir / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + pixels.tobytes()))
    (idx_dir / "train-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress((2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    )
    shared = tmp_path / "shared"
    for split, ids in (("train", range(0, 200, 2)), ("val", range(1, 100, 2))):
        folder = shared / "fashion_mnist" / split / "0-t-shirt"
        folder.mkdir(parents=True)
        for i in ids:
            (folder / f"{i:05d}.png").write_bytes(b"")
    exclude = excluded_indices([shared / "fashion_mnist" / "train", shared / "fashion_mnist" / "val"])
    assert len(exclude) == 150
    dev, ev = pool_indices("dev", 1000, exclude, n), pool_indices("eval", 150, exclude, n)
    assert not set(dev) & set(ev) and not (set(dev) | set(ev)) & exclude
    assert pool_indices("eval", 100, exclude, n) == ev[:100], "a smaller pool is a prefix of a larger one"
    with pytest.raises(ValueError, match="holds"):
        pool_indices("eval", 500, exclude, n)
    x, y, idx = load_pool("eval", 5, lambda im: torch.tensor(np.asarray(im)), shared, idx_dir)
    assert idx == ev[:5] and x.shape == (5, 28, 28, 3)
    assert torch.equal(x[0, ..., 0], torch.as_tensor(pixels[idx[0]])) and y.tolist() == labels[idx].tolist()


def test_the_fresh_pool_is_disjoint_from_every_dev_and_eval_pool():
    from benchmarks.fmnist_pool import FRESH_START, pool_indices

    n, exclude = 14_000, set(range(0, 14_000, 7))
    fresh = pool_indices("fresh", 1000, exclude, n)
    largest_eval = pool_indices("eval", FRESH_START - 1000, exclude, n)
    assert not set(fresh) & (set(pool_indices("dev", 1000, exclude, n)) | set(largest_eval) | exclude)
    with pytest.raises(ValueError, match="holds"):  # an eval pool never grows into the fresh one
        pool_indices("eval", FRESH_START, exclude, n)


def write_checkpoint_with_sidecar(folder: Path, classes=("a", "b", "c")) -> Path:
    """A tiny timm ViT saved as safetensors with a side-car JSON that names the model (like the reference's)."""
    from safetensors.torch import save_file

    from dsm_lightning.app.module import build_model
    from tests.lightning_helpers import TINY_KW

    folder.mkdir(parents=True, exist_ok=True)
    model = build_model("vit_tiny_patch16_224", num_classes=len(classes), **TINY_KW)
    path = folder / "tiny.safetensors"
    save_file(model.state_dict(), str(path))
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "timm_name": "vit_tiny_patch16_224",
                "create_kwargs": {**TINY_KW, "num_classes": len(classes)},
                "classes": list(classes),
            }
        )
    )
    return path


def test_vis_command_takes_the_model_from_the_checkpoint_sidecar(tmp_path, capsys):
    from dsm_lightning.app.vis import main
    from tests.lightning_helpers import make_image_folder

    checkpoint = write_checkpoint_with_sidecar(tmp_path / "ckpt")
    imgs = make_image_folder(tmp_path / "imgs", labelled=False, per_class=1)
    main(
        [
            "--images",
            str(imgs),
            "--checkpoint",
            str(checkpoint),
            "--out",
            str(tmp_path / "vis"),
            "--delay",
            "1",
            "--local-blocks",
            "1",
            "--r",
            "0,2,2,2",
        ]
    )
    written = sorted((tmp_path / "vis").glob("*_dsm.png"))
    assert len(written) == 3 and capsys.readouterr().out.count("_dsm.png") == 3


def test_vis_user_errors_are_one_line(tmp_path, capsys):
    from dsm_lightning.app.vis import main, parse_r

    assert parse_r("12") == 12 and parse_r("0.1") == 0.1 and parse_r("0,0,8,8") == [0, 0, 8, 8]
    assert parse_r("none") is None
    from tests.lightning_helpers import make_image_folder

    checkpoint = write_checkpoint_with_sidecar(tmp_path / "ckpt")
    imgs = make_image_folder(tmp_path / "imgs", labelled=False, per_class=1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--images", str(imgs), "--checkpoint", str(checkpoint), "--r", "1,2"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "error: ValueError: a per-block r needs one entry per block" in err
    assert "Traceback" not in err


def test_classifier_reads_model_and_classes_from_sidecar_and_validates_it(tmp_path):
    from dsm_lightning.app.module import ImageClassifier

    checkpoint = write_checkpoint_with_sidecar(tmp_path / "ok")
    module = ImageClassifier(checkpoint_path=str(checkpoint))
    assert module.model_name == "vit_tiny_patch16_224" and module.num_classes == 3
    assert module.class_names == ["a", "b", "c"]
    sidecar = checkpoint.with_suffix(".json")
    for text, match in [
        ('{"classes": "abc"}', "'classes' must be a list"),
        ('["a", "b"]', "holds a JSON list"),
        ('{"timm_name": 3}', "'timm_name' must be a model name"),
        ("{not json", "not valid JSON"),
    ]:
        sidecar.write_text(text)
        with pytest.raises(ValueError, match=match):
            ImageClassifier(checkpoint_path=str(checkpoint))
