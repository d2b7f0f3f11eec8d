"""Files a user did not make: side-cars never run code or build giant models; images read as they look."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from dsm_lightning.app.data import ImageFiles, load_rgb
from dsm_lightning.app.module import ImageClassifier, read_sidecar
from tests.lightning_helpers import TINY_KW


def _bundle(tmp_path, sidecar: dict):
    weights = tmp_path / "bundle" / "model.safetensors"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_bytes(b"")
    weights.with_suffix(".json").write_text(json.dumps(sidecar))
    return weights


def _remote_code_folder(tmp_path):
    """A transformers folder whose config asks for its own Python code; the code leaves a marker file."""
    folder = tmp_path / "hf"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "config.json").write_text(
        json.dumps({"model_type": "x", "auto_map": {"AutoConfig": "cfg.C", "AutoModelForImageClassification": "cfg.M"}})
    )
    (folder / "cfg.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class C(PretrainedConfig): model_type = 'x'\n"
        "class M(PreTrainedModel): config_class = C\n"
    )
    return folder, marker


def test_sidecar_naming_a_transformers_folder_with_remote_code_is_refused_before_any_import(tmp_path):
    folder, marker = _remote_code_folder(tmp_path)
    weights = _bundle(tmp_path, {"timm_name": f"hf:{folder}", "create_kwargs": {"trust_remote_code": True}})
    with pytest.raises(ValueError, match=r"model\.json.*(timm_name|trust_remote_code)"):
        ImageClassifier(checkpoint_path=str(weights))
    assert not marker.exists(), "no code from the side-car's folder ran"


def test_trust_remote_code_is_refused_even_when_the_user_passes_it(tmp_path):
    pytest.importorskip("transformers")
    folder, marker = _remote_code_folder(tmp_path)
    with pytest.raises(ValueError, match="trust_remote_code"):
        ImageClassifier(model_name=f"hf:{folder}", model_kwargs={"trust_remote_code": True})
    with pytest.raises(ValueError):  # transformers refuses the folder's code when remote code is off
        ImageClassifier(model_name=f"hf:{folder}")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("create_kwargs", "match"),
    [
        ({"depth": 1_000_000}, r"create_kwargs\['depth'\].*\[1, 64\]"),
        ({"embed_dim": 10**9}, r"'embed_dim'"),
        ({"img_size": [224, 10**6]}, r"'img_size'"),
        ({"depth": "12"}, r"'depth'.*expected int"),
        ({"depth": True}, r"'depth'"),
        ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, r"\['pretrained_cfg_overlay'\] is not a constructor"),
        ({"act_layer": "os.system"}, r"\['act_layer'\] is not a constructor"),
        ({"global_pool": "evil"}, r"\['global_pool'\] = 'evil' is not one of '', 'avg'"),
        (
            {"embed_dim": 8192, "depth": 64, "num_heads": 128, "img_size": 4096, "patch_size": 1, "mlp_ratio": 16},
            r"billion parameters and 16,777,216 tokens per image, beyond any real ViT",
        ),
        ({"embed_dim": 8192, "depth": 64}, r"billion parameters .* beyond any real ViT"),
        ({"img_size": 4096, "patch_size": 2}, r"4,194,304 tokens per image"),
    ],
)
def test_sidecar_constructor_arguments_are_whitelisted_and_bounded(tmp_path, create_kwargs, match):
    weights = _bundle(tmp_path, {"timm_name": "vit_tiny_patch16_224", "create_kwargs": create_kwargs})
    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        ImageClassifier(checkpoint_path=str(weights))
    assert time.perf_counter() - start < 5, "refused before any model is built"


def test_sidecar_of_a_real_model_still_reads(tmp_path):
    create = {**TINY_KW, "num_classes": 3, "global_pool": "token"}
    weights = _bundle(tmp_path, {"timm_name": "vit_tiny_patch16_224", "create_kwargs": create, "classes": list("abc")})
    assert read_sidecar(str(weights))["create_kwargs"] == create


def test_sixteen_bit_png_keeps_its_tones(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    rgb = np.asarray(ImageFiles(str(tmp_path), labelled=False)[0]["image"]).astype(float)
    assert rgb.shape == (64, 64, 3)
    assert (rgb == 255).mean() < 0.05 and abs(rgb.mean() - 127.5) < 1.5, "the ramp stays a ramp, not white"
    np.testing.assert_allclose(rgb[0, :, 0], np.rint(ramp[0] / 257.0), atol=0)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high as stored
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 40), "shown as a viewer shows it: 20 wide, 40 high"


def test_float_image_is_refused_with_a_reason(tmp_path):
    Image.fromarray(np.random.rand(8, 8).astype(np.float32), mode="F").save(tmp_path / "float.tif")
    item = ImageFiles(str(tmp_path), labelled=False, skip_bad=True)[0]
    assert "floating-point" in item["skipped"][1]


def test_every_file_in_a_predict_folder_is_predicted_or_listed(tmp_path):
    frames = [Image.fromarray(np.full((16, 16, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    files = ImageFiles(str(tmp_path), labelled=False, skip_bad=True)
    items = [files[i] for i in range(len(files))]
    predicted = [i["path"] for i in items if "image" in i]
    skipped = {i["skipped"][0]: i["skipped"][1] for i in items if "skipped" in i}
    assert [p.endswith("anim.gif") for p in predicted] == [True], "a GIF is read (its first frame)"
    assert np.asarray(items[0]["image"])[0, 0, 0] == 10
    assert list(skipped) == [str(tmp_path / "notes.txt")] and "not an image" in skipped[str(tmp_path / "notes.txt")]


def _alias_bomb(levels: int, width: int = 9) -> str:
    lines = ["model:", "  model_kwargs:", '    a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (_alias_bomb(9), "aliases .* expand to more than"),
        (_alias_bomb(30, width=2), "aliases .* expand to more than"),  # another shape: binary, deeper
        ("a: &x {k: [1, 2, 3]}\n" + "".join(f"b{i}: *x\n" for i in range(60_000)), "expand to more than"),
        ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 100"),
        ("x: " + "{a: " * 500 + "1" + "}" * 500 + "\n", "nested deeper than 100"),
        ("x: '" + "a" * (9 * 2**20) + "'\n", "larger than"),
    ],
    ids=["bomb9x9", "bomb30x2", "many-aliases", "deep-list", "deep-map", "huge"],
)
def test_yaml_beyond_the_limits_is_refused_unexpanded_in_milliseconds(text, match):
    from dsm_lightning.app.cli import check_yaml

    start = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        check_yaml(text)
    assert time.perf_counter() - start < 5


def test_ordinary_yaml_with_a_few_anchors_is_accepted():
    from dsm_lightning.app.cli import check_yaml

    check_yaml("base: &b {batch_size: 4, num_workers: 0}\ndata:\n  <<: *b\n  predict_dir: imgs\n" + "x: [1, 2]\n" * 50)


def test_an_alias_bomb_config_ends_the_cli_with_one_line_before_expansion(tmp_path, capsys):
    from dsm_lightning.app.cli import cli

    config = tmp_path / "downloaded.yaml"
    config.write_text(_alias_bomb(9))
    start = time.perf_counter()
    with pytest.raises(SystemExit) as stopped:
        cli(["predict", f"--config={config}", "--trainer.logger=false"])
    assert stopped.value.code == 2 and time.perf_counter() - start < 20
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "alias bomb" in err[0] and "drop the anchors" in err[0]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("stage", ["validate", "predict"])
@pytest.mark.parametrize("kind", ["pickle", "truncated", "not-a-zip"])
def test_ckpt_path_that_is_not_weights_only_is_refused_in_one_line_without_unsafe_advice(tmp_path, stage, kind):
    import torch

    from dsm_lightning.app.cli import cli
    from tests.lightning_helpers import make_image_folder
    from tests.test_cli_writer import cli_args

    data = make_image_folder(tmp_path / "imgs", classes=3, per_class=1)
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "x": _Payload(marker)}, ckpt)
    if kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    elif kind == "not-a-zip":
        ckpt.write_bytes(b"\x80\x04K\x01." + b"junk" * 10)
    args = cli_args(tmp_path, data, tmp_path / "p.csv", f"--data.val_dir={data}", f"--ckpt_path={ckpt}")
    with pytest.raises(ValueError, match="ckpt_path") as refused:
        cli([stage, *args])
    message = str(refused.value)
    assert "weights_only=False" not in message and "`False`" not in message and "\n" not in message
    assert ("may run code" in message and "GLOBAL" in message) if kind == "pickle" else "cannot read" in message
    assert not marker.exists()


def test_model_checkpoint_path_pickle_error_gives_no_unsafe_advice(tmp_path):
    import torch

    weights = tmp_path / "evil.pt"
    torch.save({"w": _Payload(tmp_path / "PWNED")}, weights)
    with pytest.raises(ValueError, match=r"GLOBAL.*pass a state_dict") as refused:
        ImageClassifier("vit_tiny_patch16_224", model_kwargs=TINY_KW, checkpoint_path=str(weights))
    assert "weights_only` set to `False" not in str(refused.value) and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(("low", "high"), [(0, 2**24), (-30000, 30000), (-(2**31), 2**31 - 1)])
def test_32_bit_integer_image_beyond_16_bits_keeps_its_tones_with_a_warning(tmp_path, low, high):
    ramp = np.tile(np.linspace(low, high, 64), (8, 1)).astype(np.int32)
    Image.fromarray(ramp, mode="I").save(tmp_path / "ramp32.tif")
    assert Image.open(tmp_path / "ramp32.tif").mode == "I"
    with pytest.warns(UserWarning, match=r"ramp32.tif: a 32-bit integer image with values .* scaled by its own range"):
        rgb = np.asarray(load_rgb(tmp_path / "ramp32.tif")).astype(int)[0, :, 0]
    assert rgb[0] == 0 and rgb[-1] == 255 and (np.diff(rgb) >= 0).all() and len(set(rgb)) >= 60


def test_32_bit_integer_image_within_16_bits_reads_as_16_bit_without_a_warning(tmp_path, recwarn):
    Image.fromarray(np.tile(np.linspace(0, 65535, 64), (8, 1)).astype(np.int32), mode="I").save(tmp_path / "i.tif")
    rgb = np.asarray(load_rgb(tmp_path / "i.tif"))[0, :, 0]
    assert rgb[0] == 0 and rgb[-1] == 255 and not [w for w in recwarn if "32-bit" in str(w.message)]


def test_broken_links_pipes_and_devices_in_a_predict_folder_are_listed_with_their_reason(tmp_path):
    import os

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nonexistent")
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "x.png").mkdir()  # a folder named like an image is walked as a folder
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "x.png" / "inner.png")
    files = ImageFiles(str(tmp_path), labelled=False, skip_bad=True)
    items = [files[i] for i in range(len(files))]
    predicted = sorted(os.path.basename(i["path"]) for i in items if "image" in i)
    skipped = {os.path.basename(i["skipped"][0]): i["skipped"][1] for i in items if "skipped" in i}
    assert predicted == ["good.png", "inner.png"]
    assert skipped["dangling.png"].startswith("broken symbolic link")
    assert "named pipe" in skipped["fifo.png"] and "device" in skipped["zero.png"] and len(skipped) == 3


@pytest.mark.parametrize(
    ("sidecar", "match"),
    [
        (
            {"timm_name": "torchvision:get_model"},
            r"model\.json: its timm_name 'torchvision:get_model'.*no model builder",
        ),
        ({"timm_name": "torchvision:nope"}, r"model\.json: .*torchvision has no model builder 'nope'"),
        ({"timm_name": "torchvision:vit_b_1"}, r"did you mean 'vit_b_16'"),
        ({"timm_name": "torchvision:../../os"}, r"no model builder"),
        ({"timm_name": "torchvision:VisionTransformer"}, r"model\.json: .*do not build a model \(TypeError"),
        ({"timm_name": "vit_tiny_patch16_22"}, r"model\.json: .*unknown timm model"),
    ],
)
def test_sidecar_model_names_that_are_not_models_end_in_one_line_naming_the_sidecar(tmp_path, sidecar, match):
    with pytest.raises(ValueError, match=match) as refused:
        ImageClassifier(checkpoint_path=str(_bundle(tmp_path, sidecar)))
    assert "\n" not in str(refused.value)


def test_deeply_nested_or_huge_sidecar_json_is_refused_in_one_line(tmp_path):
    weights = _bundle(tmp_path, {})
    weights.with_suffix(".json").write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ValueError, match="nests JSON too deeply"):
        read_sidecar(str(weights))
    weights.with_suffix(".json").write_text('{"classes": ["' + "a" * (17 * 2**20) + '"]}')
    with pytest.raises(ValueError, match="more than a side-car's"):
        read_sidecar(str(weights))


def _flow_bomb(levels: int = 9) -> str:
    inner = ", ".join(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels))
    return "{a0: &a0 [lol], " + inner + "}"


@pytest.mark.parametrize("form", ["--key=value", "--key value", "string in a config file"])
def test_an_alias_bomb_as_a_command_line_value_or_a_string_in_a_config_is_refused_too(tmp_path, form):
    from dsm_lightning.app.cli import cli

    bomb = _flow_bomb()
    if form == "--key=value":
        args = [f"--model.model_kwargs={bomb}"]
    elif form == "--key value":
        args = ["--model.model_kwargs", bomb]
    else:
        config = tmp_path / "c.yaml"
        config.write_text("model:\n  model_kwargs: " + json.dumps(bomb) + "\n")  # jsonargparse parses it again
        args = [f"--config={config}"]
    start = time.perf_counter()
    with pytest.raises((ValueError, SystemExit)):
        cli(["predict", "--trainer.logger=false", *args])
    assert time.perf_counter() - start < 20, "refused before expansion (it took 73 s, growing with each level)"


@pytest.mark.parametrize("value", ["*.png", "imgs/*", "*nothing"])
def test_a_value_with_a_star_that_is_not_an_alias_bomb_passes_the_check(tmp_path, monkeypatch, value):
    from dsm_lightning.app.cli import cli

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli(["predict", "--trainer.logger=false", f"--data.predict_dir={value}"])
