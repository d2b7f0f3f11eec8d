"""The saliency example application (``examples/saliency``): ``python -m examples.saliency predict`` writes one
PNG per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from examples.saliency.app import maps_cli


def tiny_saliency(folder):
    """A tiny random saliency checkpoint + side-car in the layout reference.build_saliency writes."""
    import timm
    from safetensors.torch import save_file

    from examples.saliency.model import SaliencyDecoder, SaliencyModel

    torch.manual_seed(0)
    create = {"img_size": 56, "num_classes": 0, "global_pool": "", "depth": 4, "embed_dim": 32, "num_heads": 2}
    backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, **create)
    model = SaliencyModel(backbone, SaliencyDecoder(32, (8, 8, 4)))
    path = folder / "tiny_saliency.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    meta = {"task": "saliency", "timm_name": "vit_small_patch14_dinov2", "create_kwargs": create}
    meta.update(decoder_widths=[8, 8, 4], mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    path.with_suffix(".json").write_text(json.dumps(meta))
    return path


def args(tmp_path, checkpoint, images, out, *extra):
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--model.checkpoint_path={checkpoint}",
        f"--data.predict_dir={images}",
        "--data.batch_size=3",
        f"--writer.output_dir={out}",
        "--dsm.delay=1",
        "--dsm.r=4",
        "--dsm.min_agreement=null",  # 4 images: fewer than any sensible guard_images
        *extra,
    ]


def test_maps_cli_writes_one_png_per_image_at_its_size(tmp_path):
    checkpoint = tiny_saliency(tmp_path)
    images = tmp_path / "imgs"
    sizes = {"a/wide.png": (90, 40), "a/tall.png": (30, 70), "b/square.jpg": (56, 56), "b/wide.png": (64, 20)}
    g = np.random.default_rng(0)
    for name, (w, h) in sizes.items():
        (images / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "maps"
    run = maps_cli(["predict", *args(tmp_path, checkpoint, images, out)])
    callback = next(c for c in run.trainer.callbacks if type(c).__name__ == "DSMCallback")
    assert callback.metrics["dsm/flops_reduction"] > 1.0, "the callback saw the backbone's calls (module hooks)"
    assert callback.metrics["dsm/images_per_sec"] > 0, "two batches: the second one is timed"
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == sorted(n + ".png" for n in sizes), "input names kept whole, no collisions"
    for name, (w, h) in sizes.items():
        with Image.open(out / (name + ".png")) as m:
            assert m.size == (w, h) and m.mode == "L"
    assert not list(out.rglob(".*.tmp")), "written atomically, no temporary files left"


def test_maps_cli_refuses_validate_and_a_classifier_checkpoint(tmp_path):
    checkpoint = tiny_saliency(tmp_path)
    images = tmp_path / "imgs" / "c0"
    images.mkdir(parents=True)
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(images / "x.png")
    with pytest.raises(ValueError, match="use predict"):
        maps_cli(
            ["validate", *args(tmp_path, checkpoint, images.parent, tmp_path / "m"), f"--data.val_dir={images.parent}"]
        )
    meta = json.loads(checkpoint.with_suffix(".json").read_text())
    meta.pop("task")
    checkpoint.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a saliency model"):
        maps_cli(["predict", *args(tmp_path, checkpoint, images.parent, tmp_path / "m")])
