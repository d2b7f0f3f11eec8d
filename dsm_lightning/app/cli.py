"""``python -m dsm_lightning {fit,validate,test,predict,export} ...`` (LightningCLI) with DSM always attached.

``DSMCallback`` is part of the command line (``--dsm.delay=4``, ``--dsm.min_agreement=0.99``, ``--dsm.r=12`` ...;
a ``dsm:`` section in YAML) and so is ``PredictionWriter`` (``--writer.output=preds.jsonl``), so a bare
``python -m dsm_lightning predict --model.model_name=... --data.predict_dir=imgs`` merges tokens and writes
predictions. ``--print_config`` shows every DSM setting with its default. ``export --output model.onnx`` writes the
merged model as ONNX (:meth:`DSMTrainer.export`).

Input paths written in a config file (``data.*_dir``, ``model.checkpoint_path``) resolve relative to that file's
folder, so a config runs from any working directory; outputs (``writer.output``, logger folders) go under the working
directory. User errors (a missing folder, a bad value) end the command with one line naming the fix and exit status
1; set ``DSM_LIGHTNING_TRACEBACK=1`` to see the full traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Sequence, Tuple, cast

import torch
import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..callback import DSMCallback
from .console import TRACEBACK_ENV, run_console
from .data import ImageFolderDataModule
from .module import ImageClassifier, load_error_reason
from .writer import PredictionWriter

__all__ = [
    "DSMLightningCLI",
    "DSMTrainer",
    "LogDirConfigCallback",
    "OneLineErrorParser",
    "cli",
    "config_relative_paths",
    "main",
]

#: Limits on YAML the command line reads (``--config`` files and values): size in characters, nesting depth, and
#: nodes after expanding aliases (a "billion laughs" file of a few lines expands to billions).
YAML_LIMITS = {"chars": 8 * 2**20, "depth": 100, "nodes": 200_000}
#: The jsonargparse parser mode whose loader checks :data:`YAML_LIMITS` before loading.
YAML_MODE = "dsm_yaml"

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
        # (name, how the user wrote it): a flag ("unrecognized arguments: --dsm.delya=4"), or a key of a --config file
        # ("Subcommand 'predict' does not accept option 'data.batchsize'")
        unknown = [(name, "--") for name in re.findall(r"--([\w.]+)", text)] if "nrecognized" in text else []
        unknown += [(name, "") for name in re.findall(r"does not accept option '([\w.]+)'", text)]
        options = [o for action in parser._actions for o in action.option_strings if o.startswith("--")]
        options += [o.replace("--dsm.config.", "--dsm.", 1) for o in options if o.startswith("--dsm.config.")]
        hints = []
        for name, dashes in unknown:
            close = difflib.get_close_matches("--" + name, options, n=1, cutoff=0.75)
            if close:
                hints.append(f"did you mean {dashes}{close[0][2:]}?")
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


class DSMTrainer(Trainer):
    """Lightning's Trainer with one more entry point, :meth:`export`, which the command line offers as
    ``dsm-lightning export``."""

    def export(
        self,
        model: LightningModule,
        datamodule: Optional[LightningDataModule] = None,
        output: str = "outputs/model.onnx",
        dynamic_batch: bool = True,
        overwrite: bool = False,
    ) -> Path:
        """Export the merged model to ONNX: the --dsm.* schedule, or the quality guard's choice on the data's images.

        With the guard on (``--dsm.min_agreement``), ``--dsm.guard_images`` images drawn at random from
        ``data.val_dir`` (else ``data.predict_dir``) choose the schedule exactly as a validation stage would, and
        that choice is what is exported (dense, with a warning, when no candidate passes). The file's metadata
        records the DSM config, the input size, the planned token counts, the guard's result and the preprocessing;
        ONNX Runtime then runs it on those images and the largest difference from PyTorch is printed.

        Args:
            model: The LightningModule holding the ViT.
            datamodule: Where the guard's images come from and the input size / preprocessing are read.
            output: The ``.onnx`` file to write (an existing file is refused unless ``overwrite``).
            dynamic_batch: Export with a dynamic batch dimension.
            overwrite: Replace an existing ``output``.
        """
        from ..callback import DSMCallback, find_vit
        from ..export import compare_onnx, export_onnx
        from ..patch import apply_dsm, remove_dsm

        callbacks: List[Any] = getattr(self, "callbacks", [])
        callback = next((c for c in callbacks if isinstance(c, DSMCallback)), None)
        if callback is None:
            raise ValueError("export needs a DSMCallback on the trainer (the command line always attaches one)")
        if Path(output).exists() and not overwrite:
            raise FileExistsError(f"{output} exists; choose another --output or pass --overwrite=true")
        model.eval()
        _, vit = find_vit(model, callback.model_attr)
        remove_dsm(vit)
        self.strategy.connect(model)  # the DataModule reads the model's preprocessing through the trainer
        from ..guard import QualityGuard

        wanted = QualityGuard(callback.config, callback.min_agreement or 0.97, images=callback.guard_images).images
        data_cfg, images, batch = self._export_images(datamodule, wanted)
        config, guard_meta = self._export_config(vit, callback, images, batch)
        if config is not None:
            apply_dsm(vit, config)
        size = tuple(data_cfg.get("input_size", (3, 224, 224)))[1:]
        meta = {
            "guard": guard_meta,
            "preprocess": {k: data_cfg[k] for k in ("interpolation", "crop_pct", "mean", "std") if k in data_cfg},
        }
        try:
            if not self.is_global_zero:
                return Path(output)
            hw = (int(size[0]), int(size[1]))
            path = export_onnx(model, output, hw, dynamic_batch=dynamic_batch, metadata=meta, overwrite=overwrite)
            n = 8 if dynamic_batch else 2  # a static graph takes export_onnx's example batch (2) only
            check = images[:n] if images is not None and len(images[:n]) == n else torch.randn(n, 3, *hw)
            cmp = compare_onnx(model, path, check.cpu())
            mb = path.stat().st_size / 2**20
            top1 = f", top-1 equal on {cmp['top1_agreement']:.0%}" if "top1_agreement" in cmp else ""
            rank_zero_info(
                f"wrote {path} ({mb:.1f} MB; {'DSM ' + str(config) if config else 'dense'}); ONNX Runtime vs PyTorch "
                f"on {len(check)} images: max |difference| {cmp['max_abs_diff']:.2e}{top1}"
            )
            return path
        finally:
            remove_dsm(vit)

    def _export_images(
        self, datamodule: Optional[LightningDataModule], limit: int
    ) -> Tuple[Dict[str, Any], Optional[torch.Tensor], int]:
        """The DataModule's preprocessing, ``limit`` validation (else prediction) images drawn at random, its batch
        size."""
        from ..outputs import collect_batches
        from ..sampling import sample_loader

        if datamodule is None:
            return {}, None, 32
        datamodule.trainer = self
        data_cfg = datamodule.data_config() if hasattr(datamodule, "data_config") else {}
        hp: Any = getattr(datamodule, "hparams", {})
        stage = "validate" if hp.get("val_dir") else "predict" if hp.get("predict_dir") else None
        if stage is None:
            return data_cfg, None, int(hp.get("batch_size", 32))
        datamodule.setup(stage)
        loader = datamodule.val_dataloader() if stage == "validate" else datamodule.predict_dataloader()
        images, _ = collect_batches(sample_loader(loader, max(limit, 1)), max(limit, 1))
        return data_cfg, images, int(hp.get("batch_size", 32))

    @staticmethod
    def _export_config(
        vit: Any, callback: Any, images: Optional[torch.Tensor], batch: int
    ) -> Tuple[Optional[Any], Optional[Dict[str, Any]]]:
        """The schedule to export: the callback's, or the quality guard's choice on ``images`` (None = dense)."""
        from ..guard import QualityGuard
        from ..measure import num_classes_of
        from ..outputs import model_outputs

        if callback.min_agreement is None:
            return callback.config, None
        if images is None:
            raise ValueError(
                "the quality guard chooses the exported schedule on images: set data.val_dir (or data.predict_dir), "
                "or pass --dsm.min_agreement=null to export the --dsm.* schedule as it is"
            )
        guard = QualityGuard(
            callback.config,
            callback.min_agreement,
            images=images.shape[0],
            confidence=callback.guard_confidence,
            measure="top1" if num_classes_of(vit) is not None else "cosine",
            adaptive=callback.adaptive,
        )
        result = guard.choose(
            vit,
            images,
            model_outputs(vit, images, batch, torch.device("cpu")),
            where="drawn at random from the data's images",
            batch_size=batch,
        )
        rank_zero_info(result.summary())
        if result.config is None:
            rank_zero_warn("the quality guard kept the model dense; the exported model does not merge tokens")
        meta = {"min_agreement": callback.min_agreement, "images": len(images), "chosen": str(result.config)}
        return result.config, meta


class DSMLightningCLI(LightningCLI):
    """LightningCLI for :class:`ImageClassifier` + :class:`ImageFolderDataModule`, with :class:`DSMCallback` under
    ``dsm`` and :class:`PredictionWriter` under ``writer`` always attached to the trainer."""

    def subcommands(self) -> Dict[str, set]:  # type: ignore[override]
        """Lightning's subcommands, plus ``export`` when the trainer class has it (:meth:`DSMTrainer.export`; a
        subclass built on another Trainer keeps Lightning's four)."""
        base = LightningCLI.subcommands()
        if isinstance(self.trainer_class, type) and hasattr(self.trainer_class, "export"):
            return {**base, "export": {"model", "datamodule"}}
        return base

    def _parse_ckpt_path(self) -> None:
        with self._weights_only_ckpt():
            try:
                super()._parse_ckpt_path()
            except (RuntimeError, EOFError, KeyError, AttributeError) as err:  # a truncated or foreign file
                sub = self.config.get("subcommand")
                raise ValueError(
                    f"cannot read --ckpt_path={str(self.config[sub].get('ckpt_path'))!r} as a Lightning checkpoint "
                    f"({type(err).__name__}: {load_error_reason(err)}); pass a .ckpt file that Trainer saved"
                ) from None

    def _run_subcommand(self, subcommand: str) -> None:
        with self._weights_only_ckpt():
            super()._run_subcommand(subcommand)

    @contextlib.contextmanager
    def _weights_only_ckpt(self) -> Iterator[None]:
        """A ``--ckpt_path`` that ``torch.load(weights_only=True)`` refuses (a pickle that may run code) ends the
        command in one line that never advises torch's ``weights_only=False``."""
        try:
            yield
        except pickle.UnpicklingError as err:
            sub = self.config.get("subcommand")
            ckpt = self.config[sub].get("ckpt_path") if sub else None
            raise ValueError(
                f"--ckpt_path={str(ckpt)!r} is not a weights-only checkpoint ({load_error_reason(err)}): it holds "
                f"Python objects that may run code. Do not load it unless you made it; re-save its weights as a "
                f"state_dict or a .safetensors file and pass that with --model.checkpoint_path"
            ) from None

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        from .. import __version__

        parser.add_argument("--version", action="version", version=f"dsm-lightning {__version__}")
        return parser

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's, plus :class:`~dsm_lightning.app.progress.LogProgress` (a plain progress line every 30 s) when
        standard output is not a terminal, where progress bars show nothing until the end."""
        trainer = super().instantiate_trainer(**kwargs)
        if not _is_terminal(sys.stdout) and trainer.progress_bar_callback is not None:
            from .progress import LogProgress

            cast(Any, trainer).callbacks.append(LogProgress())
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's parsing, with ``--dsm.<field>`` read as ``--dsm.config.<field>`` (:func:`config_shorthand`)."""
        if args is None:  # the console: rewrite sys.argv itself, so Lightning sees no second set of arguments
            sys.argv[1:] = config_shorthand(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = config_shorthand([str(a) for a in args])
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(DSMCallback, "dsm")
        parser.add_lightning_class_args(PredictionWriter, "writer")
        parser.set_defaults({"writer.output": "outputs/predictions.csv"})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for key, value in config_relative_paths(config).items():
            config[key] = value
        _warn_outputs_outside(config)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _config_files(config: Any) -> Iterator[Tuple[Path, Any]]:
    """``(path, parsed YAML)`` of each ``--config`` file that reads and parses (others are jsonargparse's to report)."""
    for file in config.get("config") or []:
        path = Path(str(getattr(file, "absolute", file)))
        try:
            yield path, yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError):
            continue


