"""Making the model right for a lab: QuPath points in regions, the one trainer, its check, its errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsiproc.cli import main
from wsiproc.detection.classes import CLASSES
from wsiproc.detection.model import DEFAULT_MODEL_PATH
from wsiproc.io.annotations import read_points, read_regions
from wsiproc.learn import datasets
from wsiproc.learn.annotated import fixed_held_out, load_domains
from wsiproc.learn.sampling import DomainSampler
from wsiproc.learn.targets import rasterise_regions
from wsiproc.learn.training import TrainingImage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _qupath_export(points_xy: np.ndarray, region_xy: list[tuple[float, float]] | None) -> dict:
    """What QuPath's "Export objects as GeoJSON" writes for a Points annotation inside a drawn polygon."""
    features = [{
        "type": "Feature", "id": "6a4e3c1e-0000-4000-8000-000000000001",
        "geometry": {"type": "MultiPoint", "coordinates": [[float(x), float(y)] for x, y in points_xy]},
        "properties": {"objectType": "annotation", "classification": {"name": "Nucleus", "color": [255, 0, 0]}},
    }]
    if region_xy is not None:
        features.append({
            "type": "Feature", "id": "6a4e3c1e-0000-4000-8000-000000000002",
            "geometry": {"type": "Polygon", "coordinates": [[list(v) for v in region_xy] + [list(region_xy[0])]]},
            "properties": {"objectType": "annotation", "classification": {"name": "Region*"}},
        })
    return {"type": "FeatureCollection", "features": features}


@pytest.fixture(scope="module")
def lab(tmp_path_factory, shared_data: Path) -> Path:
    """Three crc-dev images (0.55 µm/px) annotated as a QuPath user would: the left half of each in a drawn
    rectangle, the nuclei inside it as points (one GeoJSON per image)."""
    root = tmp_path_factory.mktemp("lab")
    (root / "images").mkdir()
    (root / "points").mkdir()
    for im in datasets.domain("crc", shared_data, "train")[:3]:
        shutil.copy(im.path, root / "images" / im.path.name)
        w = 250
        inside = im.points_xy[im.points_xy[:, 0] < w]
        region = [(-0.5, -0.5), (w - 0.5, -0.5), (w - 0.5, 499.5), (-0.5, 499.5)]
        (root / "points" / f"{im.name}.geojson").write_text(json.dumps(_qupath_export(inside, region)))
    return root


def test_qupath_points_inside_a_drawn_region_are_nuclei_and_the_region_is_not(lab: Path) -> None:
    path = lab / "points" / "img1.geojson"
    points = read_points(path)["img1"]
    regions = read_regions(path)["img1"]
    assert len(points) == len(json.loads(path.read_text())["features"][0]["geometry"]["coordinates"])
    assert len(regions) == 1 and regions[0].bounds == (-0.5, -0.5, 249.5, 499.5)


def test_a_file_of_outlines_has_no_regions(tmp_path: Path) -> None:
    square = [[[10, 20], [14, 20], [14, 24], [10, 24], [10, 20]]]
    path = tmp_path / "outlines.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square}, "properties": {"objectType": "annotation"}}]}))
    assert read_regions(path) == {}
    assert read_points(path)["outlines"].tolist() == [[12.0, 22.0]]


def test_regions_are_rasterised_by_pixel_centres_on_the_model_grid() -> None:
    from shapely.geometry import box

    # 0.25 µm/px level 0, model grid 0.5 µm/px: a 100 × 60 level-0 rectangle covers 50 × 30 model pixels.
    mask = rasterise_regions([box(-0.5, -0.5, 99.5, 59.5)], (100, 100), scale=2.0)
    assert mask.sum() == 50 * 30 and mask[29, 49] and not mask[30, 49] and not mask[29, 50]
    # What shapely's make_valid returns for a self-crossing outline: collections of polygons (and stray points).
    from shapely.geometry import GeometryCollection, MultiPolygon, Point

    odd = GeometryCollection([MultiPolygon([box(-0.5, -0.5, 9.5, 9.5), box(19.5, 19.5, 29.5, 29.5)]), Point(50, 50)])
    assert rasterise_regions([odd], (40, 40), scale=1.0).sum() == 2 * 10 * 10


def test_crops_of_a_partly_annotated_image_teach_only_inside_its_regions(shared_data: Path) -> None:
    from shapely.geometry import box

    a = datasets.domain("consep", shared_data, "train")[0]
    region = box(-0.5, -0.5, 299.5, 299.5)  # the top-left 300 × 300 px (level 0 = model grid at 0.5 µm/px)
    im = TrainingImage.from_level0(a.name, a.read_rgb(), a.points_xy, a.mpp, [region])
    assert im.annotated_px == 300 * 300
    sampler = DomainSampler({"lab": [im]}, crop_px=64, batch_size=16, seed=1)
    for step in range(3):
        x, y, w = sampler.batch(0, step)
        assert x.shape == (16, 64, 64, 3) and w.shape == (16, 64, 64)
        assert (w.reshape(16, -1).max(axis=1) == 1).all()  # every crop is centred on annotated pixels
        assert set(np.unique(w)) <= {0.0, 1.0}
    # Fully annotated: weight 1 everywhere.
    full = DomainSampler({"lab": [TrainingImage.from_level0(a.name, a.read_rgb(), a.points_xy, a.mpp)]}, 64, 4, seed=1)
    assert full.batch(0, 0)[2].min() == 1.0


