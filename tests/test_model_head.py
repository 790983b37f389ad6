"""The inference rewrite of the network's upsampling head gives the network's own output, with far less memory."""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from wsiproc.detection.model import load_model, subpixel_head


def _rewritten(model: keras.Model, x: np.ndarray) -> np.ndarray:
    trunk, kernel, bias, factor = subpixel_head(model)
    features = trunk(x, training=False)
    return tf.sigmoid(tf.nn.depth_to_space(tf.nn.conv2d(features, kernel, 1, "SAME") + bias, factor)).numpy()[..., 0]


def test_the_subpixel_head_equals_upsampling_then_convolution_on_real_he(shared_data: Path, shipped_model: Path) -> None:
    model = load_model(shipped_model)
    image = Image.open(shared_data / "monuseg-train" / "images" / "TCGA-21-5784-01Z-00-DX1.tif").convert("RGB")
    x = np.asarray(image)[300:396, 200:332][None].astype(np.float32) / 255.0  # 96 × 132: sides not multiples of 16
    expected = model(x, training=False).numpy()[..., 0]
    got = _rewritten(model, x)
    assert got.shape == expected.shape == (1, 96, 132)
    assert np.abs(got - expected).max() < 1e-5
    assert ((got > 0.5) == (expected > 0.5)).mean() > 0.9999  # the same nuclei at the paper's threshold
    assert (expected > 0.5).any()  # and there are nuclei in this crop


def test_models_with_another_ending_are_left_alone() -> None:
    inputs = keras.Input((None, None, 3))
    bilinear = keras.layers.UpSampling2D(2, interpolation="bilinear")(keras.layers.MaxPooling2D(2)(inputs))
    assert subpixel_head(keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(bilinear))) is None
    no_upsampling = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs)
    assert subpixel_head(keras.Model(inputs, no_upsampling)) is None


def test_a_small_model_ending_in_nearest_upsampling_is_rewritten_exactly() -> None:
    keras.utils.set_random_seed(3)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(keras.layers.MaxPooling2D(2)(x))
    x = keras.layers.UpSampling2D(2)(keras.layers.UpSampling2D(2)(x))
    model = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(x))
    x = np.random.default_rng(0).random((2, 20, 28, 3), dtype=np.float32)
    assert np.abs(_rewritten(model, x) - model(x, training=False).numpy()[..., 0]).max() < 1e-6


def test_mixed_float16_finds_the_same_nuclei_as_float32(shared_data: Path, shipped_model: Path) -> None:
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.postprocess import find_nuclei

    half = Predictor(shipped_model, precision="mixed_float16")
    predictor = Predictor(shipped_model, engine="tensorflow", precision="float32")  # the reference, on any machine
    assert (half.precision, half.engine, predictor.precision) == ("mixed_float16", "tensorflow", "float32")
    image = Image.open(shared_data / "monuseg-train" / "images" / "TCGA-21-5784-01Z-00-DX1.tif").convert("RGB")
    tiles = np.asarray(image)[:128, :256].reshape(1, 128, 256, 3)
    full, reduced = predictor(tiles)[0], half(tiles)[0]
    assert reduced.dtype == np.float32 and np.abs(reduced - full).max() < 0.02
    a, b = find_nuclei(full), find_nuclei(reduced)
    assert len(a) > 5 and abs(len(a) - len(b)) <= 1
