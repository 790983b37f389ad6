"""Teach a detector what its nuclei are: a class head trained on a frozen trunk from cached features.

The trunk (everything up to the features the class head reads, `architectures.CLASS_HEAD_ANCHORS`) is what
finds nuclei; it stays as it is, so detection does not change at all. The head is small (one 3 × 3 and two
1 × 1 convolutions at the features' resolution) and a nucleus' class is read at its centroid, so the head only
ever needs the 3 × 3 feature pixels around each labelled point: those are computed once per image and view
(four dihedral views, stain-jittered after the first) and cached, and the head then trains on them in
seconds on a CPU. That is why a lab can teach classes on two cores; joint training of trunk and head would
need a GPU for the same data.

Points are labelled with class indices (`classes.CLASSES`, −1 for none); `ClassMap` turns a lab's or a data
set's names into them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..detection.classes import CLASSES
from ..detection.model import MODEL_MPP
from ..detection.model_files import ModelFiles
from .augment import stain_jitter
from ..detection.architectures import CLASS_HEAD_ANCHORS, CLASS_HEAD_LAYERS, _receptive_walk, attach_class_head, class_head_anchor
from ..io.files import atomic_path
from ..io.resample import map_coords, rescale_rgb

#: White margin (model px) around an image when its features are computed: what a run's tile halo holds
#: beyond a slide's edge (glass), so features at the border look as they will at inference.
MARGIN_PX = 32


@dataclass(frozen=True)
class LabelledImage:
    """One image at the model's grid (0.5 µm/px) with class-labelled points (model pixels, x = column)."""

    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    points_xy: np.ndarray  # (N, 2)
    class_index: np.ndarray  # (N,) into CLASSES, −1: no class (left out)

    @classmethod
    def from_level0(cls, name: str, rgb: np.ndarray, points_xy: np.ndarray, class_index: np.ndarray,
                    mpp: float) -> "LabelledImage":
        pts = np.asarray(points_xy, np.float64).reshape(-1, 2)
        small = rescale_rgb(np.asarray(rgb)[..., :3], mpp, MODEL_MPP)
        return cls(name, np.ascontiguousarray(small), map_coords(pts, mpp, MODEL_MPP), np.asarray(class_index, np.int64))


@dataclass(frozen=True)
class HeadRecipe:
    """How the class head is trained: the shipped head's recipe (`benchmarks/train_classes.py`; BRCA-M2C's
    validation split judged it, never the test images the model card reports)."""

    views: int = 4  # dihedral views per image; views after the first are also stain-jittered
    stain_sigma: float = 0.05  # HED jitter of the extra views (`augment.stain_jitter`)
    epochs: int = 20
    batch_size: int = 1024
    learning_rate: float = 2e-3
    feature_dropout: float = 0.2  # dropout on the cached trunk features: the head must not lean on a few channels
    width: int = 64
    balanced: bool = False  # weight classes by inverse frequency (off: plain cross-entropy maximises accuracy)
    seed: int = 0

    def replace(self, **changes) -> "HeadRecipe":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


@dataclass(frozen=True)
class Examples:
    """Cached trunk features around labelled points: (N, 3, 3, C) float16, with class and source image."""

    features: np.ndarray
    labels: np.ndarray  # (N,) int
    image: np.ndarray  # (N,) index into the image names
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial.npz")
        np.savez(tmp, features=self.features, labels=self.labels, image=self.image, names=np.asarray(self.names))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Examples":
        with np.load(path) as z:
            return cls(z["features"], z["labels"], z["image"], tuple(str(n) for n in z["names"]))

    @classmethod
    def concat(cls, parts: Sequence["Examples"]) -> "Examples":
        names: list[str] = []
        image = []
        for p in parts:
            image.append(p.image + len(names))
            names.extend(p.names)
        return cls(np.concatenate([p.features for p in parts]), np.concatenate([p.labels for p in parts]),
                   np.concatenate(image), tuple(names))


