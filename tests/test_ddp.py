"""Multi-process evaluation on CPU: same accuracy as one process, every prediction written exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from dsm_lightning import DSMCallback
from dsm_lightning.app.writer import PredictionWriter
from tests.lightning_helpers import make_image_folder, read_csv, tiny_classifier, tiny_data
from tests.test_cli_writer import cli_args

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _validate(data_root, devices, strategy, **guard):
    guard = guard or {"min_agreement": None}
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DSMCallback(delay=1, r=2, compare_dense=True, **guard)],
    )
    return trainer.validate(tiny_classifier(), datamodule=tiny_data(data_root), verbose=False)[0]


def test_ddp_spawn_accuracy_equals_single_process(tmp_path):
    data_root = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)  # 12 images, divisible by 2
    single = _validate(data_root, 1, "auto")
    multi = _validate(data_root, 2, "ddp_spawn")
    for key in ("val/top1", "val/top2", "dsm/agreement_top1"):
        assert multi[key] == pytest.approx(single[key], abs=1e-6), key


def test_ddp_spawn_quality_guard_decides_on_all_ranks(tmp_path):
    """Agreement is summed over ranks, so every rank takes the same decision and the stage finishes merged."""
    data_root = make_image_folder(tmp_path / "imgs", classes=3, per_class=8)  # 24 images: 3 batches per rank
    out = _validate(data_root, 2, "ddp_spawn", min_agreement=0.01, guard_images=4)
    assert out["dsm/guard_agreement"] >= 0.01 and out["dsm/guard_flops_ratio"] < 1.0
    assert out["dsm/flops_reduction"] > 1.0


def test_ddp_spawn_predictions_written_once(tmp_path):
    data_root = make_image_folder(tmp_path / "imgs", classes=3, per_class=3)  # 9 images: padded sampler
    out = tmp_path / "preds.csv"
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_progress_bar=False,
        callbacks=[DSMCallback(delay=1, r=2, min_agreement=None), PredictionWriter(str(out))],
    )
    trainer.predict(tiny_classifier(), datamodule=tiny_data(data_root), return_predictions=False)
    paths = [row["path"] for row in read_csv(out)]
    assert sorted(paths) == sorted(str(p) for p in data_root.rglob("*.png"))
    assert len(paths) == len(set(paths)) == 9


def test_cli_ddp_subprocess(tmp_path):
    data_root = make_image_folder(tmp_path / "imgs", classes=2, per_class=5)
    out = tmp_path / "preds.jsonl"
    args = [a for a in cli_args(tmp_path, data_root, out) if not a.startswith("--trainer.devices")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "dsm_lightning", "predict", *args, "--trainer.devices=2", "--trainer.strategy=ddp"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_text().splitlines()
    assert len(lines) == 10 and len(set(lines)) == 10
