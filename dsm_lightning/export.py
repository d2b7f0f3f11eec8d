"""Export a merged ViT to ONNX with the token matching inside the graph, and check it with ONNX Runtime.

A merged model's plan is Python ints per input size, so at a fixed image size the graph has static token counts;
only the batch dimension is dynamic. The bipartite matching's stable sort (which ONNX lacks) is replaced while
exporting by an exact rank count (:func:`dsm_lightning.merge.stable_argsort`), so the exported graph makes the same
merges as eager PyTorch, ties included.

Examples:
    >>> import timm, torch
    >>> from dsm_lightning import DSMConfig, apply_dsm
    >>> from dsm_lightning.export import export_onnx
    >>> vit = apply_dsm(timm.create_model("vit_tiny_patch16_224", depth=2).eval(), DSMConfig(r=8))
    >>> path = export_onnx(vit, "/tmp/dsm_doctest.onnx", image_size=224)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .errors import DSMUserError
from .outputs import output_tensor

__all__ = ["ExportError", "OutputOf", "check_onnx", "compare_onnx", "export_onnx", "read_metadata"]

#: Key under which the DSM settings are stored in the ONNX file's ``metadata_props``.
METADATA_KEY = "dsm_lightning"


class ExportError(DSMUserError):
    """The model could not be exported; the message names what to install or change."""


class OutputOf(nn.Module):
    """Wraps a model so that it returns one tensor: its logits, or a Hugging Face output's features (ONNX outputs
    are tensors; a ``transformers`` output object is not)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        hf = any(c.__module__.startswith("transformers.") for c in type(self.model).__mro__)
        out = self.model(pixel_values=pixels) if hf else self.model(pixels)
        tensor = output_tensor(out)
        if tensor is None:
            raise ExportError(f"{type(self.model).__name__} returned {type(out).__name__}, not a tensor to export")
        return tensor


def _vit_of(model: nn.Module) -> Optional[nn.Module]:
    from .patch import is_patched

    for module in model.modules():
        if is_patched(module):
            return module
    return None


def describe(model: nn.Module, image_size: Tuple[int, int]) -> Dict[str, Any]:
    """What the metadata records: the DSM config (None when dense), the input size and the planned token counts."""
    from . import __version__
    from .patch import get_config, token_plan

    vit = _vit_of(model)
    meta: Dict[str, Any] = {"version": __version__, "input_size": [3, *image_size], "dsm_config": None}
    if vit is not None:
        meta["dsm_config"] = get_config(vit).to_dict()  # type: ignore[union-attr]
        plan = token_plan(vit, img_size=image_size)
        meta["tokens_per_block"] = [b.tokens_in + plan.num_prefix_tokens for b in plan.blocks]
    return meta


