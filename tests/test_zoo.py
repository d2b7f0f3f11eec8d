"""The zoo's classifier (benchmarks/zoo.py): one tiny model per source comes out correct, a non-ViT refused, and a
merge that drifts from the loop reference is caught as wrong."""

from __future__ import annotations

import pytest
import torch

from benchmarks.zoo import Built, build_hf, build_timm, build_torchvision, classify, markdown, sample

pytest.importorskip("timm")


@pytest.mark.parametrize(
    "build",
    [
        lambda: build_timm("vit_tiny_patch16_224"),
        lambda: build_timm("vit_base_patch16_rope_224"),  # Eva: the RoPE reference
        lambda: build_torchvision("vit_b_32"),
        lambda: build_hf("Dinov2WithRegistersModel", "eager"),
    ],
    ids=["timm", "timm-eva", "torchvision", "transformers"],
)
def test_supported_models_are_correct(build):
    pytest.importorskip("transformers")
    result = classify(build())
    assert result["outcome"] == "correct", result
    assert result["max_diff"] is not None and result["max_diff"] < 1e-4
    assert "reference" in result["check"] and "n/a" not in result["check"]


def test_non_vit_is_refused_with_one_line():
    import timm

    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    result = classify(Built(model, sample(64), "resnet18", "timm"))
    assert result["outcome"] == "refused", result
    assert "UnsupportedModelError" in result["check"] and "\n" not in result["note"]


def test_a_merge_off_the_reference_is_wrong(monkeypatch):
    """A merging block whose MLP half drifts (a per-channel offset, so final norms cannot hide it) is wrong, while
    r=0 and remove_dsm, which never run it, stay exact."""
    from dsm_lightning.adapters.timm import TimmViTAdapter

    drifted = TimmViTAdapter.feed_forward
    monkeypatch.setattr(
        TimmViTAdapter, "feed_forward", lambda self, b, x: drifted(self, b, x) + 1e-3 * torch.arange(x.shape[-1])
    )
    result = classify(build_timm("vit_tiny_patch16_224"))
    assert result["outcome"] == "wrong" and "reference differs" in result["note"], result


def test_markdown_counts_every_outcome():
    rows = [
        dict(source="timm", architecture="a", cls="VisionTransformer", size="", outcome="correct", check="", note=""),
        dict(source="torchvision", architecture="b", cls="X", size="", outcome="refused", check="", note="x|y"),
    ]
    versions = dict(timm="t", torch="t", torchvision="t", transformers="t", threads=1)
    text = markdown(rows, dict(versions=versions, seconds=1.0))
    assert "**2 models: 1 correct, 1 refused, 0 wrong, 0 crashed**" in text
    assert "x\\|y" in text  # a pipe in a note does not break the table
