"""``python -m dsm_lightning {fit,validate,test,predict} ...`` (LightningCLI) with DSM always attached.

``DSMCallback`` is part of the command line (``--dsm.delay=4``, ``--dsm.min_agreement=0.99``, ``--dsm.r=12`` ...;
a ``dsm:`` section in YAML) and so is ``PredictionWriter`` (``--writer.output=preds.jsonl``), so a bare
``python -m dsm_lightning predict --model.model_name=... --data.predict_dir=imgs`` merges tokens and writes
predictions. ``--print_config`` shows every DSM setting with its default.

Input paths written in a config file (``data.*_dir``, ``model.checkpoint_path``) resolve relative to that file's
folder, so a config runs from any working directory; outputs (``writer.output``, logger folders) go under the working
directory. User errors (a missing folder, a bad value) end the command with one line naming the fix and exit status
1; set ``DSM_LIGHTNING_TRACEBACK=1`` to see the full traceback.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from .callback import DSMCallback
from .console import TRACEBACK_ENV, run_console
from .data import ImageFolderDataModule
from .module import ImageClassifier
from .writer import PredictionWriter

__all__ = ["DSMLightningCLI", "LogDirConfigCallback", "OneLineErrorParser", "cli", "config_relative_paths", "main"]

#: Input paths that resolve relative to the config file that sets them.
CONFIG_RELATIVE_KEYS = ("data.train_dir", "data.val_dir", "data.test_dir", "data.predict_dir", "model.checkpoint_path")


DESCRIPTION = (
    "dsm-lightning: evaluate and predict with a pretrained ViT faster by merging redundant tokens (Delayed "
    "Spatial Merging / ToMe), never touching training. DSM settings: --dsm.* (see --print_config); "
    "predictions: --writer.output."
)


class OneLineErrorParser(LightningArgumentParser):
    """LightningCLI's parser with argument errors on one line, naming the fix (a close match for a misspelt option
    and the help command) instead of the full usage text. ``DSM_LIGHTNING_TRACEBACK=1`` restores jsonargparse's
    own report."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        text = " ".join(message.split())
        unknown = re.findall(r"(--[\w.]+)", text) if "nrecognized" in text else []
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        hints = []
        for flag in unknown:
            close = difflib.get_close_matches(flag, options, n=1, cutoff=0.75)
            if close:
                hints.append(f"did you mean {close[0]}?")
        prog = parser.prog.replace(" [options]", "")
        hint = f" ({'; '.join(hints)})" if hints else ""
        text = text if len(text) <= 400 else text[:397] + "..."
        sys.stderr.write(f"{prog}: error: {text}{hint}\n(options: {prog} --help)\n")
        self.exit(2)


class LogDirConfigCallback(SaveConfigCallback):
    """Save the resolved config into the logger's (versioned) folder only, never into the working directory: without
    a logger (``--trainer.logger=false``) nothing is written, so a user's own ``config.yaml`` is never replaced, and
    an existing file is never overwritten."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


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

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key, value in config_relative_paths(config).items():
            config[key] = value


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def config_relative_paths(config: Any) -> dict:
    """``{key: absolute path}`` for the :data:`CONFIG_RELATIVE_KEYS` whose value was set, as a relative path, by a
    ``--config`` file and not overridden afterwards (a command-line value stays relative to the working
    directory)."""
    found = {}
    for file in config.get("config") or []:
        path = Path(str(getattr(file, "absolute", file)))
        try:
            tree = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue
        for key in CONFIG_RELATIVE_KEYS:
            value = _lookup(tree, key)
            if isinstance(value, str):
                found[key] = (value, value if os.path.isabs(value) else str((path.parent / value).resolve()))
    return {key: resolved for key, (raw, resolved) in found.items() if config.get(key) == raw}


def cli(args: Optional[List[str]] = None) -> DSMLightningCLI:
    """Run the command line with ``args`` (``sys.argv`` when None), raising errors as they are (for Python callers
    and tests; the console command is :func:`main`)."""
    return DSMLightningCLI(
        ImageClassifier,
        ImageFolderDataModule,
        args=args,
        save_config_callback=LogDirConfigCallback,
        auto_configure_optimizers=False,
        parser_class=OneLineErrorParser,
        parser_kwargs={"description": DESCRIPTION, "prog": "dsm-lightning"},
    )


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point (``dsm-lightning``, ``python -m dsm_lightning``): a user error prints one line (the
    message and its fix) and exits with status 1; ``DSM_LIGHTNING_TRACEBACK=1`` shows the traceback instead."""
    run_console(lambda: cli(args), "dsm-lightning")
