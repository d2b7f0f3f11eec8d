"""dsm_lightning/calibration.py: calibrate() meets its budget, restores the model and refuses bad inputs."""

from __future__ import annotations

import pytest
import torch

from dsm_lightning import DSMConfig, apply_dsm, calibrate, get_config, is_patched
from tests.conftest import images, tiny_vit


def loader(n=32, batch=8, labels=True):
    x = images(batch=n, seed=3)
    y = torch.arange(n) % 7
    return [(x[i : i + batch], y[i : i + batch]) if labels else x[i : i + batch] for i in range(0, n, batch)]


def test_calibrate_meets_budget_and_never_loses_to_tome_on_the_check_half():
    model = tiny_vit()
    result = calibrate(model, loader(labels=False), target=0.6, max_images=32, verbose=False)
    assert result.metric == "kl" and result.images == 32
    assert result.flops_ratio <= 0.6 + 1e-9
    assert isinstance(result.config, DSMConfig) and isinstance(result.config.r, (int, float))
    tome = [
        c
        for c in result.candidates
        if c["delay"] == 0
        and c["local_blocks"] == 0
        and c["schedule"] == "constant"
        and c["metric"] == "keys"
        and c["protect"] == 0
        and c["matching"] == "tome"
    ]
    assert tome and tome[0]["images"] == 16, "ToMe is always scored on the whole search half"
    chosen = next(c for c in result.candidates if c["config"] == result.config.replace(r=None).to_dict())
    # never worse than ToMe on images it did not choose on (this random model's KLs are ~1e-8: float rounding)
    assert chosen["check_kl"] <= tome[0]["check_kl"] + 1e-6
    assert len({c["config"]["metric"] for c in result.candidates}) == 2, "merge options are searched too"
    # the reported score is the chosen schedule's agreement on the check half (odd images), reproducible
    x = torch.cat(loader(labels=False))[1::2]
    with torch.no_grad():
        dense = model(x).argmax(-1)
        apply_dsm(model, result.config)
        merged = model(x).argmax(-1)
    assert float((merged == dense).float().mean()) == pytest.approx(result.score)
    assert "->" in result.table() and "stable" in result.table().lower()


def test_calibrate_restores_model_and_uses_labels(tmp_path):
    model = apply_dsm(tiny_vit(), delay=1, r=3)
    before = get_config(model)
    result = calibrate(
        model,
        loader(labels=True),
        target=0.7,
        max_images=16,
        metric="accuracy",
        search_space=[{"delay": 1, "local_blocks": 1}],
        verbose=False,
    )
    assert result.metric == "accuracy"
    assert get_config(model) == before
    path = tmp_path / "dsm.yaml"
    result.config.to_yaml(str(path))
    assert DSMConfig.from_yaml(str(path)) == result.config
    with pytest.raises(ValueError, match="needs labels"):
        calibrate(tiny_vit(), loader(labels=False), metric="accuracy")
    with pytest.raises(ValueError, match="metric must be"):
        calibrate(tiny_vit(), loader(labels=False), metric="top5")


def test_calibrate_refuses_bad_targets_labels_and_nan_images():
    model = tiny_vit()
    x = images(batch=8, seed=1)
    with pytest.raises(ValueError, match="target=0: the budget is a fraction"):
        calibrate(model, [x], target=0, verbose=False)
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 7\)"):
        calibrate(model, [(x, torch.full((8,), 99))], metric="accuracy", verbose=False)
    with pytest.raises(ValueError, match=r"non-finite outputs .* image\(s\) \[3\]"):
        calibrate(model, [x.clone().index_fill_(0, torch.tensor([3]), float("nan"))], verbose=False)
    assert not is_patched(model), "the model is left as it was"
