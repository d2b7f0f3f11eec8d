"""Merging under tools that run a block again or trace it: activation checkpointing, TorchScript tracing, and
models made late (``configure_model``)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from lightning.pytorch import LightningModule

from dsm_lightning import DSMCallback, DSMConfig, apply_dsm, dense_intermediates, is_patched
from tests.lightning_helpers import TINY_KW, make_image_folder, tiny_data, trainer

CONFIGS = [DSMConfig(), DSMConfig(delay=1, local_blocks=1, windows=4, r=2, metric="keys", protect=0.25)]


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", num_classes=3, **TINY_KW).eval()


def _loss_and_grads(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-6)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_wrapped_blocks_give_the_same_outputs_and_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    x = torch.randn(2, 3, 32, 32)
    for config in CONFIGS:
        plain, wrapped = _tiny(), _tiny()
        for i, block in enumerate(wrapped.blocks):
            wrapped.blocks[i] = checkpoint_wrapper(block)
        apply_dsm(plain, config)
        apply_dsm(wrapped, config)
        _assert_same(_loss_and_grads(plain, x), _loss_and_grads(wrapped, x))


def test_timm_grad_checkpointing_stays_on_while_patched():
    x = torch.randn(2, 3, 32, 32)
    for config in CONFIGS:
        plain, checkpointed = _tiny(), _tiny()
        checkpointed.set_grad_checkpointing(True)
        apply_dsm(plain, config)
        apply_dsm(checkpointed, config)
        calls: list = []
        for block in checkpointed.blocks:
            block.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        _assert_same(_loss_and_grads(plain, x), _loss_and_grads(checkpointed, x))
        depth = len(checkpointed.blocks)
        assert len(calls) == 2 * depth, "every block ran again in backward (checkpointing is on)"


def test_torchscript_trace_runs_protected_merging():
    model = apply_dsm(_tiny(), DSMConfig(protect=0.25))
    x = torch.randn(2, 3, 32, 32)
    traced = torch.jit.trace(model, x, check_trace=False)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-6)


def test_dense_intermediates_refuses_out_of_range_indices():
    model = apply_dsm(_tiny(), DSMConfig(r=2))
    x = torch.randn(1, 3, 32, 32)
    depth = len(model.blocks)
    assert sorted(dense_intermediates(model, x, [0, -1])) == [0, depth - 1]
    for bad in ([depth], [100], [-depth - 1]):
        try:
            dense_intermediates(model, x, bad)
        except IndexError as err:
            assert "out of range" in str(err)
        else:
            raise AssertionError(f"{bad} accepted")


class _MadeLate(LightningModule):
    """A LightningModule whose ViT is created (or replaced) in ``configure_model``."""

    def __init__(self, placeholder: bool) -> None:
        super().__init__()
        self.model = _tiny(1) if placeholder else None
        self.merged: list = []

    def configure_model(self) -> None:
        self.model = _tiny(2)

    def validation_step(self, batch, batch_idx):
        self.merged.append(is_patched(self.model))
        self.model(batch["image"])

    def data_config(self):
        return {"input_size": (3, 32, 32), "crop_pct": 1.0}


def test_callback_merges_a_vit_made_or_replaced_in_configure_model(tmp_path):
    data = make_image_folder(tmp_path / "imgs")
    for placeholder in (False, True):
        module, callback = _MadeLate(placeholder), DSMCallback(r=2, min_agreement=None)
        trainer(callbacks=[callback]).validate(module, datamodule=tiny_data(data))
        assert module.merged and all(module.merged), "the ViT that actually runs is merged"
        assert callback.metrics["dsm/flops_reduction"] > 1.0


def test_a_model_patched_by_hand_warns_when_it_runs_merged_in_training_mode():
    model = apply_dsm(_tiny(), DSMConfig(r=2)).train()
    with pytest.warns(UserWarning, match="running merged in training mode"):
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 3, 32, 32))  # evaluation: no warning
