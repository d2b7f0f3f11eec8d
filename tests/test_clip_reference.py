"""The CLIP reference conversion on a tiny INT8 CLIP image tower made the way the real one was: a Hugging Face
``CLIPVisionModelWithProjection`` exported to ONNX and dynamically quantized per output channel."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("onnx")
ort_quant = pytest.importorskip("onnxruntime.quantization")

from tools import convert as cr  # noqa: E402

HEADS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        patch_size=8,
        image_size=32,
        projection_dim=8,
        hidden_act="quick_gelu",
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # distinct values everywhere: the exporter merges identical initializers
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if "norm" in name else 0.2))
    folder = tmp_path_factory.mktemp("clip")
    fp32, int8 = folder / "tiny.onnx", folder / "tiny.int8.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, 32, 32),),
            str(fp32),
            dynamo=False,
            input_names=["pixel_values"],
            output_names=["image_embeds"],
            dynamic_axes={"pixel_values": {0: "batch"}},
            opset_version=14,
        )
    ort_quant.quantize_dynamic(
        str(fp32), str(int8), weight_type=ort_quant.QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    import onnx

    return model, onnx.load(str(int8))


def test_dequantized_weights_are_the_originals_within_one_quantization_step(tiny):
    model, graph = tiny
    weights = cr.dequantized_weights(graph)
    original = model.state_dict()
    for name in ("vision_model.encoder.layers.1.mlp.fc1.weight", "visual_projection.weight"):
        w, ref = weights[name], original[name]
        step = ref.abs().amax(dim=1, keepdim=True) / 127  # symmetric per-output-channel INT8
        assert w.shape == ref.shape and ((w - ref).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(weights["vision_model.pre_layrnorm.weight"], original["vision_model.pre_layrnorm.weight"])


def test_timm_and_transformers_equal_the_graph_run_by_onnx_reference_operators(tiny):
    _, graph = tiny
    weights = cr.dequantized_weights(graph)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = cr.reference_forward(graph, weights, x)
    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 2, "num_heads": HEADS, "mlp_ratio": 2.0}
    timm_vit = cr.timm_model(cr.timm_state(weights), num_classes=8, **kw)
    with torch.no_grad():
        assert (timm_vit(x) - ref).abs().max() < 1e-5
        assert (cr.hf_model(weights, num_heads=HEADS)(pixel_values=x).image_embeds - ref).abs().max() < 1e-5
