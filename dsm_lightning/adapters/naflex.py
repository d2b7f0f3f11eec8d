"""Adapter for timm's ``NaFlexVit`` (variable aspect ratio and resolution, ``patch_valid`` padding masks).

A ``NaFlexVit`` runs plain timm ``Block`` s or, with RoPE, SwiGLU, GQA or gated attention, ``EvaBlock`` s; each is
run as the timm and Eva adapters run it (RoPE from merged positions, :mod:`~dsm_lightning.adapters.rope`).

Two inputs:

* **Images** ``[B, C, H, W]``: one patch grid for the batch, merged as any timm ViT (fixed or adaptive merging, both
  position rules, ``forward_intermediates`` back on the dense grid).
* **NaFlex batches** (the collator's dict, or ``patches`` with ``patch_coord`` and ``patch_valid``): every image has
  its own grid, its valid patches first in raster order (the layout NaFlex's own RoPE assumes), padding behind. The
  patched model embeds the padded batch as NaFlex does, then runs the images of each grid size together on their
  valid tokens only: padding patches never merge, never receive a merge and are never attended to, and the
  attention mask follows the merge (there is none left to follow). The features come back in the padded layout
  (padding rows zero; NaFlex's pooling masks them with ``patch_valid``). A batch whose plan merges nothing runs
  NaFlex's own forward, bit-identical; delayed (dense) blocks of a merging plan equal NaFlex's to float precision
  (the same math without the padding), not bitwise.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from ..engine import BlockArgs, BlockCall
from ..merge import unmerge
from ..schedule import TokenPlan
from .base import Adapter, UnsupportedModelError, check_blocks, patched_adapter
from .eva import RopeInputs, TimmEvaAdapter, eva_types
from .rope import SUPPORTED_ROPES
from .timm import TimmViTAdapter, timm_types, vit_forward_intermediates

__all__ = ["TimmNaFlexAdapter"]

_VIT = TimmViTAdapter()


def _naflex_type() -> type:
    from timm.models.naflexvit import NaFlexVit

    return cast(type, NaFlexVit)


def _is_eva(block: nn.Module) -> bool:
    return isinstance(block, eva_types()[1])


def _dense_rope(model: Any, grid: Tuple[int, int]) -> Optional[Tensor]:
    """The rotary table NaFlex hands its blocks for one ``grid`` (None without RoPE)."""
    return None if model.rope is None else cast(Tensor, model.rope.get_embed(shape=grid))


def _grids(patch_coord: Tensor, patch_valid: Tensor) -> List[Tuple[int, int]]:
    """Each image's patch grid (from its coordinates, as NaFlex computes it); raises unless its valid patches are
    exactly that grid, first and in raster order."""
    from timm.models.naflexvit import calculate_naflex_grid_sizes

    grids: List[Tuple[int, int]] = calculate_naflex_grid_sizes(patch_coord)
    for i, (h, w) in enumerate(grids):
        n = h * w
        rows = torch.arange(h, device=patch_coord.device).repeat_interleave(w)
        cols = torch.arange(w, device=patch_coord.device).repeat(h)
        ok = int(patch_valid[i].sum()) == n and bool(patch_valid[i, :n].all())
        if not ok or not torch.equal(patch_coord[i, :n].long(), torch.stack([rows, cols], -1)):
            raise ValueError(
                f"image {i} of the NaFlex batch does not hold its {h}x{w} valid patches first, in raster order (the "
                f"layout of timm's NaFlex collator); DSM needs that layout: call remove_dsm(model) for this input"
            )
    return grids


def _forward_features(
    self: Any,
    patches: Tensor,
    patch_coord: Optional[Tensor] = None,
    patch_valid: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
) -> Union[Tensor, Dict[str, Tensor]]:
    """DSM version of ``NaFlexVit.forward_features``: images or a NaFlex batch, tokens back in the input layout."""
    if attn_mask is not None:
        raise ValueError("a DSM-patched NaFlexVit builds its attention mask from patch_valid; pass attn_mask=None")
    adapter: TimmNaFlexAdapter = patched_adapter(self)
    if patch_coord is None:
        tokens, grid = adapter.embed(self, patches)
        tokens, state = adapter.run(self, tokens, grid)
        return unmerge(self.norm(tokens), state, self.num_prefix_tokens)
    if patch_valid is None:
        patch_valid = torch.ones(patch_coord.shape[:2], dtype=torch.bool, device=patch_coord.device)
    grids = _grids(patch_coord, patch_valid.bool())
    if not any(b.merges for g in set(grids) for b in adapter.plan(self, g).blocks):
        dense: Dict[str, Tensor] = adapter.original_forward(self)(patches, patch_coord, patch_valid)
        return dense
    tokens = adapter.embed_naflex(self, patches, patch_coord, patch_valid)
    prefix = self.num_prefix_tokens
    out = tokens.new_zeros(tokens.shape)
    for grid in sorted(set(grids)):
        rows = [i for i, g in enumerate(grids) if g == grid]
        index = torch.tensor(rows, device=tokens.device)
        length = prefix + grid[0] * grid[1]
        merged, state = adapter.run(self, tokens[index, :length], grid)
        out[index, :length] = unmerge(self.norm(merged), state, prefix)
    return {"patches": out, "patch_valid": patch_valid}


def _forward_intermediates_naflex(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """DSM version of ``NaFlexVit.forward_intermediates``: for images (the timm adapter's, dense grid back)."""
    if isinstance(x, dict) or kwargs.get("patch_coord") is not None:
        raise ValueError(
            "forward_intermediates of a NaFlex (dict / patch_coord) batch is not available while DSM is applied; "
            "pass images [B, C, H, W] or call remove_dsm(model)"
        )
    kwargs.pop("patch_coord", None)
    kwargs.pop("patch_valid", None)
    return vit_forward_intermediates(self, x, *args, **kwargs)


class TimmNaFlexAdapter(TimmEvaAdapter):
    """timm ``NaFlexVit`` (plain ``Block`` or ``EvaBlock`` layers, learned / factorized position embeddings or any
    timm RoPE), on images and on NaFlex batches with ``patch_valid`` padding.

    Args:
        rope_position: As :class:`~dsm_lightning.adapters.TimmEvaAdapter`'s.
    """

    name = "timm-naflex"
    supports = "timm.models.naflexvit.NaFlexVit (timm Block / EvaBlock, any timm RoPE), images or NaFlex batches"

    def matches(self, model: nn.Module) -> bool:
        try:
            return isinstance(model, _naflex_type())
        except ImportError:
            return False

    def check(self, model: nn.Module) -> None:
        _, block_cls, attn_cls = timm_types()
        _, eva_blocks, eva_attns = eva_types()
        vit: Any = model
        check_blocks(vit.blocks, "NaFlexVit", {block_cls: (attn_cls,), **dict.fromkeys(eva_blocks, eva_attns)})
        rope = vit.rope
        if rope is not None and type(rope).__name__ not in SUPPORTED_ROPES:
            raise UnsupportedModelError(
                f"{type(rope).__qualname__} is a rotary embedding DSM cannot place merged tokens in; supported: "
                f"{', '.join(SUPPORTED_ROPES)}"
            )

    def grid(self, model: nn.Module, img_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        embeds: Any = cast(Any, model).embeds
        if img_size is None and embeds.default_img_size is None:
            rows, cols = embeds.pos_embed_grid_size or (16, 16)
        else:
            rows, cols = embeds.dynamic_feat_size(tuple(img_size or embeds.default_img_size))
        return int(rows), int(cols)

    def embed(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, Tuple[int, int]]:
        vit: Any = model
        x, grid = vit.embeds(images)
        if grid is None:
            raise ValueError("NaFlexVit.embeds gave no grid: pass images [B, C, H, W], or a NaFlex batch as a dict")
        return vit.norm_pre(x), (int(grid[0]), int(grid[1]))

    def embed_naflex(self, model: nn.Module, patches: Tensor, patch_coord: Tensor, patch_valid: Tensor) -> Tensor:
        """A NaFlex batch embedded as NaFlex does (its position embedding reads ``patch_coord``), padding kept."""
        vit: Any = model
        x, _ = vit.embeds(patches, patch_coord=patch_coord, patch_valid=patch_valid)
        return cast(Tensor, vit.norm_pre(x))

    def original_forward(self, model: nn.Module) -> Callable[..., Any]:
        """NaFlex's own ``forward_features``, bound to ``model``."""
        naflex: Any = _naflex_type()
        return cast(Callable[..., Any], naflex.forward_features.__get__(model))

    def block_inputs(self, model: nn.Module, plan: TokenPlan) -> Optional[BlockArgs]:
        vit: Any = model
        dense = _dense_rope(vit, plan.grid)
        if dense is None:
            return None
        return RopeInputs(vit.rope, dense, plan, self.rope_position, bool(vit.rope_is_mixed))

    def attend(
        self, block: nn.Module, x: Tensor, bias: Optional[Tensor], class_attention_prefix: Optional[int]
    ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        if _is_eva(block):
            return self.attend_rope(block, x, None, bias, class_attention_prefix)
        return _VIT.attend(block, x, bias, class_attention_prefix)

    def feed_forward(self, block: nn.Module, x: Tensor) -> Tensor:
        return super().feed_forward(block, x) if _is_eva(block) else _VIT.feed_forward(block, x)

    def run_block(self, block: nn.Module, x: Tensor, call: BlockCall) -> Tensor:
        return super().run_block(block, x, call) if _is_eva(block) else Adapter.run_block(self, block, x, call)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return cast(Sequence[nn.Module], cast(Any, model).blocks)

    def overrides(self) -> Dict[str, Callable[..., Any]]:
        return {"forward_features": _forward_features, "forward_intermediates": _forward_intermediates_naflex}
