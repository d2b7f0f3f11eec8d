"""ImageClassifier: a LightningModule around a timm (or torchvision) ViT, loadable from a local checkpoint."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

__all__ = ["ImageClassifier", "build_model", "load_checkpoint", "read_sidecar", "sidecar_data_config"]

#: Model of :class:`ImageClassifier` when neither ``model_name`` nor a checkpoint side-car names one.
DEFAULT_MODEL = "vit_small_patch16_224"


#: Constructor arguments a side-car's ``create_kwargs`` may set, each with its accepted values: a type and, for
#: numbers, an inclusive range wide enough for any published ViT. Anything else is refused before a model is built.
SIDECAR_CREATE_KWARGS: Dict[str, Tuple[Tuple[type, ...], Optional[Tuple[float, float]]]] = {
    "img_size": ((int, list), (1, 4096)),
    "patch_size": ((int,), (1, 64)),
    "num_classes": ((int,), (0, 100_000)),
    "global_pool": ((str,), None),
    "class_token": ((bool,), None),
    "reg_tokens": ((int,), (0, 64)),
    "no_embed_class": ((bool,), None),
    "embed_dim": ((int,), (1, 8192)),
    "depth": ((int,), (1, 64)),
    "num_heads": ((int,), (1, 128)),
    "mlp_ratio": ((int, float), (0.25, 16)),
    "qkv_bias": ((bool,), None),
    "qk_norm": ((bool,), None),
    "init_values": ((int, float, type(None)), (0, 10)),
    "pre_norm": ((bool,), None),
    "final_norm": ((bool,), None),
    "fc_norm": ((bool, type(None)), None),
    "dynamic_img_size": ((bool,), None),
    "dynamic_img_pad": ((bool,), None),
}


#: String arguments a side-car may set, with their accepted values (timm's pooling types).
SIDECAR_CHOICES: Dict[str, Tuple[str, ...]] = {"global_pool": ("", "avg", "avgmax", "max", "token", "map")}
#: Largest model a side-car may describe: parameters (estimated from its blocks and position embedding) and tokens
#: per image. Larger than any published ViT; a combination of in-range values beyond them is refused.
SIDECAR_MAX_PARAMS = 5e9
SIDECAR_MAX_TOKENS = 65_536
#: Largest side-car file read, in bytes (class names of the 21k ImageNet classes take under 1 MiB).
SIDECAR_MAX_BYTES = 16 * 2**20


def _check_create_kwarg(meta: Path, key: str, value: Any) -> None:
    if key not in SIDECAR_CREATE_KWARGS:
        raise ValueError(
            f"{meta}: create_kwargs[{key!r}] is not a constructor argument a side-car may set (allowed: "
            f"{', '.join(SIDECAR_CREATE_KWARGS)}); pass it yourself with --model.model_kwargs if you trust it"
        )
    kinds, bounds = SIDECAR_CREATE_KWARGS[key]
    items = value if isinstance(value, list) else [value]
    numeric = (int, float)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if ok and isinstance(value, list):
        ok = 1 <= len(value) <= 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if ok and bounds is not None:
        ok = all(not isinstance(v, numeric) or isinstance(v, bool) or bounds[0] <= v <= bounds[1] for v in items)
    if not ok:
        limit = f" in [{bounds[0]:g}, {bounds[1]:g}]" if bounds else ""
        names = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"{meta}: create_kwargs[{key!r}] = {value!r} is out of range; expected {names}{limit}")
    if key in SIDECAR_CHOICES and value not in SIDECAR_CHOICES[key]:
        raise ValueError(
            f"{meta}: create_kwargs[{key!r}] = {value!r} is not one of {', '.join(map(repr, SIDECAR_CHOICES[key]))}"
        )


def _check_model_size(meta: Path, kwargs: Dict[str, Any]) -> None:
    """Refuse ``create_kwargs`` whose values, each in range, add up to a model far larger than any real ViT
    (missing values count as ViT-B/16's)."""
    dim, depth = kwargs.get("embed_dim", 768), kwargs.get("depth", 12)
    size, patch = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
    h, w = (size, size) if isinstance(size, int) else (size[0], size[-1])
    tokens = (h // patch) * (w // patch)
    params = depth * (4 + 2 * kwargs.get("mlp_ratio", 4.0)) * dim * dim + tokens * dim
    if params > SIDECAR_MAX_PARAMS or tokens > SIDECAR_MAX_TOKENS:
        raise ValueError(
            f"{meta}: create_kwargs describe a ViT of about {params / 1e9:,.1f} billion parameters and {tokens:,} "
            f"tokens per image, beyond any real ViT (limits {SIDECAR_MAX_PARAMS / 1e9:g} billion, "
            f"{SIDECAR_MAX_TOKENS:,} tokens); fix the side-car, or pass the arguments with --model.model_kwargs if "
            f"you trust them"
        )


def read_sidecar(checkpoint_path: str) -> Dict[str, Any]:
    """The JSON file next to a checkpoint (same name, ``.json``), or ``{}`` when there is none.

    Keys read: ``timm_name`` (a timm or ``torchvision:`` model name), ``create_kwargs`` (constructor arguments from
    :data:`SIDECAR_CREATE_KWARGS`, e.g. ``img_size``, ``num_classes``, ``global_pool``, each within its range),
    ``classes`` (class names, one per output) and the weights' preprocessing (``interpolation``, ``crop_pct``,
    ``mean``, ``std``, or a free-text ``preprocess`` naming ``Resize(224, bilinear)``; see
    :func:`sidecar_data_config`), which the DataModule follows unless told otherwise. Other keys are ignored. A
    side-car describes weights; it can never name a ``transformers`` folder (``hf:``, whose loader can import code),
    enable remote code or build a model far larger than any real ViT.

    Raises:
        ValueError: If the file is not valid JSON or a key has the wrong type or value (the message names the file
            and the key).
    """
    meta = Path(checkpoint_path).with_suffix(".json")
    if not meta.is_file():
        return {}
    if meta.stat().st_size > SIDECAR_MAX_BYTES:
        raise ValueError(
            f"{meta} holds {meta.stat().st_size:,} bytes, more than a side-car's {SIDECAR_MAX_BYTES:,}; fix or "
            f"remove the side-car file"
        )
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{meta} is not valid JSON ({err}); fix or remove the side-car file") from None
    except RecursionError:
        raise ValueError(f"{meta} nests JSON too deeply to be a side-car; fix or remove the side-car file") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{meta} holds a JSON {type(data).__name__}; a side-car file is a JSON object such as "
            f'{{"timm_name": ..., "create_kwargs": {{...}}, "classes": [...]}}'
        )
    checks = {
        "timm_name": (str, "a model name string"),
        "create_kwargs": (dict, "an object of constructor arguments"),
        "classes": (list, "a list of class-name strings"),
    }
    for key, (kind, what) in checks.items():
        if key in data and not isinstance(data[key], kind):
            raise ValueError(f"{meta}: {key!r} must be {what}, got {data[key]!r}")
    if "classes" in data and not all(isinstance(c, str) for c in data["classes"]):
        raise ValueError(f"{meta}: 'classes' must be a list of class-name strings")
    if str(data.get("timm_name", "")).startswith("hf:"):
        raise ValueError(
            f"{meta}: 'timm_name' names a transformers folder ({data['timm_name']!r}); a side-car may only name a "
            f"timm or torchvision model. Load a transformers model with --model.model_name=hf:<folder> instead"
        )
    for key, value in data.get("create_kwargs", {}).items():
        _check_create_kwarg(meta, key, value)
    _check_model_size(meta, data.get("create_kwargs", {}))
    sidecar_data_config(checkpoint_path, data)  # refuse bad preprocessing values now, naming the file
    return data


#: timm modules whose models DSM's adapters patch (VisionTransformer and subclasses, Eva); model-name suggestions
#: come from these only.
_TIMM_VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit", "eva")
#: Interpolations a side-car may name (timm's).
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def sidecar_data_config(checkpoint_path: str, meta: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing a side-car states for its weights, as timm data-config fields: ``interpolation``,
    ``crop_pct``, ``mean`` and ``std`` keys, else what its free-text ``preprocess`` says
    (``"... Resize(224, bilinear) -> CenterCrop(224) ..."``: the interpolation, and the crop fraction)."""
    where = Path(checkpoint_path).with_suffix(".json")
    cfg: Dict[str, Any] = {}
    text = meta.get("preprocess")
    if isinstance(text, str):
        resize = re.search(r"Resize\(\s*(\d+)\s*,\s*(\w+)\s*\)", text)
        if resize and resize.group(2).lower() in _INTERPOLATIONS:
            cfg["interpolation"] = resize.group(2).lower()
            crop = re.search(r"CenterCrop\(\s*(\d+)", text)
            cfg["crop_pct"] = min(1.0, int(crop.group(1)) / int(resize.group(1))) if crop else 1.0
    if "interpolation" in meta:
        if meta["interpolation"] not in _INTERPOLATIONS:
            raise ValueError(f"{where}: 'interpolation' must be one of {', '.join(_INTERPOLATIONS)}")
        cfg["interpolation"] = meta["interpolation"]
    if "crop_pct" in meta:
        value = meta["crop_pct"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{where}: 'crop_pct' must be a fraction in (0, 1], got {value!r}")
        cfg["crop_pct"] = float(value)
    for key in ("mean", "std"):
        if key in meta:
            value = meta[key]
            ok = isinstance(value, list) and len(value) == 3
            ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
            if not ok or (key == "std" and min(value) <= 0):
                raise ValueError(f"{where}: {key!r} must be 3 finite numbers{' > 0' if key == 'std' else ''}")
            cfg[key] = tuple(float(v) for v in value)
    return cfg


def _hf_folder(model_name: str) -> Path:
    folder = Path(model_name.split(":", 1)[1]).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model_name={model_name!r}: {folder} has no config.json; pass hf:<folder> with a folder written by "
            f"save_pretrained (config.json + model.safetensors), e.g. a downloaded hub snapshot"
        )
    return folder


def _build_hf(model_name: str, num_classes: Optional[int], pretrained: bool, **model_kwargs: Any) -> nn.Module:
    """``hf:<folder>``: a ``transformers`` image-classification model from a local ``save_pretrained`` folder."""
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ImportError(f"model_name={model_name!r} needs transformers: pip install 'dsm-lightning[hf]'") from None
    if pretrained:
        raise ValueError("pretrained=True has no meaning for hf:<folder>; the folder's weights are loaded")
    folder = _hf_folder(model_name)
    if model_kwargs.get("trust_remote_code"):
        raise ValueError(
            "trust_remote_code=True would import Python files from the model folder; dsm-lightning loads only "
            "transformers' built-in ViT families, without remote code. Remove trust_remote_code"
        )
    kwargs = {"attn_implementation": "sdpa", **model_kwargs, "trust_remote_code": False}
    model: nn.Module = AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True, **kwargs)
    labels = int(cast(Any, model).config.num_labels)
    if num_classes is not None and num_classes != labels:
        raise ValueError(
            f"num_classes={num_classes} but {folder}/config.json has num_labels={labels}; leave num_classes unset"
        )
    return model.eval()


def build_model(
    model_name: str, num_classes: Optional[int] = None, pretrained: bool = False, **model_kwargs: Any
) -> nn.Module:
    """Create a model by name: a timm name, ``torchvision:<name>`` (``torchvision:vit_b_16``, or
    ``torchvision:VisionTransformer`` with its constructor arguments in ``model_kwargs``), or ``hf:<folder>`` (a
    ``transformers`` image classifier saved with ``save_pretrained``; ``model_kwargs`` go to ``from_pretrained``)."""
    if model_name.startswith("hf:"):
        return _build_hf(model_name, num_classes, pretrained, **model_kwargs)
    if model_name.startswith("torchvision:"):
        import torchvision

        name = model_name.split(":", 1)[1]
        kwargs = dict(model_kwargs)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        if pretrained:
            raise ValueError("pretrained=True needs a download; pass checkpoint_path= with local weights instead")
        builders = set(torchvision.models.list_models())
        if name != "VisionTransformer" and name not in builders:
            import difflib

            close = difflib.get_close_matches(name, sorted(builders), n=3, cutoff=0.8)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ValueError(
                f"model_name={model_name!r}: torchvision has no model builder {name!r}; {hint}pass torchvision:<name> "
                f"with a name from torchvision.models.list_models() (e.g. vit_b_16) or torchvision:VisionTransformer"
            )
        ctor = getattr(torchvision.models, name)
        # a builder (vit_b_16) takes weights=; the class itself (VisionTransformer) takes a custom configuration
        return ctor(**kwargs) if isinstance(ctor, type) else ctor(weights=None, **kwargs)
    import timm

    kwargs = dict(model_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if not timm.is_model(model_name):
        import difflib

        # suggest only names DSM can patch: models of timm's ViT modules (a close ResNet name would be refused)
        vits = [m for module in _TIMM_VIT_MODULES for m in timm.list_models(module=module)]
        close = difflib.get_close_matches(model_name, vits, n=3, cutoff=0.8)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ValueError(
            f"unknown timm model {model_name!r}; {hint}(timm.list_models('vit_*') lists ViTs; "
            f"torchvision:<name> and hf:<folder> name other families)"
        )
    return timm.create_model(model_name, pretrained=pretrained, **kwargs)


def load_error_reason(err: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, in one line, without torch's advice to turn the protection
    off (``weights_only=False`` runs whatever code the file holds)."""
    lines = [" ".join(line.split()) for line in str(err).splitlines() if line.strip()]
    useful = [line for line in lines if "weights_only" not in line and not line.startswith("Check the documentation")]
    reason = next((line for line in useful if "GLOBAL" in line or "global" in line), useful[0] if useful else "")
    if not reason:  # only torch's generic "Weights only load failed ... weights_only=False ..." line
        reason = "the file holds Python objects that are not tensors"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint_path={str(path)!r} does not exist; pass the path of a local "
            f".safetensors, .pt/.pth or Lightning .ckpt file"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error type for truncated or corrupt files
            raise ValueError(
                f"cannot read {path} as safetensors ({err}); the file may be truncated or not a safetensors file"
            ) from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors, truncated zip archives, non-weights pickles
        raise ValueError(
            f"cannot load {path} with torch.load(weights_only=True) ({type(err).__name__}: {load_error_reason(err)}); "
            f"pass a state_dict saved with torch.save or a .safetensors file"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a Lightning checkpoint
        prefix = "model."
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix) :]: v for k, v in obj.items()}
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    odd = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ValueError(
            f"{path} is not a state_dict of tensors: {odd[:5]} hold {sorted({type(obj[k]).__name__ for k in odd})}"
        )
    return obj


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load local weights (safetensors, or ``torch.load(weights_only=True)``) strictly, casting to the model dtype."""
    state = _read_state_dict(Path(path))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:

        def head(items: List[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        raise ValueError(
            f"checkpoint {path} does not match {type(model).__name__}: "
            + "; ".join(
                p
                for p in [
                    f"missing keys: {head(missing)}" if missing else "",
                    f"unexpected keys: {head(unexpected)}" if unexpected else "",
                    f"shape mismatches: {head(mismatched)}" if mismatched else "",
                ]
                if p
            )
            + ". Check model_name, num_classes and model_kwargs (e.g. img_size, global_pool) against the checkpoint"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _hf_data_config(folder: Path, config: Any) -> Dict[str, Any]:
    """timm-style data config from a ``transformers`` folder's ``preprocessor_config.json`` (resize, centre crop,
    mean/std); without that file, the config's ``image_size`` and ImageNet statistics, with a warning."""
    path = folder / "preprocessor_config.json"
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    cfg: Dict[str, Any] = {
        "input_size": (3, int(size[0]), int(size[1])),
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "crop_pct": 1.0,
        "crop_mode": "center",
    }
    if not path.is_file():
        warnings.warn(
            f"{path} not found: preprocessing with ImageNet mean/std at {size[0]}x{size[1]}; save the model's image "
            f"processor there (processor.save_pretrained(folder)) for its own",
            stacklevel=2,
        )
        return cfg
    try:
        proc = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    crop = proc.get("crop_size") if proc.get("do_center_crop") else None
    resize = proc.get("size") or {}
    out = crop or resize
    if "height" in out:
        cfg["input_size"] = (3, int(out["height"]), int(out["width"]))
    elif "shortest_edge" in out:
        cfg["input_size"] = (3, int(out["shortest_edge"]), int(out["shortest_edge"]))
    if crop and "shortest_edge" in resize:
        cfg["crop_pct"] = min(1.0, cfg["input_size"][1] / int(resize["shortest_edge"]))
    cfg["interpolation"] = _PIL_RESAMPLE.get(int(proc.get("resample", 3)), "bicubic")
    if proc.get("do_normalize", True):
        cfg["mean"] = tuple(float(v) for v in proc.get("image_mean", cfg["mean"]))
        cfg["std"] = tuple(float(v) for v in proc.get("image_std", cfg["std"]))
    else:
        cfg["mean"], cfg["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return cfg


class ImageClassifier(LightningModule):
    """Image classification around a ViT.

    Args:
        model_name: timm model name (``pretrained=False`` by default: no hub access is needed),
            ``torchvision:<name>``, or ``hf:<folder>`` (a local ``transformers`` classifier; its weights, labels
            and ``preprocessor_config.json`` come from the folder). Default: the ``timm_name`` of the checkpoint's
            side-car JSON (with its ``create_kwargs`` under ``model_kwargs``), else ``vit_small_patch16_224``.
        num_classes: Classes of the head (default: the side-car's, else the model's default).
        checkpoint_path: Local weights (``.safetensors``, ``.pt``/``.pth``, Lightning ``.ckpt``), loaded strictly.
        pretrained: Let timm download weights (needs network access).
        model_kwargs: Extra keyword arguments for the model constructor (e.g. ``img_size``, ``global_pool``).
        class_names: Names of the classes (used by the prediction writer); the side-car JSON's ``classes`` list
            (:func:`read_sidecar`) is used when this is None.
        top_k: k of the top-k accuracy and of predictions.
        lr: Learning rate of AdamW (fit only).
    """

    def __init__(
        self,
        model_name: Optional[str] = None,
        num_classes: Optional[int] = None,
        checkpoint_path: Optional[str] = None,
        pretrained: bool = False,
        model_kwargs: Optional[Dict[str, Any]] = None,
        class_names: Optional[List[str]] = None,
        top_k: int = 5,
        lr: float = 1e-4,
    ) -> None:
        super().__init__()
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k={top_k!r}: pass a whole number >= 1 (how many classes to predict per image)")
        self.save_hyperparameters()
        meta = read_sidecar(checkpoint_path) if checkpoint_path else {}
        kwargs = dict(model_kwargs or {})
        if model_name is None and "timm_name" in meta:
            kwargs = {**meta.get("create_kwargs", {}), **kwargs}
            if num_classes is None:
                num_classes = kwargs.pop("num_classes", None)
            kwargs.pop("num_classes", None)
        self.model_name: str = model_name or meta.get("timm_name") or DEFAULT_MODEL
        try:
            self.model = build_model(self.model_name, num_classes, pretrained, **kwargs)
        except (TypeError, AttributeError, AssertionError, ValueError) as err:
            if model_name is not None or "timm_name" not in meta or not checkpoint_path:
                raise
            raise ValueError(
                f"{Path(checkpoint_path).with_suffix('.json')}: its timm_name {self.model_name!r} and create_kwargs "
                f"do not build a model ({type(err).__name__}: {' '.join(str(err).split())}); fix the side-car or "
                f"pass --model.model_name"
            ) from None
        #: Preprocessing the checkpoint's side-car states (:func:`sidecar_data_config`), on top of the model's.
        self.sidecar_preprocessing = sidecar_data_config(checkpoint_path, meta) if checkpoint_path else {}
        if checkpoint_path:
            load_checkpoint(self.model, checkpoint_path)
        if class_names is None:
            class_names = meta.get("classes") or self._hf_labels()
        self.num_classes = self._infer_num_classes()
        self.class_names = list(class_names) if class_names else None
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} entries but the model has {self.num_classes} classes"
            )
        self.top_k = min(top_k, self.num_classes)
        from torchmetrics import MetricCollection
        from torchmetrics.classification import MulticlassAccuracy

        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                f"top{self.top_k}": MulticlassAccuracy(self.num_classes, top_k=self.top_k, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")

    def _hf_labels(self) -> Optional[List[str]]:
        """Class names from a ``transformers`` config's ``id2label`` (None for the generic ``LABEL_i`` names)."""
        id2label = getattr(getattr(self.model, "config", None), "id2label", None)
        if not self.model_name.startswith("hf:") or not id2label:
            return None
        names = [str(id2label[i]) for i in sorted(id2label)]
        return None if names == [f"LABEL_{i}" for i in range(len(names))] else names

    def _infer_num_classes(self) -> int:
        from ..measure import num_classes_of

        n = num_classes_of(self.model)
        if n is not None:
            return n
        raise ValueError(f"{self.model_name} has no classifier head (num_classes=0); set num_classes")

    def data_config(self) -> Dict[str, Any]:
        """Preprocessing of the model, used by the DataModule: timm's ``resolve_data_config`` (a ``transformers``
        folder's ``preprocessor_config.json``; torchvision's ImageNet recipe), with what the checkpoint's side-car
        states on top (:attr:`sidecar_preprocessing`: interpolation, crop, mean, std)."""
        return {**self._model_data_config(), **getattr(self, "sidecar_preprocessing", {})}

    def _model_data_config(self) -> Dict[str, Any]:
        from timm.data import resolve_data_config

        if self.model_name.startswith("hf:"):
            return _hf_data_config(_hf_folder(self.model_name), cast(Any, self.model).config)
        if self.model_name.startswith("torchvision:"):
            size = self.model.image_size
            return {
                "input_size": (3, size, size),
                "interpolation": "bilinear",
                "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225),
                "crop_pct": 224 / 256,
                "crop_mode": "center",
            }
        cfg = resolve_data_config({}, model=self.model)
        img_size = getattr(getattr(self.model, "patch_embed", None), "img_size", None)
        if img_size is not None:  # the model may be built at another size than its pretrained config says
            cfg["input_size"] = (3, *img_size)
        return cfg

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(images)
        return out if isinstance(out, torch.Tensor) else out.logits  # transformers: ImageClassifierOutput

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["target"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["target"].shape[0])
        return loss

    def _warn_skipped(self, batch: Dict[str, Any]) -> None:
        for path, reason in batch.get("skipped", ()):
            warnings.warn(f"skipped {path!r}: {reason}", stacklevel=2)

    def _eval_step(self, batch: Dict[str, Any], metrics) -> None:
        self._warn_skipped(batch)
        if batch["image"].shape[0] == 0:
            return
        logits = self(batch["image"])
        target = batch["target"]
        if (target < 0).any():
            raise ValueError("this batch has no labels (an unlabelled folder): use predict, not validate/test")
        batch_size = target.shape[0]
        self.log(f"{metrics.prefix}loss", F.cross_entropy(logits, target), sync_dist=True, batch_size=batch_size)
        metrics.update(logits, target)
        self.log_dict(metrics, on_epoch=True, prog_bar=True, batch_size=batch_size)

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def predict_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        """Top-k classes and probabilities per image, plus ``skipped`` (unreadable files left out of the batch)."""
        self._warn_skipped(batch)
        if batch["image"].shape[0] == 0:  # every file of this batch was unreadable
            empty = torch.empty(0, self.top_k, device=self.device)
            scores, classes = empty, empty.long()
        else:
            scores, classes = self(batch["image"]).softmax(dim=-1).topk(self.top_k, dim=-1)
        return {
            "path": batch["path"],
            "index": batch["index"],
            "classes": classes,
            "scores": scores,
            "target": batch["target"],
            "skipped": list(batch.get("skipped", ())),
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
