"""Adapter for Hugging Face ``transformers`` vision encoders (ViT, DeiT, DINOv2 with and without registers, CLIP
vision, SigLIP vision), ``transformers>=5.18,<6``: the releases where every one of these families has the unified
layout read here (``q_proj``/``k_proj``/``v_proj`` attention, the encoder holding its layers, attention through
``ALL_ATTENTION_FUNCTIONS``). 5.0-5.17 moved these families to it one by one; 4.x used another layout.

The patch swaps the class of the *encoder* (``ViTModel``, ``Dinov2Model``, ``CLIPVisionModel`` ...): its ``forward``
embeds, runs the layers with merging and unmerges the tokens to the dense layout before the final norm, so
``last_hidden_state`` has its usual shape and meaning and every head on top (``ViTForImageClassification``'s
classifier, DINOv2's class-token + patch-mean head, CLIP's projection, SigLIP's attention pooling) runs unchanged on
it. A task model (``...ForImageClassification``, ``CLIPVisionModelWithProjection``) is patched through the encoder it
holds; ``apply_dsm`` takes either.

Dense blocks run HF's own layer forward. Merging blocks, and blocks that need the log-size bias, compute the same
attention from the layer's own ``q_proj``/``k_proj``/``v_proj`` through HF's attention function for the model's
``attn_implementation`` (``"sdpa"`` keeps the fused kernel, the bias goes in as the additive mask; ``"eager"`` runs
the family's eager function), so LayerScale, drop-path and each family's softmax precision are kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

from torch import Tensor, nn

from ..merge import MergeState, class_attention, unmerge
from .base import Adapter, UnsupportedModelError, original_class, patched_adapter, unwrap_block

__all__ = ["HuggingFaceViTAdapter", "hf_attention_with_metric", "SUPPORTED_HF_CLASSES"]

#: Attention implementations a merging block can run: both take an additive float mask.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class Layer:
    """How one ``transformers`` layer class is laid out: the attribute names its attention and MLP halves use."""

    attention: str  # the self-attention module (q_proj / k_proj / v_proj)
    norms: Tuple[str, str]  # the norms before attention and before the MLP
    scales: Tuple[str, ...] = ()  # LayerScale after attention and after the MLP (none: ())
    drop: str = ""  # dropout / drop-path on both residual branches ("": none)


_VIT_LAYER = Layer("attention", ("layernorm_before", "layernorm_after"), drop="dropout")
_DINOV2_LAYER = Layer("attention", ("norm1", "norm2"), ("layer_scale1", "layer_scale2"), "drop_path")
_CLIP_LAYER = Layer("self_attn", ("layer_norm1", "layer_norm2"))


@dataclass(frozen=True)
class Family:
    """One ``transformers`` vision encoder, declared: where things are (attribute paths on the encoder / its layers)
    and what its forward does around the layers. Nothing about a family is probed at run time."""

    encoder: str  # encoder class name
    module: str  # module that defines it
    layer: str  # layer class name
    layout: Layer  # the layer's layout
    layers: str = "encoder.layers"  # attribute path of the layer list on the encoder
    wrappers: Tuple[str, ...] = ()  # task models holding the encoder as ``getattr(model, attr)``
    attr: str = ""  # the attribute the task models keep the encoder under
    prefix: int = 1  # class (+ distillation) tokens; registers come on top
    registers: bool = False  # ``config.num_register_tokens`` register tokens follow the class token
    cast_pixels: bool = False  # the forward casts pixels to the patch projection's dtype
    interpolate: bool = True  # the embeddings take ``interpolate_pos_encoding`` (DINOv2 always interpolates)
    pre_norm: str = ""  # a norm on the embeddings before the layers
    final_norm: str = ""  # the norm on the sequence after the layers
    pool: str = ""  # pooler_output: "pooler" (module on the sequence), "class" (the class token), "class_norm"
    # (post-norm on the un-normed class token: CLIP), "head" (attention-pooling head, SigLIP)
    backbone: bool = False  # a ``...Backbone``: feature maps of every stage instead of a sequence
    pixels: str = "embeddings.patch_embeddings.projection.weight"  # whose dtype ``cast_pixels`` casts to
    masked_pos: bool = False  # the embeddings take ``bool_masked_pos`` (a mask token replaces masked patches)
    mlp_in: str = "fc1"  # the MLP's first linear layer (its width: the hidden size for FLOP estimates)


_VIT = "transformers.models.vit.modeling_vit"
_DEIT = "transformers.models.deit.modeling_deit"
_DINOV2 = "transformers.models.dinov2.modeling_dinov2"
_DINOV2_REG = "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers"
_CLIP = "transformers.models.clip.modeling_clip"
_SIGLIP = "transformers.models.siglip.modeling_siglip"

_FAMILIES = (
    Family("ViTModel", _VIT, "ViTLayer", _VIT_LAYER, "layers", ("ViTForImageClassification",), "vit",
            cast_pixels=True, final_norm="layernorm", pool="pooler"),
    Family("DeiTModel", _DEIT, "DeiTLayer", _VIT_LAYER, "layers",
            ("DeiTForImageClassification", "DeiTForImageClassificationWithTeacher"), "deit", prefix=2,
            cast_pixels=True, final_norm="layernorm", pool="pooler"),
    Family("Dinov2Model", _DINOV2, "Dinov2Layer", _DINOV2_LAYER, "encoder.layer", ("Dinov2ForImageClassification",),
            "dinov2", interpolate=False, final_norm="layernorm", pool="class"),
    Family("Dinov2WithRegistersModel", _DINOV2_REG, "Dinov2WithRegistersLayer", _DINOV2_LAYER, "encoder.layer",
            ("Dinov2WithRegistersForImageClassification",), "dinov2_with_registers", registers=True,
            interpolate=False, final_norm="layernorm", pool="class"),
    Family("Dinov2Backbone", _DINOV2, "Dinov2Layer", _DINOV2_LAYER, "encoder.layer", interpolate=False,
            backbone=True),
    Family("Dinov2WithRegistersBackbone", _DINOV2_REG, "Dinov2WithRegistersLayer", _DINOV2_LAYER, "encoder.layer",
            registers=True, interpolate=False, backbone=True),
    Family("CLIPVisionModel", _CLIP, "CLIPEncoderLayer", _CLIP_LAYER, "encoder.layers",
            ("CLIPVisionModelWithProjection", "CLIPForImageClassification"), "vision_model", pre_norm="pre_layrnorm",
            pool="class_norm"),
    Family("SiglipVisionModel", _SIGLIP, "SiglipEncoderLayer", _CLIP_LAYER, "encoder.layers",
            ("SiglipForImageClassification",), "vision_model", prefix=0, final_norm="post_layernorm", pool="head"),
)  # fmt: skip
#: Every supported class name (encoders first, then task models).
SUPPORTED_HF_CLASSES: Tuple[str, ...] = tuple(f.encoder for f in _FAMILIES) + tuple(
    w for f in _FAMILIES for w in f.wrappers
)


def _layout(layer: nn.Module, families: Sequence[Family]) -> Layer:
    """The declared layout of a (patched) layer, found by module and name along its class's MRO."""
    layers = {(f.module, f.layer): f.layout for f in families}
    for cls in type(layer).__mro__:
        found = layers.get((cls.__module__, cls.__name__))
        if found is not None:
            return found
    raise UnsupportedModelError(f"{type(layer).__qualname__} is not a supported transformers layer")


