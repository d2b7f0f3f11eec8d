"""The shipped configs run as documented (README's main job) from any working directory; outputs go to a temp one."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsm_lightning.app.cli import cli

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_smoke_yaml_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # input paths in the config resolve against configs/, outputs against the cwd
    cli(["validate", "--config", str(ROOT / "configs" / "smoke.yaml"), "--trainer.enable_progress_bar=false"])
    text = next((tmp_path / "outputs" / "smoke").rglob("metrics.csv")).read_text()
    assert "val/top1" in text and "dsm/speedup" in text and "dsm/agreement_top1" in text


def test_real_model_configs_point_at_the_reference_tool_output_and_the_shipped_images():
    """quickstart.yaml and predict.yaml read what tools/build_reference.py writes and the images the repo carries
    (the run itself is the slow test in test_quickstart.py)."""
    import yaml

    from tools.build_reference import DEFAULT_OUT

    for name, split in (("quickstart.yaml", "val_dir"), ("predict.yaml", "predict_dir")):
        config = yaml.safe_load((ROOT / "configs" / name).read_text())
        folder = ROOT / "configs" / config["data"][split]
        weights = ROOT / "configs" / config["model"]["checkpoint_path"]
        assert weights.resolve() == DEFAULT_OUT.with_suffix(".safetensors"), name
        assert len(list(folder.rglob("*.png"))) == 500, name
