"""Bad input gets a clear error that names the limit or the fix."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from dsm_lightning import DSMConfig, UnsupportedModelError, apply_dsm, token_plan
from tests.conftest import images, tiny_vit


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(delay=-1), "delay must be >= 0"),
        (dict(r=-2), "r must be >= 0"),
        (dict(r=[1, -1]), r"r\[1\]"),
        (dict(local_blocks=-1), "local_blocks must be >= 0"),
        (dict(windows=3), "perfect square"),
        (dict(windows=(0, 2)), ">= 1"),
        (dict(flops_target=0.0), "flops_target"),
        (dict(delay=1.5), "delay must be an int"),
        (dict(r=0.7), r"fractional r must be in \(0, 0.5\]"),
        (dict(schedule="linear"), "schedule must be"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DSMConfig(**kwargs)


def test_delay_at_least_depth():
    with pytest.raises(ValueError, match=r"delay=6 must be < depth=6.*delay <= 5"):
        apply_dsm(tiny_vit(), delay=6, r=1)


def test_r_too_large_names_maximum():
    # 8x8 = 64 patches, global merging from block 0: at most 32.
    with pytest.raises(ValueError, match=r"r=40 is too large at block 0: 64 patch tokens can merge at most 32"):
        apply_dsm(tiny_vit(), delay=0, r=40, local_blocks=0)
    # local phase: 4 windows of 16 patches -> at most 8 each -> r <= 32
    with pytest.raises(ValueError, match=r"the largest r here is 32"):
        apply_dsm(tiny_vit(), delay=0, r=33, local_blocks=1)


def test_per_block_r_checked_at_every_block():
    with pytest.raises(ValueError, match="too large at block 3"):
        apply_dsm(tiny_vit(), delay=0, local_blocks=0, r=[30, 16, 9, 5, 0, 0])
    with pytest.raises(ValueError, match="inside the delay"):
        apply_dsm(tiny_vit(), delay=2, local_blocks=0, r=[1, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="one entry per block"):
        apply_dsm(tiny_vit(), r=[1, 2])


def test_too_many_windows_for_grid():
    with pytest.raises(ValueError, match="needs a patch grid of at least 9x9"):
        apply_dsm(tiny_vit(), windows=81, r=2, local_blocks=2)
    with pytest.raises(ValueError, match="single patch"):
        token_plan(depth=4, grid=(2, 2), num_prefix_tokens=1, windows=4, r=1, delay=0, local_blocks=2)


def test_local_blocks_past_depth():
    with pytest.raises(ValueError, match="local_blocks <= 2"):
        apply_dsm(tiny_vit(), delay=4, local_blocks=3, r=2)


def test_unknown_field():
    with pytest.raises(TypeError, match="unknown DSMConfig field"):
        apply_dsm(tiny_vit(), ratio=3)


def test_non_vit_model_lists_supported_types():
    with pytest.raises(
        UnsupportedModelError, match=r"no adapter for .*Sequential.*Supported: .*timm.*torchvision.*Custom ViTs"
    ):
        apply_dsm(nn.Sequential(nn.Linear(2, 2)))


def test_unsupported_block_type_named():
    from timm.models.vision_transformer import ResPostBlock

    model = tiny_vit(block_fn=ResPostBlock)
    with pytest.raises(UnsupportedModelError, match=r"block 0 is .*ResPostBlock"):
        apply_dsm(model, r=2)


def test_input_too_small_at_run_time():
    model = apply_dsm(tiny_vit(dynamic_img_size=True), delay=0, r=8, local_blocks=0)
    with pytest.raises(ValueError, match="too large at block 0"):
        model(images(size=(12, 12)))  # 3x3 = 9 patches


def test_patch_dropout_in_training_refused():
    model = apply_dsm(tiny_vit(patch_drop_rate=0.5), r=2).train()
    with pytest.raises(RuntimeError, match=r"model.eval"):
        model(images())


def test_user_attn_mask_refused():
    model = apply_dsm(tiny_vit(), r=2)
    with pytest.raises(ValueError, match="remove_dsm"):
        model.forward_features(images(), attn_mask=torch.zeros(1))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (
            ["predict", "--dsm.delya=4"],
            r"^dsm-lightning predict: error: .*--dsm\.delya=4 \(did you mean --dsm\.delay\?\)$",
        ),
        (["predict", "--data.batch_size=abc"], r"^dsm-lightning predict: error: .*data\.batch_size.*abc$"),
        (["predict", "--config=missing.yaml"], r"^dsm-lightning predict: error: .*missing\.yaml'?$"),
        (
            ["predict", "--config=typo.yaml"],
            r"^dsm-lightning predict: error: .*'data\.batchsize' \(did you mean data\.batch_size\?\)$",
        ),
    ],
)
def test_command_line_mistakes_print_one_line_and_the_help_command(argv, match, capsys, tmp_path, monkeypatch):
    from dsm_lightning.app.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "typo.yaml").write_text("data:\n  batchsize: 16\n")  # a misspelt key in a config file
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[1] == "(options: dsm-lightning predict --help)", lines
    assert re.match(match, lines[0]), lines[0]


def test_misspelt_model_name_suggests_close_timm_names():
    from dsm_lightning.app.module import build_model

    with pytest.raises(
        ValueError, match=r"unknown timm model 'vit_smal_patch16_224'; did you mean 'vit_small_patch16_"
    ):
        build_model("vit_smal_patch16_224")


@pytest.mark.parametrize("name", ["vit_smal_patch14_dinov2", "resnet5", "convnext_tiy", "deit_smal_patch16_224"])
def test_model_name_suggestions_are_only_models_dsm_supports(name):
    import timm

    from dsm_lightning import apply_dsm
    from dsm_lightning.app.module import build_model

    with pytest.raises(ValueError, match="unknown timm model") as refused:
        build_model(name)
    message = str(refused.value)
    hint = message.split("did you mean", 1)[1].split("?")[0] if "did you mean" in message else ""
    suggested = re.findall(r"'([\w.]+)'", hint)
    if name.startswith(("resnet", "convnext")):
        assert not suggested, "no ResNet or ConvNeXt is offered"
    else:
        assert suggested
    for close in suggested:  # each suggestion builds and patches
        model = timm.create_model(close, pretrained=False, img_size=32, patch_size=8, depth=1, num_classes=2)
        apply_dsm(model, r=1)


def test_console_prints_user_errors_in_one_line_and_keeps_tracebacks_for_bugs(capsys, monkeypatch):
    from dsm_lightning.app.console import TRACEBACK_ENV, run_console
    from dsm_lightning.errors import InputError

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)

    def user_mistake():
        raise InputError("cannot read image 'x.png'; remove or replace the file")

    with pytest.raises(SystemExit) as exit_info:
        run_console(user_mistake, "prog")
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        "prog: error: InputError: cannot read image 'x.png'; remove or replace the file"
    )
    for bug in (KeyError("state"), TypeError("unsupported operand"), RuntimeError("shape mismatch")):

        def broken(err=bug):
            raise err

        with pytest.raises(type(bug)):
            run_console(broken, "prog")
