"""ImageFolderDataModule: torchvision ImageFolder data with the model's own preprocessing (timm data config)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from lightning.pytorch import LightningDataModule
from PIL import Image
from torch.utils.data import DataLoader, Dataset

__all__ = ["ImageFolderDataModule", "ImageFiles", "IMG_EXTENSIONS", "transform_from_config"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def transform_from_config(cfg: Dict[str, Any], training: bool = False) -> Callable:
    """timm's ``create_transform`` from a data config (``resolve_data_config`` output, possibly edited)."""
    from timm.data import create_transform

    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    return create_transform(**{k: cfg[k] for k in keys if k in cfg}, is_training=training)


class ImageFiles(Dataset):
    """Images from a folder: ``ImageFolder`` layout (``<root>/<class>/<img>``) when labelled, else every image file
    under ``root`` (label -1). Items are dicts ``{image, target, path, index}``."""

    def __init__(self, root: str, transform: Optional[Callable] = None, labelled: Optional[bool] = None,
                 classes: Optional[Sequence[str]] = None) -> None:
        path = Path(root)
        if not path.is_dir():
            raise FileNotFoundError(f"image folder {root!r} does not exist; point the data module at a folder of "
                                    f"images (ImageFolder layout <root>/<class>/<image> for validate/test)")
        subdirs = sorted(d.name for d in path.iterdir() if d.is_dir())
        if labelled is None:
            labelled = bool(subdirs)
        self.transform = transform
        if labelled:
            from torchvision.datasets import ImageFolder

            if not subdirs:
                raise FileNotFoundError(f"{root!r} has no class sub-folders; validate/test need the ImageFolder "
                                        f"layout <root>/<class>/<image>")
            folder = ImageFolder(str(path), allow_empty=True)
            self.classes: List[str] = list(classes) if classes else folder.classes
            self.samples: List[Tuple[str, int]] = folder.samples
        else:
            self.classes = list(classes) if classes else []
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
            self.samples = [(str(p), -1) for p in files]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root!r}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        path, target = self.samples[index]
        try:
            with open(path, "rb") as fh:
                image = Image.open(fh).convert("RGB")
        except Exception as err:  # PIL raises several types for broken files
            raise RuntimeError(f"cannot read image {path!r} ({err}); remove or replace the file") from err
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "target": target, "path": path, "index": index}


class ImageFolderDataModule(LightningDataModule):
    """Image folders for fit / validate / test / predict, preprocessed like the model expects.

    The transform comes from the LightningModule's ``data_config()`` (timm's ``resolve_data_config``), turned into
    a transform by timm's ``create_transform``; the arguments below override single fields.

    Args:
        train_dir, val_dir, test_dir, predict_dir: Folders (``test_dir``/``predict_dir`` default to ``val_dir``).
        batch_size: Batch size per process.
        num_workers: DataLoader workers.
        img_size: Input size (int or (H, W)) overriding the model's.
        interpolation: ``bilinear``, ``bicubic``, ...
        crop_pct: Centre-crop fraction (1.0 = resize only).
        mean, std: Normalisation.
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.datasets: Dict[str, ImageFiles] = {}
        self._check_dirs()

    def _check_dirs(self) -> None:
        h = self.hparams
        for name in ("train_dir", "val_dir", "test_dir", "predict_dir"):
            value = getattr(h, name)
            if value is not None and not Path(value).is_dir():
                raise FileNotFoundError(f"data.{name}={value!r} does not exist; pass an existing image folder")

    def data_config(self) -> Dict[str, Any]:
        cfg: Dict[str, Any] = {}
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        if module is not None and hasattr(module, "data_config"):
            cfg.update(module.data_config())
        h = self.hparams
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
        h = self.hparams
        want = {
            "fit": [("train", h.train_dir, True), ("val", h.val_dir, True)],
            "validate": [("val", h.val_dir, True)],
            "test": [("test", h.test_dir or h.val_dir, True)],
            "predict": [("predict", h.predict_dir or h.val_dir, None)],
        }[stage]
        for split, folder, labelled in want:
            if folder is None:
                if split == "val" and stage == "fit":
                    continue
                raise ValueError(f"stage {stage!r} needs data.{split}_dir (a folder of images)")
            self.datasets[split] = ImageFiles(folder, self.transform(training=split == "train"), labelled)

    @property
    def classes(self) -> List[str]:
        for ds in self.datasets.values():
            if ds.classes:
                return ds.classes
        return []

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, shuffle=shuffle,
                          num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

