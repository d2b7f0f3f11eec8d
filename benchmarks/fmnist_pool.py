"""Held-out Fashion-MNIST pools drawn from the 60k training file, never touching the t10k test file.

The images the reference head was fitted on (``../shared/fashion_mnist/train``) and the shared validation images
(``../shared/fashion_mnist/val``) are named by their index in the 60k training file (``<index>.png``); both are
excluded. The remaining 58,500 indices are shuffled once with a fixed seed and cut into disjoint pools:

* ``dev``  (first 1,000): the only images used to *choose* anything (schedule families, merge options,
  calibration); no accuracy on them is ever reported.
* ``eval`` (the next ``--eval`` images): reported numbers only.
* ``fresh`` (from index 10,000 of the shuffled indices on): held back from every table made before
  ``benchmarks/frontier.py``, which reports on it, so that no choice made while reading earlier tables saw it.

Install the files with ``apt-get install dataset-fashion-mnist`` (Debian; IDX files under
``/usr/share/datasets/fashion-mnist/``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, List, Tuple

import numpy as np
import torch

IDX_DIR = Path("/usr/share/datasets/fashion-mnist")
DEV_SIZE = 1000
FRESH_START = 10_000
SEED = 0


def excluded_indices(shared_dirs: Iterable[Path]) -> set:
    """Indices (in the 60k training file) of every ``<index>.png`` under ``shared_dirs``."""
    out = set()
    for folder in shared_dirs:
        out.update(int(p.stem) for p in Path(folder).rglob("*.png"))
    return out


def pool_indices(name: str, size: int, exclude: set, n_total: int = 60000) -> List[int]:
    """``size`` indices of pool ``name`` (``"dev"``, ``"eval"`` or ``"fresh"``): a fixed permutation minus
    ``exclude``."""
    rest = [int(i) for i in np.random.default_rng(SEED).permutation(n_total) if int(i) not in exclude]
    if name == "dev":
        chosen = rest[: min(size, DEV_SIZE)]
    elif name == "eval":
        chosen = rest[DEV_SIZE : min(DEV_SIZE + size, FRESH_START)]
    elif name == "fresh":
        chosen = rest[FRESH_START : FRESH_START + size]
    else:
        raise ValueError(f"pool must be 'dev', 'eval' or 'fresh', got {name!r}")
    if len(chosen) < size:
        raise ValueError(f"pool {name!r} holds {len(chosen)} images, {size} requested")
    return chosen


def load_pool(
    name: str, size: int, transform: Callable, shared: Path, idx_dir: Path = IDX_DIR
) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Images (transformed, as the model expects), labels and 60k-file indices of a pool."""
    from PIL import Image

    from tools.convert import read_idx

    images_file, labels_file = idx_dir / "train-images-idx3-ubyte.gz", idx_dir / "train-labels-idx1-ubyte.gz"
    if not images_file.exists():
        raise FileNotFoundError(
            f"{images_file} not found: install Debian's dataset-fashion-mnist "
            f"(apt-get install dataset-fashion-mnist) or pass --idx-dir"
        )
    raw, labels = read_idx(images_file, labels_file)
    exclude = excluded_indices([shared / "fashion_mnist" / "train", shared / "fashion_mnist" / "val"])
    idx = pool_indices(name, size, exclude, len(raw))
    images = torch.stack([transform(Image.fromarray(raw[i]).convert("RGB")) for i in idx])
    return images, torch.as_tensor(labels[idx]), idx
