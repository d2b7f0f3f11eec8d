"""The README's custom-adapter example, run on a tiny ViT defined here; plus the shared guarantees for it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dsm_lightning import Adapter, apply_dsm, get_adapter, register_adapter, remove_dsm, token_plan, trace_tokens
from dsm_lightning.adapters import patched_adapter, registered_adapters
from dsm_lightning.merge import class_attention, unmerge


class Attn(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, bias=None, return_keys=False):
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = self.proj(F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).reshape(b, t, c))
        if not return_keys:
            return y
        return y, k.mean(1), class_attention(q, k, q.shape[-1] ** -0.5, bias, num_prefix=1)


class Blk(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attn(dim, heads), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, bias=None):
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class MyViT(nn.Module):
    def __init__(self, img_size=32, patch=4, dim=32, depth=5, heads=2, classes=4):
        super().__init__()
        self.img_size, self.patch, self.dim = img_size, patch, dim
        self.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, 1 + (img_size // patch) ** 2, dim) * 0.1)
        self.blocks = nn.ModuleList(Blk(dim, heads) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def embed(self, images):
        x = self.proj(images).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos

    def forward(self, images):
        x = self.embed(images)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def dsm_forward(self, images):
    adapter = patched_adapter(self)
    tokens, grid = adapter.embed(self, images)
    tokens, state = adapter.run(self, tokens, grid)
    return self.head(unmerge(self.norm(tokens), state, 1)[:, 0])


class MyViTAdapter(Adapter):
    name, supports = "myvit", "tests.MyViT"
    model_type = MyViT  # or its dotted name, "mypkg.models.MyViT"
    blocks_at, prefix_tokens, mlp_at = "blocks", 1, "mlp"  # where the blocks are, the class token, each MLP

    def grid(self, model, img_size=None):
        h, w = img_size or (model.img_size, model.img_size)
        return h // model.patch, w // model.patch

    def embed(self, model, images):
        return model.embed(images), self.grid(model, tuple(images.shape[-2:]))

    def attend(self, blk, x, bias, class_attention_prefix):
        y, keys, cls_attn = blk.attn(blk.norm1(x), bias, return_keys=True)  # cls_attn: for DSMConfig.protect
        return x + y, keys, cls_attn

    def feed_forward(self, blk, x):
        return x + blk.mlp(blk.norm2(x))

    def overrides(self):
        return {"forward": dsm_forward}


register_adapter(MyViTAdapter())


def test_custom_adapter_round_trip():
    torch.manual_seed(0)
    model = MyViT().eval()
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(get_adapter(model), MyViTAdapter)
    with torch.no_grad():
        ref = model(x)
        apply_dsm(model, delay=1, r=0)
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
        apply_dsm(model, delay=1, r=6, local_blocks=2)
        merged = model(x)
        plan = token_plan(model)
        seen = []
        trace_tokens(model, x, hook=lambda i, t, s: seen.append(t.shape[1] - 1))
        assert seen == [b.tokens_out for b in plan.blocks]
        remove_dsm(model)
        assert torch.equal(model(x), ref)
    assert not torch.allclose(merged, ref)
    assert plan.tokens_out < plan.num_patches


def test_the_declarations_give_the_parts_and_a_missing_one_is_named_at_registration():
    model = MyViT()
    adapter = get_adapter(model)
    assert list(adapter.blocks(model)) == list(model.blocks)
    assert adapter.num_prefix_tokens(model) == 1 and adapter.dims(model) == (32, 128)

    class Undeclared(Adapter):
        model_type = MyViT

        def grid(self, model, img_size=None):
            return (8, 8)

        def embed(self, model, images):
            raise NotImplementedError

        def attend(self, blk, x, bias, class_attention_prefix):
            raise NotImplementedError

        def feed_forward(self, blk, x):
            raise NotImplementedError

        def overrides(self):
            return {}

    missing = r"^Undeclared declares no blocks_at: set blocks_at = \.\.\. on the class, or override blocks\(\)"
    with pytest.raises(TypeError, match=missing):
        register_adapter(Undeclared())
    assert not any(isinstance(a, Undeclared) for a in registered_adapters())


def test_a_dotted_model_type_matches_along_the_class_hierarchy_without_importing():
    class Dotted(MyViTAdapter):
        model_type = ("not.installed.Model", f"{MyViT.__module__}.MyViT")

    class Sub(MyViT):
        pass

    assert Dotted().matches(Sub()) and not Dotted().matches(nn.Linear(2, 2))
