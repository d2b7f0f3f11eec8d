"""The zoo: every ViT architecture the adapters claim, built small with random weights, run through ``apply_dsm``.

    python -m benchmarks.zoo                      # everything: writes benchmarks/results/zoo.{md,json}
    python -m benchmarks.zoo --only eva02 --source timm --out /tmp/zoo

Sources:

- **timm**: every name of ``timm.list_models()`` (architectures, so models differing only in their pretrained tag
  count once) whose entrypoint module holds ``VisionTransformer``, ``Eva`` or ``NaFlexVit`` (or a subclass) in its
  namespace (found by scanning the modules, nothing is built for it); each is then built and kept when the built
  model is an instance of one of the three classes. Every model is built *small*: 3 blocks, 32 channels, 2 heads,
  5 classes, an image of 6x6 patches (the architecture's own patch size / stride). Architectures that reject the
  width override (a conv stem whose width fixes the embedding, grouped-query heads per block) are built with the
  next overrides that work (listed in the table's size column).
- **torchvision**: ``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``, ``vit_h_14``: the builder's patch size in
  a ``VisionTransformer`` of the same small size (the builders fix depth and width).
- **transformers**: every class the ``transformers`` adapters support (ViT, DeiT, DINOv2 with and without
  registers, their backbones, CLIP and SigLIP vision, DINOv3), tiny configs (24 px images, 4 px patches), under
  ``attn_implementation`` ``"sdpa"`` and ``"eager"``; and a few neighbouring ViT-like classes the adapters do not
  claim, which must be refused.

Weights are random (``pretrained=False``, no downloads), perturbed after init so that LayerScale, heads and biases
are not zero and merges change the output. Each model is classified:

- **correct**: ``apply_dsm(model)`` (default config) works; the default merged output equals the slow loop reference
  of ``tests/reference.py`` / ``tests/rope_reference.py`` within 1e-4 (the ``check`` column names which), is finite,
  has the dense shape, and the merged token sizes sum to the patch count; with ``DSMConfig(r=0)`` the output is
  bit-identical (``torch.equal``) to the unpatched model's, and so is it after ``remove_dsm``;
- **refused**: ``apply_dsm`` raises one of the package's errors (``dsm_lightning.errors.DSMUserError``:
  ``UnsupportedModelError``, ``ConfigError``, ...) with a one-line message (recorded);
- **wrong**: it runs, but a check fails (or the package's error has a message of several lines);
- **crashed**: any other exception (type and first line recorded).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from benchmarks.common import environment, write_report
from dsm_lightning import DSMConfig, apply_dsm, is_patched, remove_dsm, token_plan, trace_tokens
from dsm_lightning.adapters import get_adapter
from dsm_lightning.errors import DSMUserError

OUTCOMES = ("correct", "refused", "wrong", "crashed")
SOURCES = ("timm", "torchvision", "transformers")
#: The small size every model is built at: blocks, channels, heads, classes, patch grid side.
DEPTH, WIDTH, HEADS, CLASSES, GRID = 3, 32, 2, 5, 6
#: Tolerance of the loop reference (the tests' own).
TOL = 1e-4
#: Notes longer than this are cut in the markdown table (kept whole in the JSON).
NOTE = 160
#: The timm classes kept (subclasses included); every timm module is scanned for them.
TIMM_CLASSES = ("timm.models.vision_transformer.VisionTransformer", "timm.models.eva.Eva",
                "timm.models.naflexvit.NaFlexVit")  # fmt: skip
#: Neighbouring transformers classes the adapters do not claim (each must be refused).
HF_UNCLAIMED = ("ViTMAEModel", "IJepaModel", "BeitModel", "Data2VecVisionModel", "Siglip2VisionModel", "CLIPModel")


class NotInZoo(Exception):
    """The built model is none of the classes the zoo covers (left out of the table, named in the JSON's meta)."""


@dataclass
class Built:
    """A small model, the images it runs on, and how it was built."""

    model: nn.Module
    images: Tensor
    size: str  # what was built: "d3 w32 h2 96px (6x6)"
    kind: str = ""  # which reference applies (see ``reference_check``)


# ---------------------------------------------------------------- outputs and weights


def tensors(out: Any) -> List[Tensor]:
    """Every tensor of a model output (a tensor, a tuple, an HF ``ModelOutput`` / dict), in order."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):  # ModelOutput is an OrderedDict of its non-None fields
        return [t for v in out.values() for t in tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in tensors(v)]
    return []


def perturb(model: nn.Module, seed: int = 0) -> None:
    """Random init leaves LayerScale near zero, biases and some heads at zero: add noise to every parameter (scaled
    by fan-in for matrices, so wide models built at their own width stay well conditioned), so merges matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.is_floating_point():
                continue
            std = 0.2 if p.ndim < 2 else min(0.2, 1.0 / math.sqrt(p[0].numel()))
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def sample(side: int, seed: int = 1, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def where(err: BaseException) -> str:
    """The innermost frame of a traceback, as ``file:line (function)``."""
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return ""
    f = frames[-1]
    return f"{Path(f.filename).name}:{f.lineno} ({f.name})"


# ---------------------------------------------------------------- the classifier


def run(model: nn.Module, built: Built) -> Any:
    return model(built.images)


def reference_check(built: Built) -> Tuple[str, Optional[float], bool]:
    """Compare the patched model's merged output with the loop reference for its family. Returns (name of the check,
    max abs difference, whether within :data:`TOL` as ``torch.allclose(rtol=TOL, atol=TOL)``), or
    (``"basic (reference n/a: ...)"``, None, True) when the reference itself cannot run on the model."""
    from tests import reference as ref
    from tests import rope_reference as rope

    model, x, kind = built.model, built.images, built.kind
    plan = token_plan(model, img_size=(int(x.shape[-2]), int(x.shape[-1])))
    adapter = get_adapter(model)
    rule = getattr(adapter, "rope_position", "destination")
    prefix = plan.num_prefix_tokens

    def dense_of(prefix_tokens: Tensor, patches: list) -> Tensor:
        dense: List[Optional[Tensor]] = [None] * (plan.grid[0] * plan.grid[1])
        for vec, _, src in patches:
            for s in src:
                dense[s] = vec
        return torch.stack([*list(prefix_tokens), *dense])

    def as_map(seq: Tensor) -> Tensor:  # [B, prefix + N, C] -> backbone feature map [B, C, rows, cols]
        patches = seq[:, prefix:]
        return patches.reshape(len(seq), plan.grid[0], plan.grid[1], -1).permute(0, 3, 1, 2)

    if kind in ("timm", "torchvision"):
        name = "loop reference (`tests/reference.py`)"
        fast, slow = run(model, built), lambda: ref.ref_forward(model, x, plan)
    elif kind == "eva":
        name = f"RoPE loop reference (`tests/rope_reference.py`, {rule})"
        fast, slow = run(model, built), lambda: rope.ref_forward(model, x, plan, rule)
    elif kind == "naflex":
        name = f"NaFlex loop reference (`tests/rope_reference.py`, {rule})"
        fast, slow = run(model, built), lambda: rope.ref_naflex(model, x, [plan] * len(x), rule)
    elif kind in ("dinov3", "dinov3_backbone"):
        name = f"DINOv3 loop reference (`tests/rope_reference.py`, {rule})"
        if kind == "dinov3":
            fast, slow = model(x).last_hidden_state, lambda: rope.ref_dinov3(model, x, plan, rule)
        else:
            fast, slow = model(x).feature_maps[-1], lambda: as_map(rope.ref_dinov3(model, x, plan, rule))
    elif kind in ("hf", "hf_backbone"):
        name = "HF loop reference (`tests/reference.py`)"
        encoder = adapter.core(model)

        def slow_hf() -> Tensor:
            seqs = [ref.HFOps.head(model, dense_of(*ref.ref_forward_tokens(model, image, plan))) for image in x]
            return torch.stack(seqs)

        if kind == "hf":
            fast, slow = encoder(x).last_hidden_state, slow_hf
        else:
            fast, slow = encoder(x).feature_maps[-1], lambda: as_map(slow_hf())
    else:
        raise ValueError(f"no reference for kind {kind!r}")
    try:
        expected = slow()
    except Exception as err:  # the reference's limit, not the package's: fall back to the basic checks
        return f"basic (reference n/a: {first_line(err)})", None, True
    if expected.shape != fast.shape:
        return name, math.inf, False
    return name, float((fast - expected).abs().max()), bool(torch.allclose(fast, expected, rtol=TOL, atol=TOL))


def tokens_conserved(built: Built) -> Optional[str]:
    """None when the merged tokens' sizes add up to the patch count per image (prefix tokens size 1, every patch in
    exactly one token, token count as planned), else what failed."""
    model = built.model
    trace = trace_tokens(model, built.images)
    plan, state = trace.plan, trace.state
    n0 = plan.grid[0] * plan.grid[1]
    prefix = plan.num_prefix_tokens
    if trace.tokens.shape[1] != prefix + plan.tokens_out:
        return f"{trace.tokens.shape[1]} tokens out, plan says {prefix + plan.tokens_out}"
    if state.size is None:
        return None if plan.tokens_out == n0 else "no sizes after merging"
    size = state.size[..., 0]
    if not torch.equal(size[:, :prefix], torch.ones_like(size[:, :prefix])):
        return "prefix tokens merged"
    total = size[:, prefix:].sum(1)
    if not torch.equal(total, torch.full_like(total, float(n0))):
        return f"patch sizes sum to {total.tolist()}, not {n0}"
    if state.pos is not None:
        counts = torch.stack([torch.bincount(p, minlength=plan.tokens_out) for p in state.pos])
        if not torch.equal(counts.to(size.dtype), size[:, prefix:]):
            return "sizes differ from the patch-to-token map"
    return None


def classify(built: Built) -> Dict[str, Any]:
    """Classify one model: ``{"outcome", "check", "note", "max_diff"}`` (outcome one of :data:`OUTCOMES`)."""
    model = built.model
    model.eval()
    result: Dict[str, Any] = {"outcome": "", "check": "", "note": "", "max_diff": None}
    stage = "dense forward"
    try:
        with torch.no_grad():
            try:
                dense: Optional[List[Tensor]] = tensors(run(model, built))
            except Exception as err:  # a model the harness cannot run: still asked whether apply_dsm takes it
                dense, dense_error = None, err
            stage = "apply_dsm"
            try:
                apply_dsm(model)
            except DSMUserError as err:
                text = str(err).strip()
                one_line = "\n" not in text
                result.update(
                    outcome="refused" if one_line else "wrong",
                    check="apply_dsm raised " + type(err).__name__,
                    note=text if one_line else "multi-line message: " + text.replace("\n", " / "),
                )
                return result
            if dense is None:
                stage = "dense forward"
                raise dense_error
            plan = token_plan(model, img_size=tuple(int(s) for s in built.images.shape[-2:]))
            failures: List[str] = []
            stage = "merged forward"
            merged = tensors(run(model, built))
            if [t.shape for t in merged] != [t.shape for t in dense]:
                failures.append("merged output shapes differ from dense")
            if not all(torch.isfinite(t).all() for t in merged if t.is_floating_point()):
                failures.append("merged output not finite")
            stage = "token sizes"
            lost = tokens_conserved(built)
            if lost:
                failures.append(lost)
            stage = "reference"
            check, diff, close = reference_check(built)
            result["max_diff"] = diff
            if not close:
                failures.append(f"reference differs by {diff:.3g}")
            stage = "r=0"
            apply_dsm(model, DSMConfig(r=0))
            exact = tensors(run(model, built))
            if len(exact) != len(dense) or not all(torch.equal(a, b) for a, b in zip(exact, dense)):
                failures.append("r=0 not bit-identical")
            stage = "remove_dsm"
            remove_dsm(model)
            if is_patched(model):
                failures.append("still patched after remove_dsm")
            restored = tensors(run(model, built))
            if len(restored) != len(dense) or not all(torch.equal(a, b) for a, b in zip(restored, dense)):
                failures.append("remove_dsm not bit-identical")
    except Exception as err:
        result.update(outcome="crashed", check=f"raised in {stage}", note=f"{first_line(err)} at {where(err)}")
        return result
    result["check"] = check  # and, for every row that ran: r=0 + remove_dsm bit-identical, sizes, finite, shape
    tokens = f"{plan.num_prefix_tokens}+{plan.grid[0] * plan.grid[1]} -> {plan.num_prefix_tokens}+{plan.tokens_out}"
    result["note"] = f"tokens {tokens}" + ("" if diff is None else f", max diff {diff:.1e}")
    if failures:
        result.update(outcome="wrong", note="; ".join(failures) + "; " + result["note"])
    else:
        result["outcome"] = "correct"
    return result


# ---------------------------------------------------------------- timm


def timm_architectures() -> List[Tuple[str, str]]:
    """``(architecture, module)`` of every timm name whose entrypoint module holds one of the three classes (or a
    subclass) in its namespace; nothing is built here."""
    import timm
    from timm.models import _registry

    classes = tuple(_import(path) for path in TIMM_CLASSES)
    found = []
    modules: Dict[str, bool] = {}
    for name in timm.list_models():
        module = _registry._model_to_module[name]
        if module not in modules:
            mod = importlib.import_module(f"timm.models.{module}")
            modules[module] = any(
                isinstance(v, type) and issubclass(v, classes) for v in vars(mod).values()
            )  # fmt: skip
        if modules[module]:
            found.append((name, module))
    return found


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    cls: type = getattr(importlib.import_module(module), name)
    return cls


def _timm_kind(model: nn.Module) -> str:
    from timm.models.eva import Eva
    from timm.models.naflexvit import NaFlexVit

    return "naflex" if isinstance(model, NaFlexVit) else "eva" if isinstance(model, Eva) else "timm"


def _stride(model: nn.Module) -> Tuple[int, int]:
    """Input pixels per patch (patch size, or a hybrid stem's stride times its patch size)."""
    m: Any = model
    if hasattr(m, "embeds"):  # NaFlexVit
        return tuple(int(p) for p in m.embeds.patch_size)  # type: ignore[return-value]
    pe = m.patch_embed
    img, grid = pe.img_size, pe.grid_size
    return int(img[0]) // int(grid[0]), int(img[1]) // int(grid[1])


#: Overrides tried in turn: every small size; with key/value heads per block too (grouped-query models that give
#: ``num_kv_heads`` one per block); without the width (a conv stem whose width fixes the embedding's), only if that
#: build stays under :data:`MAX_OWN_WIDTH_PARAMS` parameters (counted on the meta device first).
TIMM_ATTEMPTS: Tuple[Dict[str, Any], ...] = (
    dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS),
    dict(depth=DEPTH, embed_dim=WIDTH, num_heads=HEADS, num_kv_heads=(HEADS, 1, HEADS)),
    dict(depth=DEPTH, num_heads=HEADS),
    dict(depth=DEPTH),
)


MAX_OWN_WIDTH_PARAMS = 100_000_000


def _meta_params(name: str, **kwargs: Any) -> int:
    """Parameters of ``timm.create_model(name, **kwargs)``, built on the meta device (no memory, no init)."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **kwargs)
    return sum(p.numel() for p in model.parameters())


def build_timm(name: str, seed: int = 0) -> Built:
    """``name`` built small (see :data:`TIMM_ATTEMPTS`), at 6x6 patches of its own stride, randomly perturbed."""
    import timm

    errors = []
    for kwargs in TIMM_ATTEMPTS:
        try:
            if "embed_dim" not in kwargs:
                params = _meta_params(name, num_classes=CLASSES, **kwargs)
                if params > MAX_OWN_WIDTH_PARAMS:
                    raise ValueError(f"{params / 1e6:.0f}M parameters at its own width: not built")
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
            stride = _stride(model)
            side = GRID * stride[0]
            if side != GRID * stride[1]:
                raise ValueError(f"non-square stride {stride}")
            grid: Dict[str, Any] = {}
            if type(model).__name__ == "NaFlexVit":  # its default grid is pos_embed_grid_size, not img_size's
                grid = dict(pos_embed_grid_size=(GRID, GRID))
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, num_classes=CLASSES, img_size=side, **grid, **kwargs)
        except Exception as err:
            errors.append(first_line(err))
            continue
        if not isinstance(model, tuple(_import(path) for path in TIMM_CLASSES)):
            raise NotInZoo(f"{name} builds a {type(model).__module__}.{type(model).__qualname__}")
        m: Any = model
        width, heads = int(m.embed_dim), _heads(model)
        parts = [f"d{len(m.blocks)}", f"w{width}" + ("" if "embed_dim" in kwargs else " (own)"), f"h{heads}"]
        if "num_kv_heads" in kwargs:
            parts.append(f"kv {'/'.join(map(str, kwargs['num_kv_heads']))}")
        perturb(model, seed)
        return Built(model.eval(), sample(side), " ".join(parts) + f" {side}px ({GRID}x{GRID})", _timm_kind(model))
    raise RuntimeError(f"{name}: no small build worked: " + " | ".join(errors))


def _heads(model: nn.Module) -> int:
    blocks: Any = model.blocks
    return int(getattr(getattr(blocks[0], "attn", None), "num_heads", 0))


def timm_cases() -> List[Tuple[str, Callable[[], Built]]]:
    return [(name, lambda name=name: build_timm(name)) for name, _ in timm_architectures()]


# ---------------------------------------------------------------- torchvision

TORCHVISION = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")


def build_torchvision(name: str, seed: int = 0) -> Built:
    """torchvision ``name``'s patch size in a small ``VisionTransformer`` (the builders fix depth and width)."""
    from torchvision.models.vision_transformer import VisionTransformer

    patch = int(name.rsplit("_", 1)[1])
    side = GRID * patch
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=side, patch_size=patch, num_layers=DEPTH, num_heads=HEADS, hidden_dim=WIDTH,
                              mlp_dim=2 * WIDTH, num_classes=CLASSES)  # fmt: skip
    perturb(model, seed)
    size = f"d{DEPTH} w{WIDTH} h{HEADS} mlp{2 * WIDTH} {side}px ({GRID}x{GRID}), patch {patch}"
    return Built(model.eval(), sample(side), size, "torchvision")


