"""The detection networks, selectable by name, and the geometry each one declares.

Every network has the same contract: RGB in [0, 1] at 0.5 µm/px in, a one-channel nucleus confidence map of
the same size out, built from standard Keras layers only (so `.keras` files load with `safe_mode=True` and
convert to other engines). What differs between them is what the tiler must know: the multiple that input
sides must have (one per pooling level) and the halo a tile needs so that its core sees its whole receptive
field (tiled output = untiled output). Both are derived from the layers, not written by hand, so a new
architecture cannot declare them wrongly.

- ``paper``: Valkonen et al.: VGG-16 blocks 1–2, four 512-channel convolutions at quarter resolution, two
  nearest 2× upsamplings and a 3 × 3 sigmoid convolution. About 0.56 M multiply-adds per pixel.
- ``vgg-lean``: the same VGG block 1–2 stem (so ImageNet initialisation applies), a slim depthwise-separable
  head and skip connections from blocks 2 and 1 for sharp, separable peaks. About a fifth of the cost.
- ``unet``: a plain 4-level U-Net of width 16 (``unet32``: width 32). Tens of times cheaper than the paper.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

#: torchvision's ImageNet normalisation, which the shared VGG-16 weights expect (RGB in [0, 1]).
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], dtype=np.float64)
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], dtype=np.float64)
VGG_LAYER_NAMES = ("block1_conv1", "block1_conv2", "block2_conv1", "block2_conv2")


def _vgg_stem(x, layers):
    """VGG-16 blocks 1–2 with Keras' layer names; returns (block1 features, block2 features, pooled)."""
    x = layers.Conv2D(64, 3, padding="same", activation="relu", name="block1_conv1")(x)
    b1 = layers.Conv2D(64, 3, padding="same", activation="relu", name="block1_conv2")(x)
    x = layers.MaxPooling2D(2, name="block1_pool")(b1)
    x = layers.Conv2D(128, 3, padding="same", activation="relu", name="block2_conv1")(x)
    b2 = layers.Conv2D(128, 3, padding="same", activation="relu", name="block2_conv2")(x)
    return b1, b2, layers.MaxPooling2D(2, name="block2_pool")(b2)


def build_paper(dropout: float = 0.5):
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    inputs = keras.Input(shape=(None, None, 3), name="rgb")
    _, _, x = _vgg_stem(inputs, layers)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv3_1")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv3_2")(x)
    x = layers.Dropout(dropout, name="dropout_1")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv4_1")(x)
    x = layers.Conv2D(512, 3, padding="same", activation="relu", name="conv4_2")(x)
    x = layers.Dropout(dropout, name="dropout_2")(x)
    x = layers.UpSampling2D(2, name="up_1")(x)
    x = layers.UpSampling2D(2, name="up_2")(x)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="confidence", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="valkonen_nuclei")


def build_vgg_lean(dropout: float = 0.1, head_channels: int = 256):
    """VGG stem + separable head at 1/4, decoded with skips from block 2 (1/2) and block 1 (full resolution)."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    inputs = keras.Input(shape=(None, None, 3), name="rgb")
    b1, b2, x = _vgg_stem(inputs, layers)
    x = layers.SeparableConv2D(head_channels, 3, padding="same", activation="relu", name="head_sep1")(x)
    x = layers.SeparableConv2D(head_channels, 3, padding="same", activation="relu", name="head_sep2")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    x = layers.UpSampling2D(2, name="up_2")(x)
    x = layers.Concatenate(name="skip_block2")([x, b2])
    x = layers.SeparableConv2D(128, 3, padding="same", activation="relu", name="dec2_sep")(x)
    x = layers.UpSampling2D(2, name="up_1")(x)
    x = layers.Concatenate(name="skip_block1")([x, b1])
    x = layers.SeparableConv2D(32, 3, padding="same", activation="relu", name="dec1_sep")(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="confidence", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="vgg_lean_nuclei")


def build_unet(width: int = 16, levels: int = 4, dropout: float = 0.0):
    """A plain U-Net: two 3 × 3 ReLU convolutions per level, 2× max-pooling down, 2 × 2 transposed conv up."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    inputs = keras.Input(shape=(None, None, 3), name="rgb")
    x, skips = inputs, []
    for level in range(levels):
        ch = width * 2**level
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"enc{level}_conv1")(x)
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"enc{level}_conv2")(x)
        if level < levels - 1:
            skips.append(x)
            x = layers.MaxPooling2D(2, name=f"enc{level}_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="bottom_dropout")(x)
    for level in reversed(range(levels - 1)):
        ch = width * 2**level
        x = layers.Conv2DTranspose(ch, 2, strides=2, activation="relu", name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_skip")([x, skips[level]])
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"dec{level}_conv1")(x)
        x = layers.Conv2D(ch, 3, padding="same", activation="relu", name=f"dec{level}_conv2")(x)
    outputs = layers.Conv2D(1, 1, activation="sigmoid", name="confidence", dtype="float32")(x)
    return keras.Model(inputs, outputs, name=f"unet{width}_nuclei")


#: name → builder. The model's own name (saved in the `.keras` file) says which it is.
ARCHITECTURES: dict[str, Callable] = {
    "paper": build_paper,
    "vgg-lean": build_vgg_lean,
    "unet": lambda **kw: build_unet(width=16, **kw),
    "unet32": lambda **kw: build_unet(width=32, **kw),
}


def build(arch: str, **kwargs):
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)