def test_the_fixed_held_out_part_depends_on_names_only() -> None:
    assert fixed_held_out(["a"]) == set()
    assert fixed_held_out(["c", "a", "b"]) == {"c"}
    assert fixed_held_out([f"img{i:02d}" for i in range(1, 13)]) == {"img05", "img10"}


def test_the_domains_file_names_the_four_shipped_domains_with_their_splits(shared_data: Path) -> None:
    domains = load_domains(CONFIGS / "domains.yaml")
    assert [(d.name, len(d.train), len(d.held_out)) for d in domains] == [
        ("monuseg", 16, 14), ("crc", 40, 10), ("brca", 90, 30), ("consep", 21, 6)]
    assert all(d.builtin for d in domains)


def test_fine_tuning_the_shipped_model_on_qupath_points_trains_resumes_and_checks(lab: Path, tmp_path: Path) -> None:
    """The README's own-lab command in small: two training images, one held out (the fixed split), a few steps."""
    out = tmp_path / "lab.keras"
    def args(steps: int) -> list[str]:
        return ["train", "--images", str(lab / "images"), "--points", str(lab / "points"), "--mpp", "0.55",
                "--init-model", "default", "--out", str(out), "--steps", str(steps), "--batch-size", "2", "--crop-px", "64", "--quiet"]

    result = CliRunner().invoke(main, args(2))
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["training"]["steps"] == 2 and record["recipe"]["name"] == "fine-tune"
    assert record["start"]["init_model"].endswith("default.keras")
    lab_domain = record["domains"][0]
    assert [im["name"] for im in lab_domain["train"]] == ["img1", "img2"]
    assert [im["name"] for im in lab_domain["held_out"]] == ["img3"] and lab_domain["held_out"][0]["regions"] == 1
    (checked,) = record["check"]["domains"]
    assert checked["domain"] == "lab" and checked["images"] == 1
    assert 0.3 < checked["before"]["f1"] <= 1 and 0 <= checked["after"]["f1"] <= 1
    assert "| lab | 1 |" in result.output and "F1 change" in result.output
    # Its points name no nucleus type ("Nucleus"): the detector was trained, the shipped class head kept as it was.
    assert record["task"] == "detection" and record["class_head"]["retrained"] is False
    assert "class head was kept unchanged" in result.output
    # Resume: the same command with a larger budget continues from the checkpoint.
    result = CliRunner().invoke(main, args(3))
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "lab_checkpoints" / "state.json").read_text())
    assert state["step"] == 3
    # `wsiproc evaluate --model` repeats the check on the held-out image.
    result = CliRunner().invoke(main, ["evaluate", "--model", str(out), "--images", str(lab / "images" / "img3.png"),
                                       "--truth", str(lab / "points"), "--mpp", "0.55"])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("img3"))
    assert int(row.split()[1]) == int(np.sum(read_points(lab / "points" / "img3.geojson")["img3"][:, 0] < 249.5))


def test_training_from_scratch_through_the_cli_lowers_the_loss_and_resumes(tmp_path: Path, shared_data: Path) -> None:
    """Real crops of two domains, a U-Net from random weights: the loss on a fixed probe batch falls."""
    import keras

    from wsiproc.detection.architectures import build
    from wsiproc.detection.model import load_model
    from wsiproc.learn.annotated import builtin_domain
    from wsiproc.learn.train_domains import make_source
    from wsiproc.learn.trainer import RECIPES

    domains = tmp_path / "domains.yaml"
    domains.write_text(f"domains:\n  - dataset: crc\n    data: {shared_data}\n  - dataset: consep\n    data: {shared_data}\n")
    out = tmp_path / "m.keras"
    args = ["train", "--domains", str(domains), "--arch", "unet", "--out", str(out), "--steps", "40", "--lr", "2e-3",
            "--batch-size", "8", "--crop-px", "64", "--seed", "5", "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "training on 61 images, " in result.output  # 40 crc-dev + 21 CoNSeP training images
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["recipe"]["name"] == "shipped" and record["training"]["steps"] == 40
    assert [c["domain"] for c in record["check"]["domains"]] == ["crc", "consep"]
    assert all("before" not in c for c in record["check"]["domains"])  # from scratch: nothing to compare with

    probe = make_source([builtin_domain("crc", shared_data)], RECIPES["shipped"].replace(crop_px=64, batch_size=8, seed=99))
    x, y, w = probe.batch(7, 0)
    loss = keras.losses.BinaryCrossentropy()
    keras.utils.set_random_seed(5)
    before = float(loss(y, build("unet")(x, training=False)))
    after = float(loss(y, load_model(out)(x, training=False)))
    assert after < before * 0.8, (before, after)
    result = CliRunner().invoke(main, [*args[:args.index("--steps")], "--steps", "45", *args[args.index("--steps") + 2:]])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m_checkpoints" / "state.json").read_text())["step"] == 45


@pytest.mark.parametrize(("case", "message"), [
    ("missing", r"img2\.png: no annotations for this image"),
    ("empty", r"img2\.png: its annotations hold no nucleus and no region"),
    ("outside", r"img2\.png: 1 of \d+ annotated points fall outside the image \(500 × 500 px\)"),
])
def test_bad_annotations_are_one_line_naming_the_image(lab: Path, tmp_path: Path, case: str, message: str) -> None:
    import re

    points = tmp_path / "points"
    shutil.copytree(lab / "points", points)
    target = points / "img2.geojson"
    if case == "missing":
        target.unlink()
    elif case == "empty":
        target.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    else:
        data = json.loads(target.read_text())
        data["features"][0]["geometry"]["coordinates"].append([620.0, 10.0])
        target.write_text(json.dumps(data))
    result = CliRunner().invoke(main, ["train", "--images", str(lab / "images"), "--points", str(points), "--mpp", "0.55",
                                       "--init-model", "default", "--out", str(tmp_path / "m.keras"), "--steps", "1"])
    assert result.exit_code == 2
    assert re.search(message, result.output), result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "m.keras").exists()


