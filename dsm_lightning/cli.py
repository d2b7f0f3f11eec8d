"""``python -m dsm_lightning {fit,validate,test,predict} --config ...`` (LightningCLI)."""

from __future__ import annotations

from typing import List, Optional

from lightning.pytorch.cli import LightningCLI

from .data import ImageFolderDataModule
from .module import ImageClassifier

__all__ = ["DSMLightningCLI", "main"]


class DSMLightningCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` + :class:`ImageFolderDataModule`.

    ``DSMCallback`` and ``PredictionWriter`` go in ``trainer.callbacks`` of the YAML (see ``configs/``).
    """


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point (``dsm-lightning``)."""
    DSMLightningCLI(ImageClassifier, ImageFolderDataModule, args=args, save_config_kwargs={"overwrite": True},
                    auto_configure_optimizers=False)


if __name__ == "__main__":
    main()