def feature_model(model):
    """The trunk up to what the class head reads (`architectures.CLASS_HEAD_ANCHORS`), and the factor between
    its grid and the input's."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    anchor = class_head_anchor(model) or model.get_layer(CLASS_HEAD_ANCHORS.get(model.name, ""))
    factor = int(round(_receptive_walk(model)[id(anchor)][1]))
    return keras.Model(model.inputs, anchor.output, name=f"{model.name}_features"), factor


def _dihedral(rgb: np.ndarray, view: int) -> np.ndarray:
    out = np.rot90(rgb, view % 4)
    return out[:, ::-1] if view >= 4 else out


def _undo_dihedral(features: np.ndarray, view: int) -> np.ndarray:
    out = features[:, ::-1] if view >= 4 else features
    return np.rot90(out, -(view % 4))


#: Views in the order they are used: as is, the three turns, then their mirror images.
_VIEW_ORDER = (0, 2, 5, 7, 1, 3, 4, 6)


def image_examples(forward: Callable[[np.ndarray], np.ndarray], factor: int, image: LabelledImage, views: int,
                   stain_sigma: float, rng: np.random.Generator) -> Examples:
    """Trunk features around each labelled point of one image, in `views` views (`forward`: float [0, 1]
    (1, H, W, 3) → (1, H/f, W/f, C))."""
    keep = image.class_index >= 0
    xy, labels = image.points_xy[keep], image.class_index[keep]
    h, w = image.rgb.shape[:2]
    hp = -(-(h + 2 * MARGIN_PX) // factor) * factor
    wp = -(-(w + 2 * MARGIN_PX) // factor) * factor
    padded = np.full((hp, wp, 3), 255, np.uint8)
    padded[MARGIN_PX : MARGIN_PX + h, MARGIN_PX : MARGIN_PX + w] = image.rgb
    # The class of a nucleus is read at the pixel holding its centroid (`classes.read_class_probs`), which the
    # nearest upsampling takes from feature pixel ⌊pixel / f⌋.
    qy = (np.clip(np.rint(xy[:, 1]), 0, h - 1).astype(np.int64) + MARGIN_PX) // factor
    qx = (np.clip(np.rint(xy[:, 0]), 0, w - 1).astype(np.int64) + MARGIN_PX) // factor
    dy, dx = np.mgrid[-1:2, -1:2]
    parts = []
    for v in _VIEW_ORDER[:views]:
        rgb = padded.astype(np.float32) / 255.0
        if v != 0 and stain_sigma > 0:
            rgb = stain_jitter(rgb, rng, stain_sigma)
        feats = np.asarray(forward(np.ascontiguousarray(_dihedral(rgb, v))[None]))[0]
        feats = _undo_dihedral(feats, v)
        feats = np.pad(feats, ((1, 1), (1, 1), (0, 0)))  # zeros beyond the margin (never reached in practice)
        parts.append(feats[qy[:, None, None] + 1 + dy, qx[:, None, None] + 1 + dx].astype(np.float16))
    n = len(labels)
    return Examples(np.concatenate(parts) if parts else np.zeros((0, 3, 3, 1), np.float16),
                    np.tile(labels, len(parts)), np.zeros(n * len(parts), np.int64), (image.name,))


def collect_examples(model, images: Sequence[LabelledImage], recipe: HeadRecipe = HeadRecipe(),
                     cache_dir: str | Path | None = None, progress: Callable[[int, int], None] | None = None) -> Examples:
    """Cached features of every image (`cache_dir`: one .npz per image and recipe, reused when rerun)."""
    import tensorflow as tf  # lazy: seconds to import; the OpenVINO path never needs it

    fmodel, factor = feature_model(model)

    @tf.function(reduce_retracing=True)
    def forward(x):
        return fmodel(x, training=False)

    rng = np.random.default_rng(recipe.seed)
    parts = []
    for i, im in enumerate(images):
        path = None
        if cache_dir is not None:
            key = f"{im.name}-v{recipe.views}-s{recipe.stain_sigma}-n{int((im.class_index >= 0).sum())}"
            path = Path(cache_dir) / f"{key}.npz"
        if path is not None and path.is_file():
            ex = Examples.load(path)
        else:
            ex = image_examples(forward, factor, im, recipe.views, recipe.stain_sigma, np.random.default_rng([recipe.seed, i]))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                ex.save(path)
        parts.append(ex)
        if progress:
            progress(i + 1, len(images))
    del rng
    return Examples.concat(parts)


def head_for_examples(channels: int, recipe: HeadRecipe):
    """The class head as a model on (3, 3, C) feature patches: the same layers (names, shapes) as
    `architectures.attach_class_head`, with 'valid' padding so one patch gives one prediction."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it
    from keras import layers  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    inputs = keras.Input((3, 3, channels), name="features")
    x = layers.Dropout(recipe.feature_dropout, name="feature_dropout")(inputs) if recipe.feature_dropout else inputs
    x = layers.Conv2D(recipe.width, 3, padding="valid", activation="relu", name="class_conv")(x)
    x = layers.Conv2D(recipe.width, 1, activation="relu", name="class_mix")(x)
    x = layers.Conv2D(len(CLASSES), 1, name="class_logits")(x)
    x = layers.Reshape((len(CLASSES),))(x)
    return keras.Model(inputs, layers.Softmax(name="class_probs")(x), name="class_head")