def test_bfloat16_training_computes_in_bfloat16_with_a_float32_output() -> None:
    from wsiproc.detection.model import load_model, with_policy

    model = with_policy(load_model(), "mixed_bfloat16")
    assert model.layers[1].compute_dtype == "bfloat16" and model.layers[1].variable_dtype == "float32"
    assert model.layers[-1].compute_dtype == "float32"
    x = np.random.default_rng(0).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    reference = load_model()(x, training=False)
    assert float(np.abs(np.asarray(model(x, training=False)) - np.asarray(reference)).max()) < 0.05


def _qupath_classified(points_xy: np.ndarray, labels: list[str]) -> dict:
    """QuPath's export of classified points: one Points annotation per class, as its Points tool makes them."""
    features = []
    for i, name in enumerate(sorted(set(labels))):
        xy = points_xy[np.asarray(labels) == name]
        features.append({"type": "Feature", "id": f"6a4e3c1e-0000-4000-8000-00000000010{i}",
                         "geometry": {"type": "MultiPoint", "coordinates": xy.tolist()},
                         "properties": {"objectType": "annotation", "classification": {"name": name, "color": [0, 0, 255]}}})
    return {"type": "FeatureCollection", "features": features}


def test_teaching_nucleus_types_from_classified_qupath_points_keeps_detection_as_it_was(tmp_path: Path, shared_data: Path) -> None:
    """Three CoNSeP images whose points a lab classified in QuPath as Tumor / Immune cells / its own "CAF"
    (mapped with --class-map): `--task classes` trains the class head on the frozen trunk and checks it."""
    from wsiproc.detection.inference import Predictor

    lab = tmp_path / "lab"
    (lab / "images").mkdir(parents=True)
    (lab / "points").mkdir()
    qupath_name = {"epithelial": "Tumor", "inflammatory": "Immune cells", "spindle_other": "CAF"}
    for im in datasets.domain("consep", shared_data, "train")[:3]:
        shutil.copy(im.path, lab / "images" / im.path.name)
        labels = [qupath_name[str(v)] for v in im.labels]
        (lab / "points" / f"{im.name}.geojson").write_text(json.dumps(_qupath_classified(im.points_xy, labels)))
    out = tmp_path / "types.keras"
    args = ["train", "--images", str(lab / "images"), "--points", str(lab / "points"), "--mpp", "0.5", "--init-model",
            "default", "--task", "classes", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "CAF map to no class" in result.output  # named, not silently dropped
    result = CliRunner().invoke(main, [*args, "--class-map", "CAF=stromal"])
    assert result.exit_code == 0, result.output
    record = json.loads(out.with_suffix(".json").read_text())
    head = record["class_head"]
    assert record["task"] == "classes" and head["images"] == 2  # the third image is held out for the check
    assert all(n > 0 for n in head["examples_per_class"].values()) and head["class_map"]["user"] == {"caf": "stromal"}
    (checked,) = record["check"]["classes"]
    assert checked["domain"] == "lab" and set(checked) >= {"before", "after"}
    assert 0.3 < checked["after"]["f_d"] <= 1 and all(0 < checked["after"][f"f_c_{c}"] <= 1 for c in CLASSES)
    assert "F_c epithelial" in result.output
    # The detector is the one it started from, bit for bit: only the class head learnt.
    rgb = np.asarray(Image.open(lab / "images" / "train_3.png").convert("RGB"))[None, :128, :128]
    new, old = (Predictor(p, precision="float32", engine="tensorflow") for p in (out, DEFAULT_MODEL_PATH))
    np.testing.assert_array_equal(new(rgb), old(rgb))
    assert new.classes == CLASSES and not np.array_equal(new.maps(rgb)[1], old.maps(rgb)[1])
