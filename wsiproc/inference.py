"""Batches of uint8 tiles → confidence maps, on the GPU when TensorFlow sees one, else on the CPU."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .model import DEFAULT_MODEL_PATH, file_sha256, load_model


class Predictor:
    """A loaded model with one compiled forward pass; all tiles of a run share one shape, so it traces once."""

    def __init__(self, model_path: str | Path | None = None):
        import tensorflow as tf

        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        self.model = load_model(self.model_path)
        self.sha256 = file_sha256(self.model_path)
        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        model = self.model

        @tf.function(reduce_retracing=True)
        def forward(x):
            return model(tf.cast(x, tf.float32) / 255.0, training=False)[..., 0]

        self._forward = forward

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 → (B, H, W) float32 confidence in [0, 1]."""
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected (batch, height, width, 3) tiles, got shape {tiles.shape}")
        return np.asarray(self._forward(tiles), dtype=np.float32)