def config_relative_paths(config: Any) -> dict:
    """``{key: absolute path}`` for the :data:`CONFIG_RELATIVE_KEYS` whose value was set, as a relative path, by a
    ``--config`` file and not overridden afterwards (a command-line value stays relative to the working
    directory)."""
    found = {}
    for path, tree in _config_files(config):
        for key in CONFIG_RELATIVE_KEYS:
            value = _lookup(tree, key)
            if isinstance(value, str):
                found[key] = (value, value if os.path.isabs(value) else str((path.parent / value).resolve()))
    return {key: resolved for key, (raw, resolved) in found.items() if config.get(key) == raw}


def config_shorthand(args: Sequence[str]) -> List[str]:
    """``--dsm.<field>`` of a :class:`~dsm_lightning.DSMConfig` field is ``--dsm.config.<field>`` (the callback's
    ``DSMCallback(delay=4)`` shorthand on the command line)."""
    from ..config import DSMConfig

    fields = set(DSMConfig.field_names())
    out = []
    for arg in args:
        name, sep, value = arg.partition("=")
        if name.startswith("--dsm.") and name[6:] in fields:
            arg = f"--dsm.config.{name[6:]}{sep}{value}"
        out.append(arg)
    return out


class YAMLLimitError(yaml.YAMLError, ValueError):
    """YAML beyond :data:`YAML_LIMITS` (too large, too deep, or aliases expanding too far), refused unexpanded."""