def torchvision_cases() -> List[Tuple[str, Callable[[], Built]]]:
    return [(name, lambda name=name: build_torchvision(name)) for name in TORCHVISION]


# ---------------------------------------------------------------- transformers

HF_PATCH = 4


def _hf_vision_kwargs(config_name: str) -> Dict[str, Any]:
    cfg: Dict[str, Any] = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                               image_size=GRID * HF_PATCH, patch_size=HF_PATCH)  # fmt: skip
    if config_name.startswith("Dinov2"):
        cfg.update(mlp_ratio=2, layerscale_value=0.5)
        if "Registers" in config_name:
            cfg.update(num_register_tokens=3)
    elif config_name == "DINOv3ViTConfig":
        cfg.update(intermediate_size=2 * WIDTH, num_register_tokens=4, layerscale_value=0.5, key_bias=True)
    else:
        cfg.update(intermediate_size=2 * WIDTH)
    return cfg


def build_hf(name: str, attn: str = "sdpa", seed: int = 0) -> Built:
    """A tiny random-init ``transformers`` model of class ``name`` under ``attn_implementation=attn``."""
    import transformers

    cls = getattr(transformers, name)
    config_cls = cls.config_class
    vision = _hf_vision_kwargs(config_cls.__name__)
    if config_cls.__name__ in ("CLIPConfig", "SiglipConfig"):  # a vision tower inside a two-tower config
        text = dict(hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=HEADS, intermediate_size=2 * WIDTH)
        config = config_cls(vision_config=vision, text_config=text, num_labels=CLASSES)
    else:
        extra = dict(projection_dim=16) if config_cls.__name__ == "CLIPVisionConfig" else {}
        config = config_cls(**vision, **extra, num_labels=CLASSES)
    config._attn_implementation = attn
    for sub in ("vision_config", "text_config"):
        if getattr(config, sub, None) is not None:
            getattr(config, sub)._attn_implementation = attn
    torch.manual_seed(seed)
    model = cls(config).eval()
    perturb(model, seed)
    side = GRID * HF_PATCH
    if "DINOv3" in name:
        kind = "dinov3_backbone" if name.endswith("Backbone") else "dinov3"
    else:
        kind = "hf_backbone" if name.endswith("Backbone") else "hf"
    size = f"d{DEPTH} w{WIDTH} h{HEADS} {side}px ({GRID}x{GRID}), patch {HF_PATCH}"
    return Built(model, sample(side), size, kind)


