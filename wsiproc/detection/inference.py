"""Batches of uint8 tiles → confidence maps, on the engine and at the precision that are fastest where it runs.

`Predictor(model, precision, engine)` hides the engine: OpenVINO on a CPU (float32, bfloat16 or int8),
TensorFlow on a GPU (mixed float16) or when asked; `engines.resolve` holds the rule and `describe()` says what
was chosen and why, for the run record. Every engine has the same contract, (B, H, W, 3) uint8 →
(B, H, W) float32 in [0, 1], so the pipeline never needs to know which it has.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .colour import DomainColours
from .engines import ENGINES, PRECISIONS, Choice, describe_machine, load_openvino, model_geometry, resolve  # noqa: F401  (re-exported)
from .forward import keras_forward
from .model import DEFAULT_MODEL_PATH, load_model
from .model_files import ir_sha256
from ..errors import ModelError, ModelNotFoundError
from ..io.files import file_sha256


class Predictor:
    """A loaded model with one compiled forward pass; all tiles of a run share one shape, so it compiles once.

    Attributes the run record takes: `model_path`, `sha256` (of the model file given), `engine`, `precision`,
    `device`, and `describe()` for the rest (CPU flags, OpenVINO version, the int8 file, threads, cache).
    """

    def __init__(self, model_path: str | Path | None = None, precision: str = "auto", engine: str = "auto",
                 threads: int | None = None, cache_dir: str | Path | None = None):
        """`engine`: auto | openvino | tensorflow; `precision`: auto | float32 | bfloat16 | int8 | mixed_float16
        (see `engines.resolve` for what auto picks). `model_path` may also be an OpenVINO .xml (e.g. an int8
        model from `wsiproc quantize`), which runs as stored. `threads`: the engine's CPU threads (default: the
        CPUs this process may use, or a dask worker's thread count)."""
        t0 = time.perf_counter()
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        self.max_batch: int | None = None  # lowered after an out-of-memory error
        if not self.model_path.is_file():
            raise ModelNotFoundError(f"{self.model_path}: model file not found")
        self.requested = {"engine": engine, "precision": precision}
        self.sha256 = (file_sha256(self.model_path) if self.model_path.suffix.lower() != ".xml"
                       else ir_sha256(self.model_path))
        self.choice: Choice = resolve(self.model_path, engine, precision)
        self.engine, self.precision, self.device = self.choice.engine, self.choice.precision, self.choice.device
        self._keras = None
        self._info: dict = {}
        if self.engine == "openvino":
            self._forward, self._info = load_openvino(self.model_path, self.sha256, self.choice, threads, cache_dir)
            self.geometry: dict = self._info.pop("geometry", {})
        else:
            self._keras = load_model(self.model_path)
            self._forward = keras_forward(self._keras, self.precision == "mixed_float16")
            self.geometry = model_geometry(self._keras)
        #: Input sides must be multiples of this (None where an IR from elsewhere does not say).
        self.size_multiple_px: int | None = self.geometry.get("size_multiple_px")
        #: The nucleus types of the model's class head (`classes.CLASSES`), or None for a detector alone.
        self.classes: tuple[str, ...] | None = tuple(self.geometry["classes"]) if self.geometry.get("classes") else None
        #: Per-slide colour alignment `wsiproc adapt` switched on for this model (`<model>.colours.json`), else None.
        self.colours: DomainColours | None = None
        self.colours_sha256: str | None = None  # part of what a run's results depend on (resume compares it)
        self.colours_path = DomainColours.beside(self.model_path)
        if self.colours_path.is_file():
            try:
                self.colours = DomainColours.load(self.colours_path)
            except ValueError as exc:
                raise ModelError(str(exc)) from exc
            self.colours_sha256 = file_sha256(self.colours_path)
        self.startup_s = round(time.perf_counter() - t0, 3)

    @property
    def model(self):
        """The Keras model (for LRP, training, adaptation), loaded on first use: the OpenVINO engine never needs it."""
        if self._keras is None:
            if self.model_path.suffix.lower() == ".xml":
                raise ModelError(f"{self.model_path}: an OpenVINO model has no Keras layers; give the .keras it was made from")
            self._keras = load_model(self.model_path)
        return self._keras

    def describe(self) -> dict:
        """Engine, precision and why, the CPU and its flags that matter, engine versions, threads and cache state."""
        out = {"engine": self.engine, "precision": self.precision, "device": self.device,
               "requested": dict(self.requested), "reason": self.choice.reason, "geometry": dict(self.geometry),
               **describe_machine(),
               "startup_s": self.startup_s}
        if self.choice.ir_path is not None:
            out["openvino_model"] = {"path": str(self.choice.ir_path), "sha256": ir_sha256(self.choice.ir_path)}
        if self.colours is not None:
            out["colour_alignment"] = {"path": str(self.colours_path), "sha256": self.colours_sha256,
                                       "domains": sorted(self.colours.domains)}
        if self.engine == "tensorflow":
            import tensorflow as tf  # lazy: loaded already by this engine; never imported for OpenVINO

            out["tensorflow_version"] = tf.__version__
        out.update({k: v for k, v in self._info.items() if k != "properties"})
        return out

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        """(B, H, W, 3) uint8 → (B, H, W) float32 confidence in [0, 1] (a class head's maps are dropped)."""
        return self.maps(tiles)[0]

    def maps(self, tiles: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(B, H, W, 3) uint8 → ((B, H, W) confidence, (B, H, W, K) class probabilities or None).

        One forward pass gives both. On a GPU out-of-memory error the batch is split in halves (and stays
        smaller for the rest of the run) instead of failing the slide.
        """
        out = self._forward_all(tiles)
        if out.ndim == 4:
            return out[..., 0], out[..., 1:]
        return out, None

    def _forward_all(self, tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim != 4 or tiles.shape[-1] != 3:
            raise ValueError(f"expected (batch, height, width, 3) tiles, got shape {tiles.shape}")
        m = self.size_multiple_px
        if m and (tiles.shape[1] % m or tiles.shape[2] % m):
            raise ValueError(f"{self.model_path}: tiles of {tiles.shape[1]} × {tiles.shape[2]} px, but this model "
                             f"({self.geometry.get('architecture')}) needs sides that are multiples of {m} px")
        step = min(len(tiles), self.max_batch or len(tiles))
        out = []
        start = 0
        while start < len(tiles):
            chunk = tiles[start : start + step]
            try:
                out.append(np.asarray(self._forward(chunk), dtype=np.float32))
            except Exception as exc:
                if step == 1 or not _out_of_memory(exc):
                    raise
                step = max(1, step // 2)
                self.max_batch = step
                continue
            start += len(chunk)
        return np.concatenate(out) if len(out) > 1 else out[0]


def _out_of_memory(exc: BaseException) -> bool:
    """TensorFlow's out-of-memory error (checked without importing TensorFlow where nothing has)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(exc, tf.errors.ResourceExhaustedError)