def _check_metadata(metadata: Dict[str, Any], own: Dict[str, Any]) -> None:
    """Refuse, before tracing, extra metadata that would replace DSM's own record or is not strict JSON."""
    reserved = sorted(set(metadata) & ({"version", "input_size", "dsm_config", "tokens_per_block"} | set(own)))
    if reserved:
        raise ExportError(
            f"metadata keys {reserved} are DSM's own record of the graph (its config, input size, token counts); "
            f"store your entries under other names"
        )
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ExportError(f"metadata must be JSON values (str, number, list, dict; no NaN): {err}") from None


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    image_size: Union[int, Tuple[int, int]] = 224,
    *,
    batch_size: int = 2,
    dynamic_batch: bool = True,
    optimize: bool = False,
    metadata: Optional[Dict[str, Any]] = None,
    overwrite: bool = False,
) -> Path:
    """Export ``model`` (patched with :func:`~dsm_lightning.apply_dsm` or dense) to an ONNX file.

    Uses ``torch.onnx.export(..., dynamo=True)`` (``torch.export`` underneath). The graph takes ``pixels``
    ``[batch, 3, H, W]`` (batch dynamic unless ``dynamic_batch=False``) and returns one tensor (logits, or a
    backbone's features). The DSM config, the input size and the planned token counts are written into the file's
    metadata under ``"dsm_lightning"`` (:func:`read_metadata`).

    Args:
        model: A timm, torchvision or ``transformers`` ViT (or a module holding one), in eval mode.
        path: Where to write the ``.onnx`` file.
        image_size: The input size the plan is made for (an int or ``(H, W)``); other sizes need another export.
        batch_size: Batch of the example input used for tracing.
        dynamic_batch: Export with a dynamic batch dimension.
        optimize: Run the ONNX exporter's graph optimizer (slow on large graphs; ONNX Runtime optimizes at load).
        metadata: Extra entries for the metadata record (JSON values: strings, numbers, lists, dicts); the keys
            DSM writes itself (``version``, ``input_size``, ``dsm_config``, ``tokens_per_block``) are refused, so
            the record never misdescribes the graph.
        overwrite: Replace an existing file (by default an existing file is an error, never silently replaced).

    Returns:
        The path written.

    Raises:
        ExportError: If ``onnxscript`` is missing, the file exists, or the exporter fails (the message names the
            fix).
    """
    out = Path(path)
    _check_exportable(model, out, overwrite)
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    example = torch.randn(batch_size, 3, *size, generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    own = describe(model, size)
    _check_metadata(metadata or {}, own)
    record = {**own, **(metadata or {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                OutputOf(model).eval(),
                (example,),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=["pixels"],
                output_names=["output"],
                optimize=optimize,
                verbose=False,
            )
        except Exception as err:  # the exporter raises many types; the first line is what matters
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ExportError(
                f"torch.onnx.export failed: {first}. torch.export.export(model, (x,)) is the path that always works "
                f"for a patched model; report this with the model name"
            ) from err
    assert program is not None
    program.model.metadata_props[METADATA_KEY] = json.dumps(record)
    _save(program, out, overwrite)
    return out


def _check_exportable(model: nn.Module, out: Path, overwrite: bool) -> None:
    """Raise :class:`ExportError` with the fix before any work: no exporter, an existing file, training mode,
    adaptive merging."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(
            f"ONNX export needs {err.name}: pip install 'dsm-lightning[onnx]' (onnx, onnxscript, onnxruntime)"
        ) from None
    from .patch import get_config

    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; remove it, choose another path, or pass overwrite=True")
    if model.training:
        raise ExportError("the model is in training mode; call model.eval() before exporting (merging is inference)")
    vit = _vit_of(model)
    if vit is not None and getattr(get_config(vit), "threshold", None) is not None:
        raise ExportError(
            "adaptive merging (DSMConfig.threshold) picks token counts from the data, which an ONNX graph cannot; "
            "export the fixed schedule: apply_dsm(model, get_config(model).replace(threshold=None))"
        )


def _umask() -> int:
    """The process's umask, read without changing it (Linux ``/proc``; 0o022 elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            line = next((line for line in fh if line.startswith("Umask:")), "")
        return int(line.split()[1], 8) if line else 0o022
    except (OSError, ValueError, IndexError):
        return 0o022


def _save(program: Any, out: Path, overwrite: bool) -> None:
    """Write through a temporary file and ``os.replace``, so a reader never sees half a file and nothing that
    appeared meanwhile is overwritten unless ``overwrite``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        program.save(str(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it: mkstemp's 0600 hides the file from the group
        if out.exists() and not overwrite:  # created meanwhile by someone else
            raise ExportError(f"{out} appeared while exporting; nothing was overwritten")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The ``"dsm_lightning"`` metadata record of an exported file (``{}`` for a file this module did not write)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return dict(json.loads(prop.value))
    return {}


def compare_onnx(
    model: nn.Module, path: Union[str, os.PathLike], images: torch.Tensor, providers: Tuple[str, ...] = ()
) -> Dict[str, float]:
    """ONNX Runtime running ``path`` against ``model`` in eager PyTorch on ``images``: ``max_abs_diff`` and, for
    ``[batch, classes]`` outputs, ``top1_agreement``.

    Merges are discrete: where tokens tie exactly (identical background patches), the two runtimes' float rounding
    can break the tie differently and merge other, equally similar tokens, so some images differ by more than
    rounding while their predictions agree.

    Raises:
        ExportError: If ``onnxruntime`` is not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("checking an export needs onnxruntime: pip install 'dsm-lightning[onnx]'") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: graph optimisation's warnings (one per CastLike node) are noise
    session = ort.InferenceSession(str(path), options, providers=list(providers) or ["CPUExecutionProvider"])
    (got_np,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    got = torch.from_numpy(got_np)
    with torch.no_grad():
        want = OutputOf(model).eval()(images)
    out = {"max_abs_diff": float((got - want).abs().max())}
    if want.ndim == 2:
        out["top1_agreement"] = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    return out


def check_onnx(
    model: nn.Module, path: Union[str, os.PathLike], images: torch.Tensor, providers: Tuple[str, ...] = ()
) -> float:
    """Max absolute difference between ONNX Runtime running ``path`` and ``model`` in eager PyTorch on ``images``
    (:func:`compare_onnx` gives top-1 agreement too).

    Raises:
        ExportError: If ``onnxruntime`` is not installed.
    """
    return compare_onnx(model, path, images, providers)["max_abs_diff"]