def hf_supported() -> List[str]:
    from dsm_lightning.adapters.hf import SUPPORTED_HF_CLASSES
    from dsm_lightning.adapters.hf_dinov3 import _FAMILIES

    return list(SUPPORTED_HF_CLASSES) + [f.encoder for f in _FAMILIES]


def hf_cases() -> List[Tuple[str, Callable[[], Built]]]:
    import transformers

    cases: List[Tuple[str, Callable[[], Built]]] = []
    for name in hf_supported():
        for attn in ("sdpa", "eager"):
            cases.append((f"{name} ({attn})", lambda name=name, attn=attn: build_hf(name, attn)))
    for name in HF_UNCLAIMED:
        if hasattr(transformers, name):
            cases.append((f"{name} (sdpa, not claimed)", lambda name=name: build_hf(name, "sdpa")))
    return cases


# ---------------------------------------------------------------- report


def zoo_row(source: str, name: str, build: Callable[[], Built]) -> Dict[str, Any]:
    t0 = time.perf_counter()
    try:
        built = build()
    except NotInZoo:
        raise
    except Exception as err:  # not built: the model's own constructor, not DSM
        row: Dict[str, Any] = dict(source=source, architecture=name, cls="", size="", outcome="not built",
                                   check="", note=first_line(err), max_diff=None)  # fmt: skip
    else:
        cls = type(built.model)
        row = dict(source=source, architecture=name, cls=cls.__name__, size=built.size, **classify(built))
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def counts(rows: Sequence[Dict[str, Any]]) -> Dict[str, int]:
    outcomes = list(OUTCOMES) + sorted({r["outcome"] for r in rows} - set(OUTCOMES))
    return {o: sum(r["outcome"] == o for r in rows) for o in outcomes}


