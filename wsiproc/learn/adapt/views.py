"""The test-time views of the consistency recipe: flips and a half turn of a batch, each its own inverse."""
from __future__ import annotations

from typing import Callable

import numpy as np


def _as_is(a: np.ndarray) -> np.ndarray:
    return a


#: Test-time views of a batch (n, y, x[, c]); each is its own inverse, and none needs a square tile.
VIEWS: tuple[Callable[[np.ndarray], np.ndarray], ...] = (
    _as_is, lambda a: a[:, :, ::-1], lambda a: a[:, ::-1, :], lambda a: a[:, ::-1, ::-1])


def predict_views(predictor: Callable[[np.ndarray], np.ndarray], tiles: np.ndarray, views: int) -> np.ndarray:
    """Confidence maps (views, n, y, x) of a batch of tiles under the first `views` views, mapped back."""
    return np.stack([np.ascontiguousarray(view(predictor(np.ascontiguousarray(view(tiles))))) for view in VIEWS[:views]])
