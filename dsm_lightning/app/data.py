"""ImageFolderDataModule: torchvision ImageFolder data with the model's own preprocessing (timm data config)."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate

from ..errors import InputError

__all__ = [
    "ImageFolderDataModule",
    "ImageFiles",
    "IMG_EXTENSIONS",
    "collate_skipping",
    "load_rgb",
    "transform_from_config",
]

#: File types read as images (an animated GIF gives its first frame). In predict, other files (except hidden ones,
#: whose names start with a dot) are listed as skipped, with the reason, instead of being ignored.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
#: Pillow modes of 16-bit (and 32-bit integer) single-channel images, scaled to 8 bits by 1/257 before RGB (a 32-bit
#: image with values outside 0...65535 by its own range, see :func:`load_rgb`).
WIDE_INT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
BadImages = Literal["auto", "skip", "stop"]


def collate_skipping(items: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Collate :class:`ImageFiles` items, leaving out unreadable ones (``{"skipped": ...}`` items from
    ``ImageFiles(skip_bad=True)``); their ``(path, reason)`` pairs travel in ``batch["skipped"]``. A batch of only
    unreadable files has zero images (``batch["image"].shape[0] == 0``)."""
    good = [item for item in items if "skipped" not in item]
    skipped = [item["skipped"] for item in items if "skipped" in item]
    if good:
        batch = default_collate(good)
    else:
        batch = {
            "image": torch.empty(0),
            "target": torch.empty(0, dtype=torch.long),
            "path": [],
            "index": torch.empty(0, dtype=torch.long),
        }
    batch["skipped"] = skipped
    return batch