def summary_line(rows: Sequence[Dict[str, Any]]) -> str:
    def fmt(c: Dict[str, int]) -> str:
        return ", ".join(f"{n} {o}" for o, n in c.items() if n or o in OUTCOMES)

    per = "; ".join(f"{s}: {fmt(counts([r for r in rows if r['source'] == s]))}" for s in SOURCES)
    return f"**{len(rows)} models: {fmt(counts(rows))}** ({per})."


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown(rows: Sequence[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    env = meta["versions"]
    lines = [
        "# The zoo",
        "",
        "Every ViT architecture the adapters claim, built small with random weights (no downloads), through "
        "`apply_dsm` (`python -m benchmarks.zoo`, `benchmarks/zoo.py` says how each is built and classified). "
        f"timm {env['timm']}, torch {env['torch']}, torchvision {env['torchvision']}, transformers "
        f"{env['transformers']}; the whole run took {meta['seconds']:.0f} s on {env['threads']} torch thread(s) of a "
        f"{meta.get('cpus', '?')}-core machine. `timm.list_models()` names architectures (pretrained tags are "
        "not listed), so each architecture counts once.",
        "",
        summary_line(rows),
        "",
        "Outcomes: **correct**: default `apply_dsm(model)` works; its merged output equals the loop reference named "
        f"in *check* (`torch.allclose`, rtol = atol = {TOL:g}), is finite and has the dense shape; the merged "
        "tokens' sizes sum to the patch count; and the outputs under `DSMConfig(r=0)` and after `remove_dsm` are "
        "bit-identical (`torch.equal`) to the unpatched model's. **refused**: `apply_dsm` raised one of the "
        "package's errors with a one-line message (the note; full text in `zoo.json`). **wrong**: it ran but a "
        "check failed. **crashed**: any other exception. Sizes: `d` blocks, `w` channels (`own`: the "
        "architecture's own width, where its stem fixes it), `h` heads, `kv` key/value heads per block, the input "
        "in pixels and its patch grid. The note gives prefix + patch tokens in and out of the last block, and the "
        "largest difference from the reference.",
        "",
        "| outcome | " + " | ".join(SOURCES) + " | all |",
        "|---|" + "---|" * (len(SOURCES) + 1),
    ]
    for outcome in counts(rows):
        per = [sum(r["outcome"] == outcome and r["source"] == s for r in rows) for s in SOURCES]
        lines.append(f"| {outcome} | " + " | ".join(map(str, per)) + f" | {sum(per)} |")
    for source in SOURCES:
        part = [r for r in rows if r["source"] == source]
        if not part:
            continue
        lines += ["", f"## {source} ({len(part)})", "", "| architecture | class | size used | outcome | check | note |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in part:
            note = r["note"] if len(r["note"]) <= NOTE else r["note"][: NOTE - 1] + "…"
            cells = [f"`{r['architecture']}`", r["cls"], r["size"], f"**{r['outcome']}**", r["check"], note]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo"), help="writes <out>.md/.json")
    parser.add_argument("--source", choices=SOURCES, action="append", help="only these sources (repeatable)")
    parser.add_argument("--only", default="", help="only architectures whose name contains this")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm
    import torchvision
    import transformers

    transformers.logging.set_verbosity_error()
    builders = {"timm": timm_cases, "torchvision": torchvision_cases, "transformers": hf_cases}
    t0 = time.perf_counter()
    rows: List[Dict[str, Any]] = []
    left_out: List[str] = []
    for source in args.source or SOURCES:
        for name, build in builders[source]():
            if args.only and args.only not in name:
                continue
            try:
                row = zoo_row(source, name, build)
            except NotInZoo as err:
                left_out.append(str(err))
                continue
            rows.append(row)
            print(f"{source:12s} {name:50s} {row['outcome']:8s} {row['seconds']:6.2f}s {row['note'][:90]}", flush=True)
    seconds = time.perf_counter() - t0
    versions = dict(environment("cpu"), timm=timm.__version__, torchvision=torchvision.__version__,
                    transformers=transformers.__version__)  # fmt: skip
    size = dict(depth=DEPTH, width=WIDTH, heads=HEADS, classes=CLASSES, grid=GRID)
    meta = dict(versions=versions, seconds=round(seconds, 1), cpus=os.cpu_count(), counts=counts(rows),
                tolerance=TOL, size=size, random_init=True, left_out=left_out)  # fmt: skip
    write_report(args.out, meta, rows, markdown(rows, meta))
    return rows


if __name__ == "__main__":
    main()
