"""The Python snippets of the README and the docs pages run verbatim, with the names they leave to the reader bound to
tiny stand-ins."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dsm_lightning.app.module import ImageClassifier
from tests.conftest import images, tiny_vit
from tests.lightning_helpers import TINY_KW, make_image_folder, tiny_data

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPETS = [
    (page.relative_to(ROOT).as_posix(), snippet)
    for page in PAGES
    for snippet in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
]


def bindings(tmp_path: Path) -> dict:
    """What the README leaves to the reader: a LightningModule and DataModule (``model``, ``dm``), a ViT with its
    calibration images (``model``, ``calib_loader``) or input images (``images``)."""
    return {
        "lightning": {
            "model": ImageClassifier(
                "vit_tiny_patch16_224", num_classes=3, model_kwargs={**TINY_KW, "depth": 6}
            ),  # delay=4 needs depth > 4
            "dm": tiny_data(make_image_folder(tmp_path / "imgs")),
        },
        "calibrate": {"model": tiny_vit(), "calib_loader": [images(batch=8, seed=s) for s in range(4)]},
        "plain": {"images": torch.randn(2, 3, 224, 224)},
    }


def _tiny_reference(root: Path) -> None:
    """A tiny stand-in for the Quick start's reference checkpoint (side-car included) and its images, at the paths
    the README names."""
    import json

    from safetensors.torch import save_file

    kwargs = {**TINY_KW, "num_classes": 3}
    weights = root / "outputs" / "reference" / "dinov2_s14_fmnist.safetensors"
    weights.parent.mkdir(parents=True)
    model = ImageClassifier("vit_tiny_patch16_224", num_classes=3, model_kwargs=TINY_KW).model
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    meta = {"timm_name": "vit_tiny_patch16_224", "create_kwargs": kwargs, "classes": ["a", "b", "c"]}
    weights.with_suffix(".json").write_text(json.dumps({**meta, "preprocess": "Resize(32, bilinear)"}))
    make_image_folder(root / "examples" / "images" / "fashion-mnist" / "val")


def kind(snippet: str) -> str:
    if "calibrate(" in snippet:
        return "calibrate"
    if "datamodule=dm" in snippet:
        return "lightning"
    return "plain"


def _param(index: int):
    """An ONNX Runtime snippet exports and quantizes a full-size model (about a minute on 2 cores): slow tier."""
    page, snippet = SNIPPETS[index]
    marks = [pytest.mark.slow] if "onnxruntime" in snippet else []
    return pytest.param(index, id=f"{page}-{index}", marks=marks)


@pytest.mark.parametrize("index", [_param(i) for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    page, snippet = SNIPPETS[index]
    from dsm_lightning.adapters import base as adapters

    monkeypatch.chdir(tmp_path)  # snippets may write files (dsm.yaml, lightning_logs)
    namespace = dict(bindings(tmp_path)[kind(snippet)])
    if "outputs/reference/dinov2_s14_fmnist" in snippet:
        _tiny_reference(tmp_path)
    registered = adapters.registered_adapters()  # built-ins loaded first, so restoring keeps them
    try:
        exec(compile(snippet, f"{page} snippet {index + 1}", "exec"), namespace)
    finally:
        adapters._REGISTRY[:] = registered  # an example adapter the snippet registers goes away