#: Where a class head reads the trunk, per architecture (the model's own name): the last features before the
#: confidence map's upsampling, so the head sees everything the detector knows at no extra trunk cost.
CLASS_HEAD_ANCHORS = {"valkonen_nuclei": "dropout_2", "vgg_lean_nuclei": "head_dropout"}
#: The class head's layers with weights (trained by `wsiproc.learn.class_head` on a frozen trunk; copied by name).
CLASS_HEAD_LAYERS = ("class_conv", "class_mix", "class_logits")
#: The model's output with a class head: confidence in channel 0, class probabilities after it.
CLASS_OUTPUT_LAYER = "confidence_and_classes"


def attach_class_head(model, n_classes: int, at: str | None = None, width: int = 64):
    """The same network with a class head: (B, H, W, 1 + n_classes) out, confidence first, softmax after.

    The head is a 3 × 3 convolution (`width` channels) and two 1 × 1 ones on the trunk's features at `at`
    (default `CLASS_HEAD_ANCHORS`), a softmax at that layer's resolution, and a nearest upsampling to the input
    grid. On the paper's network that is 1/4 resolution: about 3 % more multiply-adds than detection alone.
    One 3 × 3 layer keeps the head's receptive field inside the tile halo detection already needs
    (`geometry`: `class_receptive_radius_px`), so tiles do not grow. The confidence path is untouched (same
    layers, same weights): detection is exactly what it was.
    """
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    if has_class_head(model):
        model = without_class_head(model)
    anchor = model.get_layer(at or CLASS_HEAD_ANCHORS.get(model.name, ""))  # ValueError names a missing layer
    walk = _receptive_walk(model)
    factor = int(round(walk[id(anchor)][1]))
    x = layers.Conv2D(width, 3, padding="same", activation="relu", name="class_conv")(anchor.output)
    x = layers.Conv2D(width, 1, activation="relu", name="class_mix")(x)
    x = layers.Conv2D(n_classes, 1, name="class_logits")(x)
    probs = layers.Softmax(name="class_probs", dtype="float32")(x)
    if factor > 1:
        probs = layers.UpSampling2D(factor, interpolation="nearest", name="class_up", dtype="float32")(probs)
    confidence = model.outputs[0]
    out = layers.Concatenate(name=CLASS_OUTPUT_LAYER, dtype="float32")([confidence, probs])
    return keras.Model(model.inputs, out, name=model.name)


def has_class_head(model) -> bool:
    return any(layer.name == "class_probs" for layer in model.layers)


