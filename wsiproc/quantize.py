"""A `.keras` model → a full-integer int8 `.tflite` model for faster CPU inference, and the checks that keep it honest.

Why int8 and not bfloat16: the CPUs this runs on (AVX2 + FMA, no AVX-512) have no bfloat16 arithmetic, while
TFLite's XNNPACK kernels run int8 convolutions with AVX2 integer multiply-adds. Weights are quantized per output
channel, activations per tensor with ranges calibrated on real H&E crops at 0.5 µm/px. The graph keeps a float32
input (RGB in [0, 1]) and a float32 output (confidence in [0, 1]); the quantize/dequantize at either end cost
nothing next to the convolutions and keep `Predictor`'s contract identical for both backends.

Experimental: `benchmarks/precision.py` measured the shipped model's int8 file at 1.06× the float32 Keras throughput
with an F1 change of -0.0003 on held-out MoNuSeg, on a first-generation EPYC (AVX2, no VNNI: int8 multiply-adds
are no faster than float32 FMAs there). Measure on the target CPU before preferring it.

Beside `X.tflite` a sidecar `X.tflite.json` records the source model's file name and sha256 and the `.tflite`'s own
sha256: a `.tflite` whose source `.keras` has since been retrained (or that was replaced) is refused by
`check_sidecar` instead of silently running old weights.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .model import MODEL_MPP, SIZE_MULTIPLE_PX, file_sha256, load_model

#: Side of a calibration crop at 0.5 µm/px: the network is fully convolutional, so small crops calibrate the
#: same per-tensor ranges as whole tiles at a fraction of the cost (the receptive field is 64 px).
CALIBRATION_CROP_PX = 128
#: Crops used when the caller does not say: enough to see stroma, nuclei, fat and glass in several images.
CALIBRATION_CROPS = 48


def sidecar_path(tflite_path: str | Path) -> Path:
    """Where the provenance of `tflite_path` is written: `<name>.tflite.json` beside it."""
    tflite_path = Path(tflite_path)
    return tflite_path.with_name(tflite_path.name + ".json")


def _quotas(n_crops: int, n_images: int) -> list[int]:
    """Crops per image, as even as possible, so one large image cannot dominate the calibrated ranges."""
    return [n_crops // n_images + (i < n_crops % n_images) for i in range(n_images)]


def _random_crops(rgb: np.ndarray, mpp: float, k: int, crop_px: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`k` random `crop_px` crops of one image after resampling it to the model's 0.5 µm/px (none if too small)."""
    from .resample import rescale_rgb

    im = rescale_rgb(np.asarray(rgb)[..., :3], mpp, MODEL_MPP)
    if min(im.shape[:2]) < crop_px:
        return []
    ys = rng.integers(0, im.shape[0] - crop_px + 1, k)
    xs = rng.integers(0, im.shape[1] - crop_px + 1, k)
    return [np.ascontiguousarray(im[y : y + crop_px, x : x + crop_px]) for y, x in zip(ys, xs)]


def calibration_crops(images: Sequence[tuple[np.ndarray, float]], n_crops: int = CALIBRATION_CROPS,
                      crop_px: int = CALIBRATION_CROP_PX, seed: int = 0) -> list[np.ndarray]:
    """Up to `n_crops` uint8 crops of `crop_px` at 0.5 µm/px, cut at random from (RGB image, its µm/px) pairs."""
    if crop_px <= 0 or crop_px % SIZE_MULTIPLE_PX:
        raise ValueError(f"crop_px must be a positive multiple of {SIZE_MULTIPLE_PX} (got {crop_px})")
    rng = np.random.default_rng(seed)
    crops = []
    for (rgb, mpp), k in zip(images, _quotas(n_crops, len(images))):
        crops += _random_crops(rgb, mpp, k, crop_px, rng) if k else []
    if not crops:
        raise ValueError(f"no calibration image is at least {crop_px} px wide at {MODEL_MPP} µm/px")
    return crops


def crops_from_files(paths: Sequence[str | Path], mpp: float, n_crops: int = CALIBRATION_CROPS,
                     crop_px: int = CALIBRATION_CROP_PX, seed: int = 0) -> list[np.ndarray]:
    """Calibration crops from image files of pixel size `mpp`, read one at a time (memory stays at one image)."""
    from .slide import open_slide

    if crop_px <= 0 or crop_px % SIZE_MULTIPLE_PX:
        raise ValueError(f"crop_px must be a positive multiple of {SIZE_MULTIPLE_PX} (got {crop_px})")
    rng = np.random.default_rng(seed)
    crops = []
    for path, k in zip(paths, _quotas(n_crops, len(paths))):
        if not k:
            continue
        slide = open_slide(path, mpp)
        try:
            w, h = slide.dimensions
            crops += _random_crops(slide.read_level(0, 0, 0, w, h), mpp, k, crop_px, rng)
        finally:
            slide.close()
    if not crops:
        raise ValueError(f"no calibration image is at least {crop_px} px wide at {MODEL_MPP} µm/px")
    return crops


