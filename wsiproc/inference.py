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
        self.max_batch: int | None = None  # lowered after an out-of-memory error
        model = self.model

        @tf.function(reduce_retracing=True)
        def forward(x):
            return model(tf.cast(x, tf.float32) / 255.0, training=False)[..., 0]

        self._forward = forward

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 → (B, H, W) float32 confidence in [0, 1].

        On a GPU out-of-memory error the batch is split in halves (and stays smaller for the rest of the
        run) instead of failing the slide.
        """
        import tensorflow as tf

        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected (batch, height, width, 3) tiles, got shape {tiles.shape}")
        step = min(len(tiles), self.max_batch or len(tiles))
        out = []
        start = 0
        while start < len(tiles):
            chunk = tiles[start : start + step]
            try:
                out.append(np.asarray(self._forward(chunk), dtype=np.float32))
            except tf.errors.ResourceExhaustedError:
                if step == 1:
                    raise
                step = max(1, step // 2)
                self.max_batch = step
                continue
            start += len(chunk)
        return np.concatenate(out) if len(out) > 1 else out[0]
