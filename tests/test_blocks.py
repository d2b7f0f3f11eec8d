"""Every block runs through its own module call while patched: hooks fire with the planned token counts, and
wrappers around blocks (activation checkpointing, FSDP units) stay in the path and give the same outputs."""

from __future__ import annotations

import os
import socket

import pytest
import torch

from dsm_lightning import apply_dsm, remove_dsm, token_plan
from tests.conftest import images, tiny_vit

TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=3)


def torchvision_vit():
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64).eval()


def blocks_of(model):
    return list(model.blocks) if hasattr(model, "blocks") else list(model.encoder.layers)


@pytest.mark.parametrize("family", ["timm", "torchvision"])
def test_hooks_on_every_block_fire_with_the_planned_token_counts(family):
    model = tiny_vit() if family == "timm" else torchvision_vit()
    seen_in, seen_out = [], []
    handles = []
    for blk in blocks_of(model):
        handles.append(blk.register_forward_pre_hook(lambda m, args: seen_in.append(args[0].shape[1])))
        handles.append(blk.register_forward_hook(lambda m, args, out: seen_out.append(out.shape[1])))
    apply_dsm(model, delay=1, r=2, local_blocks=1)
    plan = token_plan(model)
    with torch.no_grad():
        model(images(batch=2))
    prefix = plan.num_prefix_tokens
    assert seen_in == [b.tokens_in + prefix for b in plan.blocks]
    assert seen_out == [b.tokens_out + prefix for b in plan.blocks]
    assert any(b.merges for b in plan.blocks)
    remove_dsm(model)
    for h in handles:
        h.remove()


def test_checkpoint_wrapped_blocks_run_patched_and_match():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    plain, wrapped = tiny_vit(), tiny_vit()
    wrapped.blocks = torch.nn.Sequential(*(checkpoint_wrapper(b) for b in wrapped.blocks))
    x = images(batch=2)
    for model in (plain, wrapped):
        apply_dsm(model, delay=1, r=3)
    with torch.no_grad():
        expected, out = plain(x), wrapped(x)
    assert torch.equal(out, expected)
    remove_dsm(wrapped)
    with torch.no_grad():
        assert torch.equal(wrapped(x), remove_dsm(plain)(x))


def _fsdp_worker(rank: int, world: int, port: int, x: torch.Tensor, expected: torch.Tensor, state: dict) -> None:
    import timm
    import torch.distributed as dist
    from timm.models.vision_transformer import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
        model.load_state_dict(state)
        sharded = FSDP(
            model,
            auto_wrap_policy=ModuleWrapPolicy({Block}),
            device_id=torch.device("cpu"),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
        )
        apply_dsm(sharded.module, delay=1, r=3)  # as DSMCallback does: after the strategy wrapped the blocks
        with torch.no_grad():
            out = sharded(x[rank::world])
        torch.testing.assert_close(out, expected[rank::world], rtol=0, atol=1e-5)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_per_block_sharding_gives_the_single_process_outputs():
    import timm
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", **TINY).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(batch=4)
    apply_dsm(model, delay=1, r=3)
    with torch.no_grad():
        expected = model(x)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_worker, args=(2, port, x, expected, state), nprocs=2, join=True)
