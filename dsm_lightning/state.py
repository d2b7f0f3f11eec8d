"""What a patched model carries, owned here: the patch record on a model, the marks on patched and compiled classes.

Only :mod:`~dsm_lightning.patch` (and :mod:`~dsm_lightning.regional` for compiled blocks) write these; adapters and
the rest read them through the functions below. Nothing here holds state of its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, cast

from torch import nn

from .config import DSMConfig

__all__ = [
    "BLOCK_ORIGINAL",
    "COMPILED_MARK",
    "PATCH_ADAPTER",
    "PATCH_RECORD",
    "PatchRecord",
    "patch_record",
    "patched_adapter",
]

#: Class attribute of a patched block class: the block's original class.
BLOCK_ORIGINAL = "_dsm_block_original"
#: Instance attribute of a patched model (its adapter's ``core``): its :class:`PatchRecord`.
PATCH_RECORD = "_dsm_patch"
#: Class attribute of a patched model class and of patched block classes: the adapter that patched them.
PATCH_ADAPTER = "_dsm_adapter"
#: Attribute of a block's compiled ``forward`` (``compile_blocks``): the block class it was compiled for.
COMPILED_MARK = "_dsm_compiled_block"


class PatchRecord(NamedTuple):
    """What :func:`~dsm_lightning.apply_dsm` stores on a patched model: written by ``patch`` only, read through
    :func:`patch_record` and :func:`patched_adapter`.

    Attributes:
        original: The model's class before patching.
        config: The :class:`~dsm_lightning.DSMConfig` it runs with.
    """

    original: type
    config: DSMConfig


def patch_record(core: nn.Module) -> Optional[PatchRecord]:
    """The :class:`PatchRecord` of a model's core module, or None when it is not patched."""
    return cast(Optional[PatchRecord], core.__dict__.get(PATCH_RECORD))


def patched_adapter(obj: Any) -> Any:
    """The adapter that patched ``obj``'s class (a patched model or block)."""
    return getattr(type(obj), PATCH_ADAPTER)