def _apply(owner: Any, name: str, x: Tensor) -> Tensor:
    """``owner.<name>(x)``; ``x`` itself when the declaration leaves the step out (``name == ""``)."""
    return cast(Tensor, getattr(owner, name)(x)) if name else x


def _lookup(model: nn.Module, families: Sequence[Family]) -> Optional[Tuple[Family, bool]]:
    """``(family, is_encoder)`` for a supported ``transformers`` model (patched or not), else None. Matches by the
    class's own module and name along its MRO, so ``transformers`` is never imported for a non-HF model."""
    for cls in type(model).__mro__:
        module = cls.__module__
        if not module.startswith("transformers."):
            continue
        for family in families:
            if module == family.module and cls.__name__ == family.encoder:
                return family, True
            if module == family.module and cls.__name__ in family.wrappers:
                return family, False
    return None


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def hf_attention_with_metric(
    attn: Any,
    x: Tensor,
    bias: Optional[Tensor],
    num_prefix: Optional[int] = None,
    rope: Optional[Tuple[Tensor, Tensor]] = None,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """A ``transformers`` self-attention (``q_proj``/``k_proj``/``v_proj`` + ``o_proj`` or ``out_proj``) with an
    additive ``bias`` ``[B, 1, 1, T]``, through HF's own attention function for the model's ``attn_implementation``.

    Returns ``(out, keys per head [B, heads, T, head_dim], cls_attn or None)`` like the timm adapter's
    :func:`~dsm_lightning.adapters.timm.attention_with_metric`. ``rope`` (``(cos, sin)`` of the current patch
    tokens) rotates queries and keys with the family's own ``apply_rotary_pos_emb`` (patch tokens only); the metric
    is taken before the rotation, the class attention after it.
    """
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    batch, n, _ = x.shape
    shape = (batch, n, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    metric = k
    if rope is not None:
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, *rope)
    scaling = float(getattr(attn, "scaling", getattr(attn, "scale", attn.head_dim**-0.5)))
    cls_attn = None if num_prefix is None else class_attention(q, k, scaling, bias, num_prefix)
    impl = attn.config._attn_implementation
    if impl == "eager":
        fn = sys.modules[type(attn).__module__].eager_attention_forward  # the family's own (softmax precision)
    else:
        fn = ALL_ATTENTION_FUNCTIONS[impl]
    dropout = getattr(attn, "attention_dropout", getattr(attn, "dropout", 0.0))
    out, _ = fn(attn, q, k, v, bias, dropout=float(dropout) if attn.training else 0.0, scaling=scaling)
    out = out.reshape(batch, n, -1).contiguous()
    proj = attn.o_proj if hasattr(attn, "o_proj") else attn.out_proj
    return proj(out), metric, cls_attn


def _embed(
    encoder: Any, family: Family, pixel_values: Tensor, interpolate: bool, masked: Optional[Tensor] = None
) -> Tensor:
    """The encoder's embedding (and pre-norm), exactly as its own ``forward`` does before the layers."""
    if family.cast_pixels:
        pixel_values = pixel_values.to(_get(encoder, family.pixels).dtype)
    kwargs: Dict[str, Any] = {"interpolate_pos_encoding": interpolate} if family.interpolate else {}
    if family.masked_pos:
        kwargs["bool_masked_pos"] = masked
    return _apply(encoder, family.pre_norm, encoder.embeddings(pixel_values, **kwargs))


def _tail(encoder: Any, family: Family, dense: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """``(last_hidden_state, pooler_output)`` from the unmerged tokens after the last layer, as the encoder's own
    ``forward`` computes them (SigLIP's attention pooling over the dense layout is size-weighted)."""
    seq = _apply(encoder, family.final_norm, dense)
    pooled: Optional[Tensor] = None
    if family.pool == "pooler" and encoder.pooler is not None:
        pooled = encoder.pooler(seq)
    elif family.pool == "class":
        pooled = seq[:, 0, :]
    elif family.pool == "class_norm":
        pooled = encoder.post_layernorm(dense[:, 0, :])
    elif family.pool == "head" and encoder.use_head:
        pooled = encoder.head(seq)
    return seq, pooled


def _forward(
    self: Any,
    pixel_values: Optional[Tensor] = None,
    bool_masked_pos: Optional[Tensor] = None,
    interpolate_pos_encoding: Optional[bool] = None,
    attention_mask: Optional[Tensor] = None,
    **kwargs: Any,
) -> Any:
    """DSM version of the encoder's ``forward``: same arguments and outputs, tokens come back in the dense layout.

    ``output_hidden_states=True`` gives every layer's output unmerged to the dense layout (the embeddings first, as
    HF does); ``output_attentions=True`` is refused (attention maps between merged tokens have no dense meaning).
    """
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    if pixel_values is None:
        raise ValueError("You have to specify pixel_values")
    adapter: HuggingFaceViTAdapter = patched_adapter(self)
    family = adapter.family(self)
    if (bool_masked_pos is not None and not family.masked_pos) or attention_mask is not None:
        raise ValueError(
            "a DSM-patched model takes no bool_masked_pos / attention_mask (masked-image training); call "
            "remove_dsm(model) to use them"
        )
    config = self.config
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        raise ValueError(
            "output_attentions=True is not available while DSM is applied (attention between merged tokens has no "
            "dense meaning); call remove_dsm(model), or pass output_attentions=False"
        )
    want_hidden = kwargs.get("output_hidden_states")
    if want_hidden is None:
        want_hidden = bool(getattr(config, "output_hidden_states", False))
    backbone = family.backbone  # its feature maps read every stage's output
    prefix = adapter.num_prefix_tokens(self)
    tokens = _embed(self, family, pixel_values, bool(interpolate_pos_encoding), bool_masked_pos)
    grid = adapter.grid(self, (int(pixel_values.shape[-2]), int(pixel_values.shape[-1])))
    states: List[Tensor] = [tokens]  # embeddings, then every layer's output unmerged to the dense layout

    def keep(index: int, x: Tensor, state: MergeState) -> None:
        states.append(unmerge(x, state, prefix))

    tokens, state = adapter.run(self, tokens, grid, keep if want_hidden or backbone else None)
    hidden = tuple(states) if want_hidden else None
    out: Any
    if backbone:
        out = adapter.backbone_output(self, states, grid, hidden)
    else:
        seq, pooled = _tail(self, family, unmerge(tokens, state, prefix))
        out = BaseModelOutputWithPooling(last_hidden_state=seq, pooler_output=pooled, hidden_states=hidden)
    return out if kwargs.get("return_dict", True) is not False else out.to_tuple()


def _feature_maps(backbone: Any, states: List[Tensor], grid: Tuple[int, int], prefix: int) -> Any:
    """``Dinov2(WithRegisters)Backbone``'s ``feature_maps``: the ``out_features`` stages (``stem`` = embeddings,
    ``stageN`` = layer N) of the dense-layout ``states``, normed and reshaped to NCHW as its own ``forward`` does, so
    DPT / Depth Anything necks read them unchanged."""
    config = backbone.config
    maps: List[Tensor] = []
    for stage, state in zip(backbone.stage_names, states):
        if stage not in backbone.out_features:
            continue
        if config.apply_layernorm:
            state = backbone.layernorm(state)
        if config.reshape_hidden_states:
            state = state[:, prefix:].reshape(state.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
        maps.append(state)
    return tuple(maps)


class HuggingFaceViTAdapter(Adapter):
    """Hugging Face ``transformers`` (>=5.18) ViT, DeiT, DINOv2 (+ registers), CLIP and SigLIP vision encoders, their
    image-classification / projection models, and the DINOv2 backbones (``Dinov2Backbone``, as used by DPT and
    Depth Anything)."""

    name = "transformers"
    supports = "transformers " + ", ".join(SUPPORTED_HF_CLASSES) + " (transformers>=5.18,<6)"
    block_args = (None,)  # HF layers take the attention mask positionally (CLIP's and SigLIP's require it)
    #: The families this adapter runs, declared (a new family is one more entry, plus the hooks it needs).
    families: Tuple[Family, ...] = _FAMILIES

    def matches(self, model: nn.Module) -> bool:
        return _lookup(model, self.families) is not None

    def family(self, model: nn.Module) -> Family:
        """The layout description of ``model``'s family."""
        found = _lookup(model, self.families)
        if found is None:
            raise UnsupportedModelError(f"{type(model).__qualname__} is not a supported transformers vision model")
        return found[0]

    def core(self, model: nn.Module) -> nn.Module:
        family, is_encoder = cast(Tuple[Family, bool], _lookup(model, self.families))
        return model if is_encoder else cast(nn.Module, getattr(model, family.attr))

    def check(self, model: nn.Module) -> None:
        family = self.family(model)
        for i, module in enumerate(self.blocks(model)):
            cls = original_class(module)
            if cls.__name__ != family.layer or cls.__module__ != family.module:
                raise UnsupportedModelError(
                    f"layer {i} is {cls.__module__}.{cls.__qualname__}; DSM's transformers adapter supports "
                    f"{family.module}.{family.layer} for {family.encoder}"
                )
            attn = getattr(unwrap_block(module), family.layout.attention)
            if not all(hasattr(attn, name) for name in ("q_proj", "k_proj", "v_proj", "config", "head_dim")):
                import transformers

                raise UnsupportedModelError(
                    f"{family.encoder} from transformers {transformers.__version__} has the older attention layout; "
                    f"DSM's transformers adapter needs transformers>=5.18,<6: pip install 'dsm-lightning[hf]'"
                )
            impl = attn.config._attn_implementation
            if impl not in ATTENTION_IMPLEMENTATIONS:
                raise UnsupportedModelError(
                    f"{family.encoder} runs attn_implementation={impl!r}; merging needs an additive attention mask: "
                    f"load the model with attn_implementation='sdpa' (fused) or 'eager'"
                )

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return cast(Sequence[nn.Module], _get(self.core(model), self.family(model).layers))

    def num_prefix_tokens(self, model: nn.Module) -> int:
        family = self.family(model)
        registers = int(cast(Any, self.core(model)).config.num_register_tokens) if family.registers else 0
        return family.prefix + registers

    def _patch_size(self, model: nn.Module) -> Tuple[int, int]:
        p = cast(Any, self.core(model)).config.patch_size
        return (int(p[0]), int(p[1])) if isinstance(p, (tuple, list)) else (int(p), int(p))

    def grid(self, model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        if img_size is None:
            size = cast(Any, self.core(model)).config.image_size
            img_size = (size[0], size[1]) if isinstance(size, (tuple, list)) else (size, size)
        ph, pw = self._patch_size(model)
        return int(img_size[0]) // ph, int(img_size[1]) // pw

    def dims(self, model: nn.Module) -> Tuple[int, int]:
        config: Any = self.core(model).config
        dim = int(config.hidden_size)
        fc1 = getattr(cast(Any, unwrap_block(self.blocks(model)[0])).mlp, self.family(model).mlp_in, None)
        hidden = int(fc1.out_features) if isinstance(fc1, nn.Linear) else 4 * dim
        return dim, hidden

    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        family = self.family(model)
        encoder = self.core(model)
        # Dinov2 interpolates always; the others are asked to, so any multiple of the patch size runs.
        tokens = _embed(encoder, family, images, True)
        return tokens, self.grid(model, (int(images.shape[-2]), int(images.shape[-1])))

    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return self.attend_rope(block, x, None, bias, class_attention_prefix)

    def attend_rope(
        self,
        block: nn.Module,
        x: Tensor,
        rope: Optional[Tuple[Tensor, Tensor]],
        bias: Optional[Tensor],
        prefix: Optional[int],
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The attention half of a layer with its residual; ``rope`` (``(cos, sin)`` of the current patch tokens)
        for a RoPE family."""
        layer: Any = block
        layout = _layout(block, self.families)
        attn = getattr(layer, layout.attention)
        y, metric, cls_attn = hf_attention_with_metric(attn, getattr(layer, layout.norms[0])(x), bias, prefix, rope)
        if layout.scales:
            y = getattr(layer, layout.scales[0])(y)
        return x + _apply(layer, layout.drop, y), metric, cls_attn

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        layer: Any = block
        layout = _layout(block, self.families)
        y = layer.mlp(getattr(layer, layout.norms[1])(x))
        if layout.scales:
            y = getattr(layer, layout.scales[1])(y)
        return x + _apply(layer, layout.drop, y)

    def backbone_output(
        self, backbone: nn.Module, states: List[Tensor], grid: Tuple[int, int], hidden: Optional[Tuple[Tensor, ...]]
    ) -> Any:
        """A backbone family's output from every stage in the dense layout (the embeddings, then each layer)."""
        from transformers.modeling_outputs import BackboneOutput

        maps = _feature_maps(backbone, states, grid, self.num_prefix_tokens(backbone))
        return BackboneOutput(feature_maps=maps, hidden_states=hidden)

    def overrides(self) -> Dict[str, Callable[..., Any]]:
        return {"forward": _forward}