def _representative(crops: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """What the converter calibrates on: one crop at a time, scaled to [0, 1] as the network expects."""
    for crop in crops:
        yield [crop[None].astype(np.float32) / 255.0]


def _layer_chain(model) -> list:
    """The model's layers after the input, refusing anything that is not a plain chain (what this converter handles)."""
    layers = [layer for layer in model.layers if layer.__class__.__name__ != "InputLayer"]
    for prev, layer in zip(layers, layers[1:]):
        if layer.input is not prev.output:
            raise ValueError(f"{model.name}: only a chain of layers can be converted ({layer.name} does not follow {prev.name})")
    return layers


def _forward_fn(model):
    """The model as a tf.function over a dynamic (batch, H, W, 3) float32 input.

    Keras 3's UpSampling2D reshapes through a tensor of unknown channel count, which TFLite cannot turn into a
    builtin convolution (the converter stops at the last layer). Nearest-neighbour upsampling by k is rewritten as
    k² copies of the channels rearranged by depth_to_space: the same pixels, a static channel count, and no shape
    arithmetic in the graph. Dropout is the identity at inference and is left out.
    """
    import tensorflow as tf

    chain = _layer_chain(model)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32, name="rgb")])
    def forward(rgb):
        x = rgb
        for layer in chain:
            kind = layer.__class__.__name__
            if kind == "Dropout":
                continue
            if kind == "UpSampling2D":
                if layer.interpolation != "nearest":
                    raise ValueError(f"{layer.name}: only nearest-neighbour upsampling can be converted")
                factor = int(layer.size[0])
                if tuple(layer.size) != (factor, factor):
                    raise ValueError(f"{layer.name}: only square upsampling can be converted")
                x = tf.nn.depth_to_space(tf.concat([x] * factor**2, axis=-1), factor)
            else:
                x = layer(x, training=False)
        return x

    return forward


def _converter(model_path: Path):
    """A TFLite converter for the model with a fully dynamic (batch, H, W, 3) float32 input."""
    import tensorflow as tf

    model = load_model(model_path)
    forward = _forward_fn(model)
    return tf.lite.TFLiteConverter.from_concrete_functions([forward.get_concrete_function()])


def convert_int8(model_path: str | Path, crops: list[np.ndarray]) -> bytes:
    """Full-integer int8 flatbuffer of `model_path`, activations calibrated on `crops` (uint8, 0.5 µm/px)."""
    import tensorflow as tf

    if not crops:
        raise ValueError(f"{model_path}: no calibration crops given")
    converter = _converter(Path(model_path))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: _representative(crops)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    with warnings.catch_warnings():
        # "Statistics for quantized inputs were expected": the input stays float32 on purpose (see the module doc).
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


def convert_float32(model_path: str | Path) -> bytes:
    """Plain float32 flatbuffer: the baseline that separates TFLite's own speed from the int8 gain."""
    return _converter(Path(model_path)).convert()


def _write_atomic(path: Path, data: bytes) -> None:
    from .export import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_tflite(data: bytes, out_path: str | Path, source_model: str | Path, info: dict | None = None) -> Path:
    """Write the flatbuffer and its sidecar (source name and sha256, own sha256, `info`), both atomically.

    The sidecar is written second, so a `.tflite` without a matching sidecar means an interrupted write.
    """
    out_path, source_model = Path(out_path), Path(source_model)
    _write_atomic(out_path, data)
    record = {"source_model": source_model.name, "source_path": str(source_model.resolve()),
              "source_sha256": file_sha256(source_model),
              "tflite_sha256": file_sha256(out_path), **(info or {})}
    _write_atomic(sidecar_path(out_path), (json.dumps(record, indent=2) + "\n").encode())
    return out_path


def quantize_model(model_path: str | Path, crops: list[np.ndarray], out_path: str | Path) -> Path:
    """`model_path` (.keras) → int8 `out_path` (.tflite) with its sidecar; returns `out_path`."""
    data = convert_int8(model_path, crops)
    info = {"precision": "int8", "calibration": {"crops": len(crops), "crop_px": [int(s) for s in crops[0].shape[:2]],
                                                   "mpp": MODEL_MPP}}
    return write_tflite(data, out_path, model_path, info)


def _source_of(tflite_path: Path, record: dict) -> Path | None:
    """The source `.keras` named in the sidecar: beside the `.tflite` first (files moved together), else where it was."""
    beside = tflite_path.with_name(str(record.get("source_model", "")))
    if record.get("source_model") and beside.is_file():
        return beside
    recorded = Path(str(record.get("source_path", "")))
    return recorded if record.get("source_path") and recorded.is_file() else None


def check_sidecar(tflite_path: str | Path, tflite_sha256: str) -> dict | None:
    """Refuse a stale `.tflite`: one that is not the file its sidecar describes, or whose source `.keras` changed.

    No sidecar: nothing to check (a file converted elsewhere), returns None. When the source model can be found
    neither beside the `.tflite` nor where it was converted from, its half of the check is skipped.
    """
    tflite_path = Path(tflite_path)
    side = sidecar_path(tflite_path)
    if not side.is_file():
        return None
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{side}: unreadable sidecar of {tflite_path.name} ({exc})") from exc
    if record.get("tflite_sha256") != tflite_sha256:
        raise ValueError(f"{tflite_path}: does not match its sidecar {side.name} (file replaced or half-written); "
                         "rerun wsiproc quantize")
    source = _source_of(tflite_path, record)
    if source is not None and file_sha256(source) != record.get("source_sha256"):
        raise ValueError(f"{tflite_path}: stale, converted from an earlier version of {source} "
                         f"(sha256 {str(record.get('source_sha256'))[:12]}…); rerun wsiproc quantize {source}")
    return record