def transform_from_config(cfg: Dict[str, Any], training: bool = False) -> Callable:
    """timm's ``create_transform`` from a data config (``resolve_data_config`` output, possibly edited)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=training)


def load_rgb(file: Any) -> Image.Image:
    """An image file as 8-bit RGB, the way viewers show it: EXIF orientation applied, 16-bit grayscale scaled to
    8 bits (Pillow's own ``convert("RGB")`` clips it, turning most pixels white), palette and alpha modes converted.
    A 32-bit integer image (mode ``I``) whose values lie outside 0...65535 is scaled by its own range (its lowest
    value black, its highest white), with a warning, instead of saturating.

    Raises:
        ValueError: For a floating-point image (mode ``F``), whose value range is unknown.
    """
    with Image.open(file) as opened:
        image = ImageOps.exif_transpose(opened)
    if image.mode in WIDE_INT_MODES:
        wide = np.asarray(image, dtype=np.float64)
        low, high = (float(wide.min()), float(wide.max())) if wide.size else (0.0, 0.0)
        if low < 0 or high > 65535:
            warnings.warn(
                f"{getattr(file, 'name', file)!s}: a 32-bit integer image with values {low:.0f}...{high:.0f}, outside "
                f"16 bits, scaled by its own range (lowest black, highest white); save it as an 8- or 16-bit file "
                f"to choose the scaling",
                stacklevel=2,
            )
            scaled = (wide - low) * (255.0 / (high - low)) if high > low else np.zeros_like(wide)
        else:
            scaled = wide / 257.0
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("a floating-point image (mode F) has no known value range; save it as an 8- or 16-bit file")
    return image.convert("RGB")


def _walk(root: Path) -> Tuple[List[str], List[str]]:
    """``(regular files, other entries)`` under ``root``, each sorted, following symbolic links safely: a directory
    reached twice (a link loop such as ``up -> ..``, or two links to one place) is walked once, and each entry is
    listed once. Other entries are those that are neither files nor folders: broken links, pipes, devices, sockets
    (never opened)."""
    seen_dirs, seen_files = set(), set()
    found: List[str] = []
    odd: List[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            file = os.path.join(dirpath, name)
            key = os.path.realpath(file)
            if key in seen_files:
                continue
            seen_files.add(key)
            (found if os.path.isfile(file) else odd).append(file)
    return sorted(found), sorted(odd)


def _all_files(root: Path) -> List[str]:
    """Every regular file under ``root``, sorted, each listed once (see :func:`_walk`)."""
    return _walk(root)[0]


def _not_image_reason(path: str) -> str:
    """Why ``path`` is listed as skipped without being read: what it is, when it is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        target = os.readlink(path) if os.path.islink(path) else "?"
        return f"broken symbolic link (to {target}); fix or remove the link"
    for test, what in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"{what}, not a file; not read"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file; not read"
    return f"not an image file ({Path(path).suffix or 'no extension'}; read: {' '.join(IMG_EXTENSIONS)})"


def split_files(root: Path) -> Tuple[List[str], List[str]]:
    """One walk of ``root`` (see :func:`_walk`): ``(image files, other entries)``, both sorted. Image files are
    regular files with an :data:`IMG_EXTENSIONS` extension; the others are every other file, broken link, pipe or
    device, except hidden ones (a name, or a folder on the way, starting with a dot)."""
    files, odd = _walk(root)
    images, others = [], []
    for f in files:
        if Path(f).suffix.lower() in IMG_EXTENSIONS:
            images.append(f)
        else:
            others.append(f)
    others = [f for f in sorted(others + odd) if not any(p.startswith(".") for p in Path(f).relative_to(root).parts)]
    return images, others


def image_files(root: Path) -> List[str]:
    """Image files (:data:`IMG_EXTENSIONS`) under ``root``, sorted, each listed once (see :func:`_all_files`)."""
    return split_files(root)[0]


class ImageFiles(Dataset):
    """Images from a folder: ``ImageFolder`` layout (``<root>/<class>/<img>``) when labelled, else every image file
    under ``root`` (label -1). Items are dicts ``{image, target, path, index}``.

    An unreadable file raises a ``RuntimeError`` naming it, or with ``skip_bad=True`` gives the item
    ``{"skipped": (path, reason), "index": i}``, which :func:`collate_skipping` leaves out of the batch.
    """

    def __init__(
        self,
        root: str,
        transform: Optional[Callable] = None,
        labelled: Optional[bool] = None,
        classes: Optional[Sequence[str]] = None,
        skip_bad: bool = False,
    ) -> None:
        self.skip_bad = skip_bad
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(
                f"image folder {root!r} does not exist; point the data module at a folder of "
                f"images (ImageFolder layout <root>/<class>/<image> for validate/test)"
            )
        subdirs = sorted(d.name for d in path.iterdir() if d.is_dir())
        if labelled is None:  # class folders and nothing beside them; a loose image makes it a plain folder
            labelled = bool(subdirs) and not any(
                f.is_file() and f.suffix.lower() in IMG_EXTENSIONS for f in path.iterdir()
            )
        self.transform = transform
        others: List[str] = []
        if labelled:
            if not subdirs:
                raise FileNotFoundError(
                    f"{root!r} has no class sub-folders; validate/test need the ImageFolder "
                    f"layout <root>/<class>/<image>"
                )
            self.classes: List[str] = list(classes) if classes else subdirs
            self.samples: List[Tuple[str, int]] = [
                (f, label) for label, name in enumerate(subdirs) for f in image_files(path / name)
            ]
        else:
            self.classes = list(classes) if classes else []
            found, others = split_files(path)
            self.samples = [(f, -1) for f in found]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")
        #: Files that are not images, listed as skipped (predict) rather than silently left out.
        self.not_images = others if skip_bad else []
        self.samples += [(f, -2) for f in self.not_images]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path, target = self.samples[index]
        if target == -2:
            return {"skipped": (path, _not_image_reason(path)), "index": index}
        try:
            image = load_rgb(path)
        except Exception as err:  # PIL raises several types for broken files
            if self.skip_bad:
                return {"skipped": (path, f"{type(err).__name__}: {err}"), "index": index}
            raise InputError(
                f"cannot read image {path!r} ({err}); remove or replace the file, or pass "
                f"data.bad_images=skip to leave unreadable files out"
            ) from err
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "target": target, "path": path, "index": index}


