"""The nucleus-detection network of Valkonen et al. in Keras 3, and how it is saved and loaded.

The network is fully convolutional: any input whose sides are divisible by 4 works, which is what lets
the pipeline feed it tiles of any size. Input is RGB in [0, 1] at 0.5 µm/px; output is a one-channel
nucleus confidence map of the same size.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ModelError, ModelNotFoundError
from . import architectures
from .architectures import _producer, class_head_anchor, has_class_head

# Keras (and with it TensorFlow) is imported inside the functions that build, load or save a network: the
# constants and paths here are what the tiler, the CLI's --help and `info` need, and they must not pay 5 s
# of TensorFlow start-up and its console noise for them.

#: The resolution the network is trained and run at.
MODEL_MPP = 0.5
#: Input sides must be multiples of this (two 2× poolings).
SIZE_MULTIPLE_PX = 4
#: Half the receptive field, rounded up to a multiple of 4: the halo a tile needs for seamless output.
RECEPTIVE_RADIUS_PX = 32


def size_multiple(geometry: dict | None) -> int:
    """Input sides must be multiples of this for a model with `geometry` (`Predictor.geometry`; the paper
    network's 4 when a model does not say)."""
    return int((geometry or {}).get("size_multiple_px") or SIZE_MULTIPLE_PX)


MODELS_DIR = Path(__file__).parents[1] / "models"
DEFAULT_MODEL_PATH = MODELS_DIR / "default.keras"
#: Shipped models by name (see models/README.md, the model card): `--model NAME`.
SHIPPED_MODELS = {
    "default": DEFAULT_MODEL_PATH,
    "paper": DEFAULT_MODEL_PATH,  # the default is the paper's network, retrained on four domains
    "lean": MODELS_DIR / "lean.keras",  # vgg-lean: VGG stem, separable head, skips
    "unet": MODELS_DIR / "unet.keras",  # plain 4-level U-Net of width 16
}


def resolve_model_path(name_or_path: str | Path | None) -> Path:
    """A shipped model's name, or a path to a model file, as a path (None: the default)."""
    if name_or_path is None:
        return DEFAULT_MODEL_PATH
    if str(name_or_path) in SHIPPED_MODELS:
        return SHIPPED_MODELS[str(name_or_path)]
    path = Path(name_or_path)
    if path.suffix.lower() not in (".keras", ".xml") and not path.is_file():
        raise ValueError(f"{name_or_path}: neither a model file nor a shipped model ({', '.join(SHIPPED_MODELS)})")
    return path


def build_model(dropout: float = 0.5, vgg16_weights: str | Path | None = None, freeze_vgg: bool = False,
                arch: str = "paper") -> "keras.Model":
    """Build a network by name (`wsiproc.detection.architectures`; default the paper's).

    `vgg16_weights` is the ImageNet VGG-16 block 1–2 `.npz` (torchvision's weights, see
    ../shared/data/vgg16-imagenet); their input normalisation is folded into the first convolution, so the
    network keeps taking RGB in [0, 1]. Only networks with the VGG stem (paper, vgg-lean) take them.
    """
    model = architectures.build(arch, dropout=dropout) if arch in ("paper", "vgg-lean") else architectures.build(arch)
    if vgg16_weights is not None:
        architectures.load_vgg16_npz(model, vgg16_weights, freeze=freeze_vgg)
    return model


def load_model(path: str | Path | None = None) -> "keras.Model":
    """Load a `.keras` model with Keras' safe mode on (no arbitrary code from model files)."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    path = Path(path) if path is not None else DEFAULT_MODEL_PATH
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: model file not found")
    try:
        model = keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # keras raises many types for a bad archive
        raise ModelError(f"{path}: not a loadable .keras model ({exc.__class__.__name__}: {exc})") from exc
    if any(_stored_float16(layer) for layer in model.layers):
        model = with_dtype(model, "float32")  # stored as float16 to halve the file; computed in float32
    return model


def _stored_float16(layer) -> bool:
    return bool(layer.weights) and str(layer.weights[0].dtype) == "float16"


def with_dtype(model: "keras.Model", dtype: str) -> "keras.Model":
    """The same layers and weights with another dtype policy ("float16" to store, "float32" to compute)."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    copy = keras.models.clone_model(model, clone_function=clone)
    target = "float16" if dtype == "float16" else "float32"
    copy.set_weights([np.asarray(w).astype(target) for w in model.get_weights()])
    return copy


def with_policy(model: "keras.Model", policy: str) -> "keras.Model":
    """The same layers and weights under a mixed-precision policy (`mixed_bfloat16`, `mixed_float16`), the output
    layer kept float32 (a sigmoid and its loss in 8 mantissa bits lose the confidences near 0 and 1); `float32`
    returns the model as it is. Variables stay float32 under mixed policies, so training updates are not rounded."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    if policy == "float32":
        return model
    output_layer = model.layers[-1].name

    def clone(layer):
        dtype = "float32" if layer.name == output_layer else policy
        return layer.__class__.from_config({**layer.get_config(), "dtype": dtype})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def save_model(model: "keras.Model", path: str | Path, float16: bool = False) -> Path:
    """Save atomically: a crash never leaves a truncated `.keras` file under the final name.

    `float16` stores the weights in half precision (half the file; `load_model` computes in float32 again):
    for shipped models, where the F1 measured with the float16 file is the F1 reported."""
    if float16:
        model = with_dtype(model, "float16")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.partial.keras")
    model.save(tmp)
    os.replace(tmp, path)
    return path


def subpixel_head(model: "keras.Model") -> "tuple[keras.Model, np.ndarray, np.ndarray, int] | None":
    """The network's ending `UpSampling2D (nearest) … → Conv2D(1, 3×3, same, sigmoid)` rewritten for inference.

    Upsampling 512 feature channels to full resolution only to reduce them to one channel costs ~0.7 GB per
    576 × 576 tile (2.4 GB per 1088² GPU tile) and most of the memory traffic. The same output comes from a 3 × 3
    convolution at the features' resolution with f² output channels (one per sub-pixel position, its taps
    summed where the full-resolution window falls on the same feature pixel) followed by depth-to-space(f).
    Returns (trunk, kernel, bias, factor), or None when the model does not end that way (then run it as is).
    """
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    head = model.get_layer("confidence") if has_class_head(model) else model.layers[-1]
    if not (isinstance(head, layers.Conv2D) and head.filters == 1 and tuple(head.kernel_size) == (3, 3)
            and head.padding == "same" and tuple(head.strides) == (1, 1) and tuple(head.dilation_rate) == (1, 1)
            and head.activation is keras.activations.sigmoid and head.use_bias):
        return None
    factor, below = 1, _producer(head.input)  # walked through the graph: a class head's layers may sit between
    while isinstance(below, layers.UpSampling2D):
        if below.interpolation != "nearest" or below.size[0] != below.size[1]:
            return None
        factor *= below.size[0]
        below = _producer(below.input)
    if factor < 2:
        return None
    trunk = keras.Model(model.inputs, below.output, name=f"{model.name}_trunk")
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


def class_branch(model) -> "tuple[keras.Model, str, int] | None":
    """(class head as a model from its anchor's features to probabilities at their resolution, the anchor's
    name, the upsampling factor to the input grid), or None without a class head. Lets inference run the
    head on the trunk features it already has instead of a second pass."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    anchor = class_head_anchor(model)
    if anchor is None:
        return None
    probs = model.get_layer("class_probs")
    try:
        up = model.get_layer("class_up")
        factor = int(up.size[0])
    except ValueError:
        factor = 1
    return keras.Model(anchor.output, probs.output, name=f"{model.name}_classes"), anchor.name, factor
