"""Model adapters: one small class per ViT family, over the shared merge ops.

An adapter answers the model questions (which blocks, how many prefix tokens, which patch grid for an input, the
embedding dims) and knows how to run one of the family's blocks with a merge between attention and MLP. It also
names the methods that :func:`dsm_lightning.apply_dsm` overrides on a subclass it swaps in (tomesd-style), so the
original class can be restored exactly.

Register your own with :func:`register_adapter` (a patched model's overridden methods find their adapter with
:func:`patched_adapter`); the docs page "Supported models and custom ViTs" has a worked example.
"""

from __future__ import annotations

from .base import (
    Adapter,
    UnsupportedModelError,
    get_adapter,
    patched_adapter,
    register_adapter,
    registered_adapters,
)
from .eva import TimmEvaAdapter
from .hf import HuggingFaceViTAdapter
from .hf_dinov3 import HuggingFaceDinov3Adapter
from .naflex import TimmNaFlexAdapter
from .timm import TimmViTAdapter
from .torchvision import TorchvisionViTAdapter

__all__ = [
    "Adapter",
    "HuggingFaceDinov3Adapter",
    "HuggingFaceViTAdapter",
    "TimmEvaAdapter",
    "TimmNaFlexAdapter",
    "TimmViTAdapter",
    "TorchvisionViTAdapter",
    "UnsupportedModelError",
    "get_adapter",
    "patched_adapter",
    "register_adapter",
    "registered_adapters",
]

# Built-ins go last, so adapters registered by users (first=True) take precedence, e.g. for subclasses.
register_adapter(TimmViTAdapter(), first=False)
register_adapter(TimmEvaAdapter(), first=False)
register_adapter(TimmNaFlexAdapter(), first=False)
register_adapter(TorchvisionViTAdapter(), first=False)
register_adapter(HuggingFaceViTAdapter(), first=False)  # transformers is imported only when a model is run
register_adapter(HuggingFaceDinov3Adapter(), first=False)
