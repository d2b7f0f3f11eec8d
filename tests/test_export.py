"""ONNX export of merged models: ONNX Runtime gives the eager merged outputs, for every family and option."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsm_lightning import DSMConfig, apply_dsm, remove_dsm
from dsm_lightning.export import ExportError, _umask, check_onnx, compare_onnx, export_onnx, read_metadata
from dsm_lightning.merge import stable_argsort

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

#: ONNX Runtime's kernels round differently from PyTorch's; a flipped merge would differ by far more than this.
TOL = 1e-4


def _timm(depth: int = 3):
    import timm

    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=64, patch_size=8, depth=depth, embed_dim=48, num_heads=3, num_classes=7
    ).eval()


def _images(batch: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 4), min_size=1, max_size=40), min_size=1, max_size=3).filter(
        lambda rows: len({len(r) for r in rows}) == 1
    ),
    st.booleans(),
)
def test_stable_argsort_while_exporting_equals_the_stable_sort(rows, descending):
    values = torch.tensor(rows, dtype=torch.float32)  # few distinct values: many ties
    want = values.argsort(dim=-1, descending=descending, stable=True)
    exporting = torch.compiler.is_exporting
    torch.compiler.is_exporting = lambda: True  # the branch torch.export takes
    try:
        got = stable_argsort(values, descending=descending)
    finally:
        torch.compiler.is_exporting = exporting
    assert torch.equal(got, want)


def test_default_config_with_dynamic_batch(tmp_path, capfd):
    model = apply_dsm(_timm(), DSMConfig())
    path = export_onnx(model, tmp_path / "m.onnx", 64)
    capfd.readouterr()
    for batch in (1, 3):
        assert check_onnx(model, path, _images(batch)) < TOL
    assert "onnxruntime" not in capfd.readouterr().err, "no ONNX Runtime warnings (CastLike constant folding)"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask(), "the umask's permissions, not mkstemp's 0600"
    assert compare_onnx(model, path, _images(4)) == {"max_abs_diff": pytest.approx(0, abs=TOL), "top1_agreement": 1.0}
    meta = read_metadata(path)
    assert meta["dsm_config"] == DSMConfig().to_dict()
    assert meta["input_size"] == [3, 64, 64]
    assert meta["tokens_per_block"][0] == 65 and meta["tokens_per_block"][-1] < 65


@pytest.mark.parametrize(
    "config",
    [
        DSMConfig(delay=1, local_blocks=1, r=4, metric="keys", protect=0.25),
        DSMConfig.tome(4),
        DSMConfig(r=0.2, prop_attn=False, protect=0.0),
    ],
    ids=["delay-local-keys-protect", "tome", "proportional-no-propattn"],
)
def test_every_option_exports_exactly(tmp_path, config):
    model = apply_dsm(_timm(), config)
    path = export_onnx(model, tmp_path / "m.onnx", 64, dynamic_batch=False, batch_size=2)
    assert check_onnx(model, path, _images(2)) < TOL


def test_r0_export_equals_the_dense_export(tmp_path):
    import onnxruntime as ort

    model = _timm(depth=2)
    dense = export_onnx(model, tmp_path / "dense.onnx", 64, dynamic_batch=False)
    r0 = export_onnx(apply_dsm(model, DSMConfig(r=0)), tmp_path / "r0.onnx", 64, dynamic_batch=False)
    x = _images(2).numpy()
    outs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
        for p in (dense, r0)
    ]
    assert abs(outs[0] - outs[1]).max() == 0.0
    assert read_metadata(dense)["dsm_config"] is None


def test_torchvision_and_transformers_export_exactly(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    tv = VisionTransformer(
        image_size=64, patch_size=8, num_layers=3, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=5
    ).eval()
    apply_dsm(tv, DSMConfig(r=6))
    path = export_onnx(tv, tmp_path / "tv.onnx", 64, dynamic_batch=False)
    assert check_onnx(tv, path, _images(2)) < TOL
    cfg = Dinov2Config(
        image_size=64, patch_size=8, num_hidden_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64
    )
    hf = Dinov2Model(cfg).eval()
    apply_dsm(hf, DSMConfig(r=6, delay=1, local_blocks=1))
    path = export_onnx(hf, tmp_path / "hf.onnx", 64, dynamic_batch=False)
    assert check_onnx(hf, path, _images(2)) < TOL  # the backbone's last_hidden_state, in the dense layout


def test_export_refuses_what_it_should(tmp_path, monkeypatch):
    model = apply_dsm(_timm(depth=1), DSMConfig(r=4))
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="exists"):
        export_onnx(model, target, 64)
    assert target.read_bytes() == b"keep me"
    with pytest.raises(ExportError, match=r"model.eval\(\)"):
        export_onnx(model.train(), tmp_path / "t.onnx", 64)
    model.eval()
    import math
    import time
    from pathlib import Path

    start = time.perf_counter()
    for bad, match in [
        ({"dsm_config": None, "input_size": [3, 999, 999]}, r"\['dsm_config', 'input_size'\] are DSM's own record"),
        ({"tokens_per_block": []}, "DSM's own record"),
        ({"where": Path("x")}, "must be JSON values"),
        ({"loss": math.nan}, "must be JSON values"),
        ({"tags": {1, 2}}, "must be JSON values"),
    ]:
        with pytest.raises(ExportError, match=match):
            export_onnx(model, tmp_path / "meta.onnx", 64, metadata=bad)
    assert time.perf_counter() - start < 5 and not (tmp_path / "meta.onnx").exists(), "refused before tracing"
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ExportError, match=r"dsm-lightning\[onnx\]"):
        export_onnx(model, tmp_path / "n.onnx", 64)
    remove_dsm(model)


def test_cli_export_writes_the_guards_choice(tmp_path):
    from dsm_lightning.app.cli import cli
    from tests.lightning_helpers import TINY_KW, make_image_folder

    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=4)
    out = tmp_path / "model.onnx"
    args = [
        "export",
        "--trainer.accelerator=cpu",
        "--trainer.logger=false",
        "--model.model_name=vit_tiny_patch16_224",
        "--model.num_classes=3",
        f"--model.model_kwargs={json.dumps(TINY_KW)}",
        f"--data.val_dir={data}",
        "--data.batch_size=4",
        "--dsm.min_agreement=0.5",
        "--dsm.guard_images=12",
        "--dsm.guard_confidence=null",
        "--dsm.r=2",
        f"--output={out}",
    ]
    cli(args)
    meta = read_metadata(out)
    assert meta["guard"]["images"] == 12 and meta["input_size"] == [3, 32, 32]
    assert meta["dsm_config"] is not None and meta["preprocess"]["mean"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        cli(args)
    cli([*args, "--overwrite=true", "--dynamic_batch=false", "--dsm.min_agreement=null", "--dsm.r=3"])
    assert read_metadata(out)["dsm_config"]["r"] == 3
