"""``python -m dsm_lightning {fit,validate,test,predict} ...`` (LightningCLI) with DSM always attached.

``DSMCallback`` is part of the command line (``--dsm.delay=4``, ``--dsm.min_agreement=0.99``, ``--dsm.r=12`` ...;
a ``dsm:`` section in YAML) and so is ``PredictionWriter`` (``--writer.output=preds.jsonl``), so a bare
``python -m dsm_lightning predict --model.model_name=... --data.predict_dir=imgs`` merges tokens and writes
predictions. ``--print_config`` shows every DSM setting with its default.
"""

from __future__ import annotations

from typing import Any, List, Optional

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from .callback import DSMCallback
from .data import ImageFolderDataModule
from .module import ImageClassifier
from .writer import PredictionWriter

__all__ = ["DSMLightningCLI", "main"]

DESCRIPTION = ("dsm-lightning: evaluate and predict with a pretrained ViT faster by merging redundant tokens (Delayed "
               "Spatial Merging / ToMe), never touching training. DSM settings: --dsm.* (see --print_config); "
               "predictions: --writer.output.")


class DSMLightningCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` + :class:`ImageFolderDataModule`, with :class:`DSMCallback` under
    ``dsm`` and :class:`PredictionWriter` under ``writer`` always attached to the trainer."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        from . import __version__

        parser.add_argument("--version", action="version", version=f"dsm-lightning {__version__}")
        return parser

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(DSMCallback, "dsm")
        parser.add_lightning_class_args(PredictionWriter, "writer")
        parser.set_defaults({"writer.output": "outputs/predictions.csv"})


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point (``dsm-lightning``)."""
    DSMLightningCLI(ImageClassifier, ImageFolderDataModule, args=args, save_config_kwargs={"overwrite": True},
                    auto_configure_optimizers=False, parser_kwargs={"description": DESCRIPTION})


if __name__ == "__main__":
    main()
