"""The shipped configs run as documented (README's main job), with outputs redirected to a temp folder."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from dsm_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def localise(name: str, tmp_path: Path) -> Path:
    text = (ROOT / "configs" / name).read_text()
    text = text.replace("dsm_lightning/assets", str(ROOT / "dsm_lightning" / "assets"))
    text = text.replace("outputs", str(tmp_path / "outputs"))
    out = tmp_path / name
    out.write_text(text)
    return out


def test_predict_yaml(tmp_path):
    main(["predict", "--config", str(localise("predict.yaml", tmp_path)), "--trainer.enable_progress_bar=false"])
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "predictions.csv")))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(
        p.name for p in (ROOT / "dsm_lightning" / "assets" / "samples").glob("*.jpg"))
    metrics = list((tmp_path / "outputs" / "predict").rglob("metrics.csv"))
    assert metrics and "dsm/agreement_top1" in metrics[0].read_text()


def test_validate_yaml(tmp_path):
    main(["validate", "--config", str(localise("validate.yaml", tmp_path)), "--trainer.enable_progress_bar=false"])
    text = next((tmp_path / "outputs" / "validate").rglob("metrics.csv")).read_text()
    assert "val/top1" in text and "dsm/speedup" in text