def check_yaml(text: str) -> None:
    """Refuse YAML beyond :data:`YAML_LIMITS` from its event stream alone, in time linear in its length: nothing is
    composed or expanded, so a file that would take hours (nested aliases) or overflow the stack (deep nesting) is
    refused in milliseconds."""
    if len(text) > YAML_LIMITS["chars"]:
        raise YAMLLimitError(
            f"YAML (a --config file or value) of {len(text):,} characters is larger than the "
            f"{YAML_LIMITS['chars']:,} accepted; pass a config file of settings, not data"
        )
    sizes: Dict[str, int] = {}  # anchor -> nodes under it, aliases expanded
    stack: List[List[Any]] = [[None, 0]]  # [anchor, nodes] of each open collection
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append([event.anchor, 1])
            if len(stack) > YAML_LIMITS["depth"]:
                raise YAMLLimitError(
                    f"YAML (a --config file or value) nested deeper than {YAML_LIMITS['depth']} levels is refused; "
                    f"flatten it"
                )
            continue
        if isinstance(event, yaml.CollectionEndEvent):
            anchor, nodes = stack.pop()
        elif isinstance(event, yaml.AliasEvent):
            anchor, nodes = None, sizes.get(str(event.anchor), 1)
        elif isinstance(event, yaml.ScalarEvent):
            anchor, nodes = event.anchor, 1
            if "*" in event.value and "&" in event.value:  # a string that jsonargparse may parse as YAML again
                check_yaml(event.value)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = nodes
        stack[-1][1] += nodes
        if stack[-1][1] > YAML_LIMITS["nodes"]:
            raise YAMLLimitError(
                f"YAML (a --config file or value) whose aliases (*name) expand to more than "
                f"{YAML_LIMITS['nodes']:,} values is refused (an alias bomb?); write the values out, or drop the "
                f"anchors (&name) and aliases"
            )