class ImageFolderDataModule(LightningDataModule):
    """Image folders for fit / validate / test / predict, preprocessed like the model expects.

    The transform comes from the LightningModule's ``data_config()`` (timm's ``resolve_data_config``), turned into
    a transform by timm's ``create_transform``; the arguments below override single fields.

    Args:
        val_dir: Labelled folder (ImageFolder layout) for validation; also the default of the next two.
        train_dir: Labelled folder for fit.
        test_dir: Labelled folder for test (default: ``val_dir``).
        predict_dir: Folder of images for predict, searched recursively (default: ``val_dir``).
        batch_size: Batch size per process.
        num_workers: DataLoader workers.
        img_size: Input size (int or (H, W)) overriding the model's.
        interpolation: ``bilinear``, ``bicubic``, ...
        crop_pct: Centre-crop fraction (1.0 = resize only).
        mean: Normalisation mean per channel.
        std: Normalisation standard deviation per channel.
        bad_images: What an unreadable image file does: ``"stop"`` the run with an error naming the file, or
            ``"skip"`` it (a warning per file; the prediction writer lists skipped files next to its output).
            ``"auto"`` (default) skips in predict, where every image stands alone and one bad file among thousands
            must not throw the run away, and stops in fit / validate / test, where leaving images out would quietly
            change the data that a loss or an accuracy is computed on.
    """

    def __init__(
        self,
        val_dir: Optional[str] = None,
        train_dir: Optional[str] = None,
        test_dir: Optional[str] = None,
        predict_dir: Optional[str] = None,
        batch_size: int = 32,
        num_workers: int = 0,
        img_size: Optional[Any] = None,
        interpolation: Optional[str] = None,
        crop_pct: Optional[float] = None,
        mean: Optional[Tuple[float, float, float]] = None,
        std: Optional[Tuple[float, float, float]] = None,
        bad_images: BadImages = "auto",
    ) -> None:
        super().__init__()
        if bad_images not in ("auto", "skip", "stop"):
            raise ValueError(f"bad_images={bad_images!r}: use 'auto', 'skip' or 'stop'")
        if crop_pct is not None and not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct={crop_pct!r}: pass a fraction in (0, 1] (1.0 resizes without cropping)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: pass a whole number >= 1")
        if num_workers < 0:
            raise ValueError(f"num_workers={num_workers!r}: pass 0 (load in the main process) or more")
        self.save_hyperparameters()
        self.datasets: Dict[str, ImageFiles] = {}
        self._check_dirs()

    def _check_dirs(self) -> None:
        h: Any = self.hparams  # Lightning's AttributeDict of the constructor arguments
        for name in ("train_dir", "val_dir", "test_dir", "predict_dir"):
            value = getattr(h, name)
            if value is not None and not Path(value).is_dir():
                raise FileNotFoundError(f"data.{name}={value!r} does not exist; pass an existing image folder")

    def data_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {}
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if module is not None and hasattr(module, "data_config"):
            cfg.update(module.data_config())
        h: Any = self.hparams  # Lightning's AttributeDict of the constructor arguments
        if h.img_size is not None:
            size = (h.img_size, h.img_size) if isinstance(h.img_size, int) else tuple(h.img_size)
            cfg["input_size"] = (3, *size)
        for key in ("interpolation", "crop_pct", "mean", "std"):
            if getattr(h, key) is not None:
                cfg[key] = tuple(getattr(h, key)) if key in ("mean", "std") else getattr(h, key)
        cfg.setdefault("input_size", (3, 224, 224))
        return cfg

    def transform(self, training: bool = False) -> Callable:
        return transform_from_config(self.data_config(), training)

    def setup(self, stage: str) -> None:
        h: Any = self.hparams  # Lightning's AttributeDict of the constructor arguments
        splits: Dict[str, List[Tuple[str, Optional[str], Optional[bool]]]] = {
            "fit": [("train", h.train_dir, True), ("val", h.val_dir, True)],
            "validate": [("val", h.val_dir, True)],
            "test": [("test", h.test_dir or h.val_dir, True)],
            "predict": [("predict", h.predict_dir or h.val_dir, None)],
        }
        for split, folder, labelled in splits[stage]:
            if folder is None:
                if split == "val" and stage == "fit":
                    continue
                raise ValueError(f"stage {stage!r} needs data.{split}_dir (a folder of images)")
            skip = h.bad_images == "skip" or (h.bad_images == "auto" and stage == "predict")
            self.datasets[split] = ImageFiles(
                folder, self.transform(training=split == "train"), labelled, skip_bad=skip
            )

    @property
    def classes(self) -> List[str]:
        for ds in self.datasets.values():
            if ds.classes:
                return ds.classes
        return []

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams["batch_size"],
            shuffle=shuffle,
            num_workers=self.hparams["num_workers"],
            persistent_workers=self.hparams["num_workers"] > 0,
            collate_fn=collate_skipping,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
