"""Test images written to disk as a user's folders hold them."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_png(array: np.ndarray, path: Path) -> None:
    """A 2D array of values in [0, 1] as an 8-bit grey PNG at ``path`` (its folder made if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8)).save(path)