def _limited_yaml_load(text: str) -> Any:
    from jsonargparse._loaders_dumpers import yaml_load

    if isinstance(text, str):
        check_yaml(text)
    return yaml_load(text)


def _warn_outputs_outside(config: Any) -> None:
    """One warning when a ``--config`` file (perhaps downloaded) sets ``writer.output`` to a place outside the
    working directory: outputs are written where the path says, as documented, but the user should see where."""
    value = config.get("writer.output")
    if not isinstance(value, str):
        return
    for path, tree in _config_files(config):
        if _lookup(tree, "writer.output") != value:
            continue
        target = Path(value).expanduser().resolve()
        if not target.is_relative_to(Path.cwd().resolve()):
            rank_zero_warn(
                f"{path.name} sets writer.output={value!r}, outside the working directory ({target}); predictions "
                f"go there. Pass --writer.output to choose another place"
            )
        return


def cli(args: Optional[List[str]] = None) -> DSMLightningCLI:
    """Run the command line with ``args`` (``sys.argv`` when None), raising errors as they are (for Python callers
    and tests; the console command is :func:`main`)."""
    from jsonargparse import set_loader

    set_loader(YAML_MODE, _limited_yaml_load, exceptions=(yaml.YAMLError,))  # idempotent: the same mode each call
    for value in sys.argv[1:] if args is None else args:  # values jsonargparse parses as YAML outside the loader
        if isinstance(value, str) and "*" in value:
            try:
                check_yaml(value.split("=", 1)[1] if value.startswith("--") and "=" in value else value)
            except YAMLLimitError:
                raise
            except yaml.YAMLError:  # not YAML (a glob such as *.png): jsonargparse takes it as a string
                pass
    return DSMLightningCLI(
        ImageClassifier,
        ImageFolderDataModule,
        trainer_class=DSMTrainer,
        args=args,
        save_config_callback=LogDirConfigCallback,
        auto_configure_optimizers=False,
        parser_class=OneLineErrorParser,
        parser_kwargs={"description": DESCRIPTION, "prog": "dsm-lightning", "parser_mode": YAML_MODE},
    )


def main(args: Optional[List[str]] = None) -> None:
    """Console entry point (``dsm-lightning``, ``python -m dsm_lightning``): a user error prints one line (the
    message and its fix) and exits with status 1; ``DSM_LIGHTNING_TRACEBACK=1`` shows the traceback instead."""
    for stream in (sys.stdout, sys.stderr):  # a C/ASCII locale: print escapes, never fail after the work is done
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")
    run_console(lambda: cli(args), "dsm-lightning")