def without_class_head(model):
    """The detector alone (the same layer objects: training it trains the class model's trunk too)."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    if not has_class_head(model):
        return model
    return keras.Model(model.inputs, model.get_layer("confidence").output, name=model.name)


def class_head_anchor(model):
    """The layer whose output the class head reads, or None without a class head."""
    if not has_class_head(model):
        return None
    return _producer(model.get_layer("class_conv").input)


def _producer(tensor):
    """The layer that made a symbolic tensor (Keras 3 keeps it in `_keras_history`)."""
    return tensor._keras_history[0]


def has_vgg_stem(model) -> bool:
    names = {layer.name for layer in model.layers}
    return all(n in names for n in VGG_LAYER_NAMES)


def load_vgg16_npz(model, npz_path: str | Path, freeze: bool = False) -> None:
    """Copy the shared ImageNet VGG-16 block 1–2 weights (torchvision's) into `model`'s stem.

    torchvision's VGG expects `(x − mean) / std` per RGB channel; the network here takes plain RGB in [0, 1].
    The normalisation is affine, so it folds into the first convolution: kernel / std on the input axis and
    bias − Σ kernel·mean/std. Inside the image this is exact; at the zero-padded image border the folded layer
    pads with x = 0 where torchvision would pad with z = 0 (x = mean), an edge effect training absorbs.
    """
    npz_path = Path(npz_path)
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: VGG-16 weights file not found")
    if not has_vgg_stem(model):
        raise ValueError(f"{npz_path}: model {model.name!r} has no VGG-16 block 1–2 stem to initialise")
    with np.load(npz_path) as data:
        for name in VGG_LAYER_NAMES:
            kernel = data[f"{name}/kernel"].astype(np.float64)
            bias = data[f"{name}/bias"].astype(np.float64)
            if name == "block1_conv1":
                bias = bias - np.einsum("hwio,i->o", kernel, IMAGENET_MEAN_RGB / IMAGENET_STD_RGB)
                kernel = kernel / IMAGENET_STD_RGB[None, None, :, None]
            layer = model.get_layer(name)
            layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
            layer.trainable = not freeze


@dataclass(frozen=True)
class Geometry:
    """What the tiler needs from a network, in pixels of the model grid (0.5 µm/px)."""

    size_multiple_px: int  # input sides must be multiples of this (2 ** number of poolings)
    receptive_radius_px: int  # half the receptive field, rounded up
    halo_px: int  # receptive radius rounded up to a multiple of size_multiple_px
    class_receptive_radius_px: int = 0  # the class map's, where the model has a class head


def _receptive_walk(model) -> dict[int, tuple[float, float]]:
    """(receptive field, jump) of every layer's output, keyed by id(layer), walked through the model's graph.

    Each tensor carries (receptive field, jump = input pixels per step). A k × k convolution adds (k − 1)·jump
    (times its dilation); a pooling of stride s adds (s − 1)·jump and multiplies the jump by s; an upsampling
    or transposed convolution of stride s divides it (a transposed k × k kernel first adds (k/s − 1)·jump
    at the coarse step); a merge takes the widest input.
    """
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    state: dict[int, tuple[float, float]] = {}
    by_layer: dict[int, tuple[float, float]] = {}
    for layer in model.layers:
        ins = layer.input if isinstance(layer.input, list) else [layer.input]
        if isinstance(layer, layers.InputLayer):
            state[id(layer.output)] = by_layer[id(layer)] = (1.0, 1.0)
            continue
        rf = max(state[id(t)][0] for t in ins)
        jump = max(state[id(t)][1] for t in ins)
        if isinstance(layer, layers.Conv2DTranspose):
            s, k = layer.strides[0], layer.kernel_size[0]
            rf += max(0.0, math.ceil(k / s) - 1) * jump
            jump /= s
        elif isinstance(layer, (layers.Conv2D, layers.SeparableConv2D, layers.DepthwiseConv2D)):
            k, d, s = layer.kernel_size[0], layer.dilation_rate[0], layer.strides[0]
            rf += (k - 1) * d * jump
            jump *= s
        elif isinstance(layer, (layers.MaxPooling2D, layers.AveragePooling2D)):
            p, s = layer.pool_size[0], layer.strides[0]
            rf += (p - 1) * jump
            jump *= s
        elif isinstance(layer, layers.UpSampling2D):
            jump /= layer.size[0]
        state[id(layer.output)] = by_layer[id(layer)] = (rf, jump)
    return by_layer


def geometry(model) -> Geometry:
    """Receptive field and pooling multiple of a network, from its layers (`_receptive_walk`).

    With a class head the receptive radius is the confidence map's (post-processing looks around it) and
    `class_receptive_radius_px` the class map's (read only at a centroid, which lies in the tile's core)."""
    walk = _receptive_walk(model)
    multiple = int(round(max(jump for _, jump in walk.values())))
    if has_class_head(model):
        rf = walk[id(model.get_layer("confidence"))][0]
        class_radius = int(math.ceil(walk[id(model.get_layer("class_probs"))][0] / 2))
    else:
        rf = walk[id(model.layers[-1])][0]  # a one-output functional model lists its output layer last
        class_radius = 0
    radius = int(math.ceil(rf / 2))
    need = max(radius, class_radius)
    return Geometry(multiple, radius, int(math.ceil(need / multiple) * multiple), class_radius)


def multiply_adds_per_pixel(model) -> float:
    """Multiply-adds of one forward pass per input pixel (convolutions only; the rest is negligible).

    A layer whose output has a jump of j input pixels per step computes its per-output-pixel cost on 1/j² of
    the input's pixels."""
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    walk = _receptive_walk(model)
    total = 0.0
    for layer in model.layers:
        if not isinstance(layer, (layers.Conv2D, layers.SeparableConv2D, layers.Conv2DTranspose, layers.DepthwiseConv2D)):
            continue
        cin, cout = layer.input.shape[-1], layer.output.shape[-1]
        k = layer.kernel_size[0] * layer.kernel_size[1]
        if isinstance(layer, layers.SeparableConv2D):
            per_out_px = k * cin * layer.depth_multiplier + cin * layer.depth_multiplier * cout
        elif isinstance(layer, layers.DepthwiseConv2D):
            per_out_px = k * cin * layer.depth_multiplier
        elif isinstance(layer, layers.Conv2DTranspose):
            per_out_px = k * cin * cout / (layer.strides[0] * layer.strides[1])
        else:
            per_out_px = k * cin * cout
        total += per_out_px / walk[id(layer)][1] ** 2
    return total