@dataclass(frozen=True)
class HeadResult:
    """What training the head did: examples per class, loss per epoch, seconds, and accuracy on `val`."""

    examples_per_class: dict
    loss_history: list
    seconds: float
    val_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def train_head(train: Examples, recipe: HeadRecipe = HeadRecipe(), val: Examples | None = None,
               echo: Callable[[str], None] | None = None):
    """(head model on patches, HeadResult): Adam on cross-entropy, the learning rate cosine-decayed to zero."""
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    if len(train) == 0:
        raise ValueError("no class-labelled points to train the class head on")
    keras.utils.set_random_seed(recipe.seed)
    head = head_for_examples(train.features.shape[-1], recipe)
    steps = recipe.epochs * -(-len(train) // recipe.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(recipe.learning_rate, steps)
    head.compile(keras.optimizers.Adam(schedule), "sparse_categorical_crossentropy", metrics=["accuracy"])
    counts = np.bincount(train.labels, minlength=len(CLASSES))
    weights = None
    if recipe.balanced:
        freq = counts / counts.sum()
        weights = {i: float(1.0 / (len(CLASSES) * max(f, 1e-6))) for i, f in enumerate(freq)}
    t0 = time.perf_counter()
    history = head.fit(train.features.astype(np.float32), train.labels, batch_size=recipe.batch_size,
                       epochs=recipe.epochs, shuffle=True, class_weight=weights, verbose=0)
    seconds = time.perf_counter() - t0
    val_acc = None
    if val is not None and len(val):
        pred = head.predict(val.features.astype(np.float32), batch_size=4096, verbose=0).argmax(1)
        val_acc = float((pred == val.labels).mean())
    loss = [round(float(v), 5) for v in history.history["loss"]]
    if echo:
        echo(f"class head: {len(train)} examples, {recipe.epochs} epochs in {seconds:.0f} s, final loss {loss[-1]:.4f}"
             + (f", validation accuracy {val_acc:.3f}" if val_acc is not None else ""))
    return head, HeadResult({c: int(n) for c, n in zip(CLASSES, counts)}, loss, round(seconds, 1), val_acc)


def with_trained_head(model, head):
    """The detector with the trained head attached (`attach_class_head`, weights copied by layer name); `head`
    may also be another model that carries a class head (`trainer.carry_class_head`)."""
    width = head.get_layer("class_conv").filters
    out = attach_class_head(model, len(CLASSES), width=width)
    for name in CLASS_HEAD_LAYERS:
        out.get_layer(name).set_weights(head.get_layer(name).get_weights())
    return out


def write_provenance(model_path: str | Path, record: dict) -> Path:
    """`<model>.classes.json`: the head's recipe, data and result, beside the model it belongs to."""
    path = ModelFiles.of(model_path).class_head
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    return path
