"""The nucleus-detection network of Valkonen et al. in Keras 3, and how it is saved and loaded.

The network is fully convolutional: any input whose sides are divisible by 4 works, which is what lets
the pipeline feed it tiles of any size. Input is RGB in [0, 1] at 0.5 µm/px; output is a one-channel
nucleus confidence map of the same size.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

#: The resolution the network is trained and run at.
MODEL_MPP = 0.5
#: Input sides must be multiples of this (two 2× poolings).
SIZE_MULTIPLE_PX = 4
#: Half the receptive field, rounded up to a multiple of 4: the halo a tile needs for seamless output.
RECEPTIVE_RADIUS_PX = 32
VGG_LAYER_NAMES = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")

DEFAULT_MODEL_PATH = Path(__file__).parent / "models" / "default.keras"


def build_model(dropout: float = 0.5, vgg16_weights: str | Path | None = None, freeze_vgg: bool = False) -> keras.Model:
    """Build the paper's network.

    `vgg16_weights` is a local Keras VGG-16 weights file (``vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5``);
    ImageNet weights cannot be downloaded at run time here, so without it every layer starts random and is trained.
    """
    inputs = keras.Input(shape=(None, None, 3), name="rgb")
    x = inputs
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="block1_conv1")(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="block1_conv2")(x)
    x = layers.MaxPooling2D(2, name="block1_pool")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="block2_conv1")(x)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="block2_conv2")(x)
    x = layers.MaxPooling2D(2, name="block2_pool")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv3_1")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv3_2")(x)
    x = layers.Dropout(dropout, name="dropout_1")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv4_1")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv4_2")(x)
    x = layers.Dropout(dropout, name="dropout_2")(x)
    x = layers.UpSampling2D(2, name="up_1")(x)
    x = layers.UpSampling2D(2, name="up_2")(x)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="confidence", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="valkonen_nuclei")
    if vgg16_weights is not None:
        load_vgg16_weights(model, vgg16_weights)
    for name in VGG_LAYER_NAMES:
        model.get_layer(name).trainable = not freeze_vgg
    return model


def load_vgg16_weights(model: keras.Model, weights_file: str | Path) -> None:
    """Copy ImageNet VGG-16 block1–2 weights from a local Keras weights file into `model`."""
    weights_file = Path(weights_file)
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file}: VGG-16 weights file not found")
    vgg = keras.applications.VGG16(include_top=False, weights=str(weights_file), input_shape=(None, None, 3))
    for name in VGG_LAYER_NAMES:
        model.get_layer(name).set_weights(vgg.get_layer(name).get_weights())


def load_model(path: str | Path | None = None) -> keras.Model:
    """Load a `.keras` model with Keras' safe mode on (no arbitrary code from model files)."""
    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    if not path.is_file():
        raise FileNotFoundError(f"{path}: model file not found")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many types for a bad archive
        raise ValueError(f"{path}: not a loadable .keras model ({exc.__class__.__name__}: {exc})") from exc


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Save atomically: a crash never leaves a truncated `.keras` file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def subpixel_head(model: keras.Model) -> tuple[keras.Model, np.ndarray, np.ndarray, int] | None:
    """The network's ending `UpSampling2D (nearest) … → Conv2D(1, 3×3, same, sigmoid)` rewritten for inference.

    Upsampling 512 feature channels to full resolution only to reduce them to one channel costs ~0.7 GB per
    576 × 576 tile (2.4 GB per 1088² GPU tile) and most of the memory traffic. The same output comes from a 3 × 3
    convolution at the features' resolution with f² output channels (one per sub-pixel position, its taps
    summed where the full-resolution window falls on the same feature pixel) followed by depth-to-space(f).
    Returns (trunk, kernel, bias, factor), or None when the model does not end that way (then run it as is).
    """
    layers_ = model.layers
    head = layers_[-1]
    if not (isinstance(head, layers.Conv2D) and head.filters == 1 and tuple(head.kernel_size) == (3, 3)
            and head.padding == "same" and tuple(head.strides) == (1, 1) and tuple(head.dilation_rate) == (1, 1)
            and head.activation is keras.activations.sigmoid and head.use_bias):
        return None
    factor, i = 1, len(layers_) - 2
    while i > 0 and isinstance(layers_[i], layers.UpSampling2D):
        up = layers_[i]
        if up.interpolation != "nearest" or up.size[0] != up.size[1]:
            return None
        factor *= up.size[0]
        i -= 1
    if factor < 2:
        return None
    trunk = keras.Model(model.inputs, layers_[i].output, name=f"{model.name}_trunk")
    k, b = (np.asarray(w, dtype=np.float64) for w in head.get_weights())  # (3, 3, C, 1), (1,)
    sub = np.zeros((3, 3, k.shape[2], factor * factor))
    for si in range(factor):  # sub-pixel row inside a feature pixel
        for sj in range(factor):
            for dy in (-1, 0, 1):
                oy = (si + dy) // factor  # which feature pixel row the full-resolution tap falls on
                for dx in (-1, 0, 1):
                    ox = (sj + dx) // factor
                    sub[oy + 1, ox + 1, :, si * factor + sj] += k[dy + 1, dx + 1, :, 0]
    return trunk, sub.astype(np.float32), np.full(factor * factor, b[0], np.float32), factor
