"""The GeoJSON that `write_geojson` writes, checked against what QuPath's own reader expects.

The rules below come from QuPath's source (qupath/qupath, qupath-core, `qupath.lib.io`, read at commit
0a77ded42fca9cf3c48263cb1e756ba3f98fa9a1):

- `PathObjectTypeAdapters.PathObjectCollectionTypeAdapter.read`: a FeatureCollection is an object whose
  "features" is an array; each element is read as one object.
- `PathObjectTypeAdapters.PathObjectTypeAdapter.read`:
  * the feature-level "id" is parsed with `UUID.fromString` (since v0.4); the v0.2 legacy ids
    ("PathDetectionObject", …) would instead be taken as the object type;
  * the object type is `properties.objectType` ("detection" → `PathObjects.createDetectionObject`; a
    missing type ("unknown") silently makes an *annotation*, which QuPath treats very differently);
  * `properties.measurements` must be a JSON object (name → number, the v0.4+ form written by
    `MeasurementListTypeAdapter.write`) or the legacy array of {name, value};
  * `properties.classification` goes to `GsonTools.PathClassTypeAdapter.read`, whose proxy form needs
    "name" (or "names") *and* "color"; `arrayToRgb` takes a colour array of length 0, 1, 3 or 4 ([r, g, b]
    ints, as `PathClassTypeAdapter.write` writes them).
- `ROITypeAdapters.parseGeometry` / `parseCoordinate`: a "Point" geometry with [x, y] (or [x, y, z]) becomes a
  point ROI in image pixel units.
- `GeneralTools.micrometerSymbol()` is "\\u00B5m" (micro sign), the spelling QuPath's own area measurements use.
- `ContourTracingUtils` traces label images as one-pixel horizontal/vertical segments along pixel edges, i.e.
  QuPath's pixel (i, j) spans [i, i+1) × [j, j+1): a pixel's centre is at index + 0.5.
"""
from __future__ import annotations

import csv
import gzip
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from wsiproc.detection.classes import CLASSES, QUPATH_CLASSES
from wsiproc.detection.detections import Detections
from wsiproc.outputs.formats import write_csv, write_geojson

QUPATH_LEGACY_TYPE_IDS = {"PathTileObject", "PathCellObject", "TMACoreObject", "PathDetectionObject", "PathRootObject",
                          "PathAnnotationObject"}
QUPATH_OBJECT_TYPES = {"tile", "cell", "detection", "annotation", "tmaCore", "root"}
MPP = 0.2527


@pytest.fixture
def det(make_detections) -> Detections:
    return make_detections(seed=11, n=257, width_px=5000, height_px=4000, confidence=(0.5, 1.0), area_um2=(2, 40))


def _load(path: Path) -> dict:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        # Strict JSON: no NaN/Infinity (Gson in QuPath is lenient, other readers are not).
        return json.load(fh, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))


@pytest.mark.parametrize("classes", [False, True])
@pytest.mark.parametrize("gz", [False, True])
def test_geojson_follows_qupath_reader(det: Detections, tmp_path: Path, gz: bool, classes: bool) -> None:
    if classes:  # nucleus types: each detection of its class' QuPath class, with a probability per class
        probs = np.random.default_rng(2).dirichlet([1, 1, 1], len(det)).astype(np.float32)
        det = Detections(det.x_px, det.y_px, det.confidence, det.area_um2, probs)
    names = {QUPATH_CLASSES[c][0]: list(QUPATH_CLASSES[c][1]) for c in CLASSES} if classes else {"Nucleus": [200, 0, 120]}
    measurement_names = {"confidence", "area \u00b5m^2", *(f"p_{c}" for c in CLASSES if classes)}
    path = write_geojson(tmp_path / ("s.geojson.gz" if gz else "s.geojson"), det, MPP, gzip=gz)
    collection = _load(path)
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert isinstance(features, list) and len(features) == len(det)

    ids = set()
    for feature in features:
        assert feature["type"] == "Feature"
        # id: a UUID string at feature level (not inside properties), unique, not a v0.2 legacy type id.
        assert isinstance(feature["id"], str) and feature["id"] not in QUPATH_LEGACY_TYPE_IDS
        assert str(uuid.UUID(feature["id"])) == feature["id"]
        ids.add(feature["id"])

        geometry = feature["geometry"]
        assert geometry["type"] == "Point"
        coords = geometry["coordinates"]
        assert len(coords) == 2 and all(isinstance(c, float) and math.isfinite(c) for c in coords)

        props = feature["properties"]
        assert props["objectType"] == "detection" and props["objectType"] in QUPATH_OBJECT_TYPES
        assert "object_type" not in props and "type" not in props  # no competing type keys

        cls = props["classification"]
        assert isinstance(cls, dict) and isinstance(cls["name"], str) and cls["name"] in names
        color = cls["color"]
        assert color == names[cls["name"]]
        assert isinstance(color, list) and len(color) == 3
        assert all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)

        measurements = props["measurements"]
        assert isinstance(measurements, dict) and set(measurements) == measurement_names
        for value in measurements.values():
            assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        assert 0.5 <= measurements["confidence"] <= 1.0
        assert all(0.0 <= measurements[f"p_{c}"] <= 1.0 for c in CLASSES if classes)
    assert len(ids) == len(features)
    assert {f["properties"]["classification"]["name"] for f in features} == set(names)


def test_geojson_points_are_csv_pixel_indices_plus_half(det: Detections, tmp_path: Path) -> None:
    """QuPath's pixel (0, 0) spans [0, 1): the CSV's pixel-index centroid x sits at x + 0.5 in QuPath."""
    features = _load(write_geojson(tmp_path / "s.geojson", det, MPP))["features"]
    with open(write_csv(tmp_path / "s.csv", det, MPP), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(features)
    for row, feature in zip(rows, features):  # both are written in the same (y, x) order
        x, y = feature["geometry"]["coordinates"]
        assert x == pytest.approx(float(row["x"]) + 0.5, abs=0.006)
        assert y == pytest.approx(float(row["y"]) + 0.5, abs=0.006)
        assert feature["properties"]["measurements"]["confidence"] == pytest.approx(float(row["confidence"]), abs=1e-4)
        assert feature["properties"]["measurements"]["area \u00b5m^2"] == pytest.approx(float(row["area_um2"]), abs=0.006)


def test_pixel_zero_maps_to_its_centre(tmp_path: Path) -> None:
    one = Detections(np.array([0.0]), np.array([0.0]), np.array([0.9], np.float32), np.array([10.0], np.float32))
    (feature,) = _load(write_geojson(tmp_path / "o.geojson", one, MPP))["features"]
    assert feature["geometry"]["coordinates"] == [0.5, 0.5]


def test_empty_collection_is_valid(tmp_path: Path) -> None:
    collection = _load(write_geojson(tmp_path / "e.geojson", Detections.empty(), MPP))
    assert collection == {"type": "FeatureCollection", "features": []}
