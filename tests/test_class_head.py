"""The class head: one more output on the detector's trunk that leaves detection exactly as it was, runs the same
on every engine, and learns nucleus types from cached trunk features."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsiproc.detection.classes import CLASSES, ClassMap, read_class_probs


def _real_tiles(shared_data: Path, n: int = 2, side: int = 128) -> np.ndarray:
    rgb = np.asarray(Image.open(shared_data / "consep-train" / "images" / "train_1.png").convert("RGB"))
    return np.stack([rgb[i * side : (i + 1) * side, :side] for i in range(n)])


@pytest.fixture(scope="module")
def base_and_head(shipped_model: Path):
    """The shipped detector without its class head, and with a freshly initialised one."""
    from wsiproc.detection.architectures import attach_class_head, without_class_head
    from wsiproc.detection.model import load_model

    base = without_class_head(load_model(shipped_model))
    return base, attach_class_head(base, len(CLASSES))


def test_a_class_head_leaves_the_confidence_map_and_the_halo_exactly_as_they_were(base_and_head, shared_data: Path) -> None:
    from wsiproc.detection.architectures import geometry, multiply_adds_per_pixel
    from wsiproc.detection.forward import keras_forward

    base, with_head = base_and_head
    x = _real_tiles(shared_data)
    before = np.asarray(keras_forward(base)(x))
    after = np.asarray(keras_forward(with_head)(x))
    assert before.shape == (2, 128, 128) and after.shape == (2, 128, 128, 1 + len(CLASSES))
    np.testing.assert_array_equal(after[..., 0], before)
    np.testing.assert_allclose(after[..., 1:].sum(-1), 1.0, atol=1e-5)  # probabilities
    g0, g1 = geometry(base), geometry(with_head)
    assert (g1.receptive_radius_px, g1.size_multiple_px) == (g0.receptive_radius_px, g0.size_multiple_px)
    assert 0 < g1.class_receptive_radius_px <= 32  # inside the halo every tile already has: tiles do not grow
    assert 1.0 < multiply_adds_per_pixel(with_head) / multiply_adds_per_pixel(base) < 1.05


def test_the_sub_pixel_forward_equals_the_graph_as_built(base_and_head, shared_data: Path) -> None:
    from wsiproc.detection.forward import keras_forward

    _, with_head = base_and_head
    x = _real_tiles(shared_data)
    graph = np.asarray(with_head(x.astype(np.float32) / 255.0))
    np.testing.assert_allclose(np.asarray(keras_forward(with_head)(x)), graph, atol=1e-5)


def test_openvino_and_tensorflow_give_the_same_class_maps(base_and_head, shared_data: Path, tmp_path: Path) -> None:
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import save_model

    path = save_model(base_and_head[1], tmp_path / "with_head.keras")
    x = _real_tiles(shared_data)
    tf_pred = Predictor(path, precision="float32", engine="tensorflow")
    ov_pred = Predictor(path, precision="float32", engine="openvino", cache_dir=tmp_path / "cache")
    assert tf_pred.classes == ov_pred.classes == CLASSES
    (c_tf, p_tf), (c_ov, p_ov) = tf_pred.maps(x), ov_pred.maps(x)
    assert p_tf.shape == p_ov.shape == (2, 128, 128, 3)
    np.testing.assert_allclose(c_ov, c_tf, atol=1e-4)
    np.testing.assert_allclose(p_ov, p_tf, atol=1e-4)
    np.testing.assert_array_equal(ov_pred(x), c_ov)  # calling a predictor still gives the confidence alone


def test_class_probabilities_are_read_at_the_centroid_or_averaged_over_its_disk() -> None:
    probs = np.zeros((10, 10, 3), np.float32)
    probs[..., 2] = 1.0
    probs[4:7, 4:7] = [1.0, 0.0, 0.0]
    at = read_class_probs(probs, np.array([5.2, 0.0, 20.0]), np.array([4.6, 0.0, -3.0]))
    np.testing.assert_array_equal(at, [[1, 0, 0], [0, 0, 1], [0, 0, 1]])  # rounded; clipped at the edges
    disk = read_class_probs(probs, np.array([5.0]), np.array([5.0]), radius_px=2.0)
    assert disk[0, 0] == pytest.approx(9 / 13) and disk[0, 2] == pytest.approx(4 / 13)  # 13 pixels within 2 px


def test_a_users_class_names_map_onto_the_model_classes_and_a_typo_is_named() -> None:
    cmap = ClassMap.parse("Tumour cells=epithelial, TILs=inflammatory, Unsure=ignore")
    labels = ["Tumour cells", "TILs", "unsure", "Lymphocyte", "spindle_other", None]
    assert cmap.indices(labels).tolist() == [0, 1, -1, 1, 2, -1]
    with pytest.raises(ValueError, match=r"x\.geojson: label\(s\) Tumor celss map to no class"):
        cmap.indices(["Tumor celss"], "x.geojson")
    with pytest.raises(ValueError, match="not a class"):
        ClassMap.parse("TILs=lymph")


def test_the_head_learns_nucleus_types_from_cached_trunk_features(base_and_head, shared_data: Path) -> None:
    """Three CoNSeP images, one view: the head trained on the frozen trunk's features tells the types apart on
    a held-out image far better than always answering its most frequent class."""
    import csv

    from wsiproc.learn.class_head import HeadRecipe, LabelledImage, collect_examples, train_head, with_trained_head

    root = shared_data / "consep-train"
    rows: dict[str, list] = {}
    with open(root / "points.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            rows.setdefault(r["image"], []).append(r)
    cmap = ClassMap()

    def image(name: str) -> LabelledImage:
        pts = rows[name]
        rgb = np.asarray(Image.open(root / "images" / f"{name}.png").convert("RGB"))
        xy = np.array([(float(p["x"]), float(p["y"])) for p in pts])
        return LabelledImage(name, rgb, xy, cmap.indices([p["class"] for p in pts]))

    base, _ = base_and_head
    recipe = HeadRecipe(views=1, epochs=30, batch_size=128)
    train = collect_examples(base, [image(n) for n in ("train_1", "train_3", "train_6")], recipe)
    test = collect_examples(base, [image("train_10")], recipe)  # all three types, none above 40 %
    head, result = train_head(train, recipe, test)
    majority = np.bincount(test.labels, minlength=3).max() / len(test)
    assert len(train) > 1000 and result.examples_per_class["epithelial"] > 0
    assert result.val_accuracy > majority + 0.1, (result.val_accuracy, majority)
    model = with_trained_head(base, head)  # the same weights answer on a whole image
    from wsiproc.detection.forward import keras_forward

    im = image("train_10")
    probs = np.asarray(keras_forward(model)(im.rgb[None, :496, :496]))[0, ..., 1:]
    inside = (im.points_xy[:, 0] < 496) & (im.points_xy[:, 1] < 496) & (im.class_index >= 0)
    read = read_class_probs(probs, im.points_xy[inside, 1], im.points_xy[inside, 0]).argmax(1)
    assert (read == im.class_index[inside]).mean() > majority + 0.05
