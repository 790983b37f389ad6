"""Batches of uint8 tiles → confidence maps, on the GPU when TensorFlow sees one, else on the CPU.

A `.keras` model runs in TensorFlow; a `.tflite` model (e.g. the int8 file `wsiproc quantize` writes) runs in the
TFLite interpreter on the CPU. Both give the same contract, so the pipeline never needs to know which it has.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np

from .errors import problem
from .model import DEFAULT_MODEL_PATH, file_sha256, load_model, subpixel_head

TFLITE_SUFFIX = ".tflite"
PRECISIONS = ("auto", "float32", "mixed_float16")


def _mixed_precision_copy(model):
    """The same layers and weights with float16 compute (Keras' mixed_float16 policy: variables stay float32)."""
    import keras

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "mixed_float16"})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _keras_forward(model, mixed_float16: bool):
    """One traced function (B, H, W, 3) uint8 → (B, H, W) float32.

    The paper network's upsampling head runs as a sub-pixel convolution (`model.subpixel_head`): the same
    output without materialising 512 channels at full resolution, the largest tensor of the whole network.
    """
    import tensorflow as tf

    head = subpixel_head(model)
    if head is None:
        net = _mixed_precision_copy(model) if mixed_float16 else model

        @tf.function(reduce_retracing=True)
        def forward(x):
            return tf.cast(net(tf.cast(x, tf.float32) / 255.0, training=False)[..., 0], tf.float32)

        return forward
    trunk, kernel, bias, factor = head
    trunk = _mixed_precision_copy(trunk) if mixed_float16 else trunk
    kernel, bias = tf.constant(kernel), tf.constant(bias)

    @tf.function(reduce_retracing=True)
    def forward(x):
        features = tf.cast(trunk(tf.cast(x, tf.float32) / 255.0, training=False), tf.float32)
        logits = tf.nn.conv2d(features, kernel, 1, "SAME") + bias  # one channel per sub-pixel position
        return tf.sigmoid(tf.nn.depth_to_space(logits, factor))[..., 0]

    return forward


class Predictor:
    """A loaded model with one compiled forward pass; all tiles of a run share one shape, so it traces once."""

    def __init__(self, model_path: str | Path | None = None, precision: str = "auto"):
        """`precision`: 'auto' (mixed float16 on a GPU, float32 on the CPU), 'float32' or 'mixed_float16'
        (float16 compute, float32 weights and output). A `.tflite` model runs at the precision it was stored in."""
        self.model_path = Path(model_path) if model_path is not None else DEFAULT_MODEL_PATH
        self.max_batch: int | None = None  # lowered after an out-of-memory error
        if self.model_path.suffix.lower() == TFLITE_SUFFIX:
            self._init_tflite()
        else:
            self._init_keras(precision)

    def _init_tflite(self) -> None:
        """The TFLite backend: no Keras model (`model` is None), CPU only; a stale int8 file is refused here."""
        from .quantize import check_sidecar

        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.model_path}: model file not found")
        self.model = None
        self.sha256 = file_sha256(self.model_path)
        check_sidecar(self.model_path, self.sha256)
        self.device = "CPU"
        self._forward = TFLiteForward(self.model_path)
        self.precision = self._forward.precision

    def _init_keras(self, precision: str) -> None:
        import tensorflow as tf

        self.model = load_model(self.model_path)
        self.sha256 = file_sha256(self.model_path)
        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        # Half precision pays on GPU tensor cores; on a CPU without float16 units it is only slower.
        self.precision = ("mixed_float16" if self.device == "GPU" else "float32") if precision == "auto" else precision
        self._forward = _keras_forward(self.model, self.precision == "mixed_float16")

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


def _tflite_interpreter(path: Path, num_threads: int):
    """TensorFlow's own TFLite interpreter (no extra dependency); LiteRT's where a later TensorFlow has dropped it."""
    import tensorflow as tf

    Interpreter = getattr(getattr(tf, "lite", None), "Interpreter", None)
    if Interpreter is None:  # pragma: no cover - TensorFlow releases without tf.lite
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ValueError(f"{path}: this TensorFlow has no TFLite interpreter; pip install ai-edge-litert") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notice pointing to LiteRT, on every load
        try:
            return Interpreter(model_path=str(path), num_threads=num_threads)
        except (ValueError, RuntimeError) as exc:
            reason = problem(exc)
            raise ValueError(f"{path}: not a loadable .tflite model ({reason})") from None


class TFLiteForward:
    """One TFLite interpreter as a (B, H, W, 3) uint8 → (B, H, W) float32 function.

    The interpreter is resized only when the batch shape changes (a run's tiles share one shape, so that is
    about twice per slide), runs on all CPU cores, and is locked: one interpreter must not run two batches at once
    (dask worker threads may share a Predictor).
    """

    def __init__(self, path: str | Path, num_threads: int | None = None):
        self.path = Path(path)
        self._interpreter = _tflite_interpreter(self.path, num_threads or os.cpu_count() or 1)
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1 or list(inputs[0]["shape_signature"]) != [-1, -1, -1, 3]:
            raise ValueError(f"{self.path}: expected one (batch, height, width, 3) input of any size and one output, "
                             f"got inputs {[list(d['shape_signature']) for d in inputs]}")
        self._input, self._output = inputs[0], outputs[0]
        self._shape: tuple[int, ...] | None = None
        self._lock = threading.Lock()
        self.precision = self._precision()

    def _precision(self) -> str:
        """'int8' when the convolutions run on int8 tensors, else 'float32' (what the run record should say)."""
        dtypes = {np.dtype(t["dtype"]) for t in self._interpreter.get_tensor_details()}
        return "int8" if np.dtype(np.int8) in dtypes else "float32"

    def _quantize_input(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 RGB → what the input tensor takes: [0, 1] floats as the Keras path feeds, or int8/uint8 codes."""
        x = tiles.astype(np.float32) / np.float32(255.0)
        dtype = np.dtype(self._input["dtype"])
        if dtype == np.float32:
            return x
        scale, zero_point = self._input["quantization"]
        info = np.iinfo(dtype)
        return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)

    def _dequantize_output(self, y: np.ndarray) -> np.ndarray:
        if np.dtype(self._output["dtype"]) == np.float32:
            return y
        scale, zero_point = self._output["quantization"]
        return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = self._quantize_input(np.asarray(tiles))
        with self._lock:
            if x.shape != self._shape:
                self._interpreter.resize_tensor_input(self._input["index"], list(x.shape))
                self._interpreter.allocate_tensors()
                self._shape = x.shape
            self._interpreter.set_tensor(self._input["index"], x)
            self._interpreter.invoke()
            y = self._interpreter.get_tensor(self._output["index"])
        return np.clip(self._dequantize_output(y)[..., 0], 0.0, 1.0)
