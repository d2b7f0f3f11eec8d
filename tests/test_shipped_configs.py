"""The shipped configs run as documented (README's main job) from any working directory; outputs go to a temp one."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsm_lightning.cli import cli
from tests.lightning_helpers import read_csv

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_predict_yaml_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # input paths in the config resolve against configs/, outputs against the cwd
    cli(["predict", "--config", str(ROOT / "configs" / "predict.yaml"), "--trainer.enable_progress_bar=false"])
    rows = read_csv(tmp_path / "outputs" / "predictions.csv")
    assert sorted(Path(r["path"]).name for r in rows) == sorted(
        p.name for p in (ROOT / "examples" / "images" / "samples").glob("*.jpg")
    )
    metrics = list((tmp_path / "outputs" / "predict").rglob("metrics.csv"))
    assert metrics and "dsm/agreement_top1" in metrics[0].read_text()


def test_validate_yaml_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli(["validate", "--config", str(ROOT / "configs" / "validate.yaml"), "--trainer.enable_progress_bar=false"])
    text = next((tmp_path / "outputs" / "validate").rglob("metrics.csv")).read_text()
    assert "val/top1" in text and "dsm/speedup" in text
