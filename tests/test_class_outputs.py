"""Nucleus types in every output (issue #23): CSV columns, QuPath classifications, per-class density maps, the run
record and summary.csv, the QC picture, `--no-classes`; and without classes, every file exactly as before.

Detections are built by hand with known class probabilities: no model with a class head is needed.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import geojson
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from wsiproc.cli import SAMPLE_SLIDE, main
from wsiproc.cohort import summary
from wsiproc.cohort.batch import OUTPUT_PARAMETERS, input_fingerprint, is_complete, remove_incomplete
from wsiproc.config import RunConfig
from wsiproc.detection.classes import CLASSES, QUPATH_CLASSES
from wsiproc.detection.detections import Detections
from wsiproc.outputs.formats import (RESULT_SUFFIXES, class_density_maps, density_map, write_csv, write_geojson,
                                     write_outputs)
from wsiproc.outputs.record import class_figures, read_run_record, tissue_mm2

MPP = 0.25
PROB_COLUMNS = [f"p_{c}" for c in CLASSES]

#: Two nuclei, given out of (y, x) order: what the writers wrote before classes existed (fixed strings).
TWO = Detections(np.array([10.0, 3.25]), np.array([7.5, 20.0]), np.array([0.9, 0.61234], np.float32),
                 np.array([12.5, 30.0], np.float32))
TWO_PROBS = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], np.float32)  # inflammatory; epithelial (a tie goes first)
TWO_CSV = ("x,y,x_um,y_um,confidence,area_um2\n"
           "10.00,7.50,2.500,1.875,0.9000,12.50\n"
           "3.25,20.00,0.812,5.000,0.6123,30.00\n")
TWO_GEOJSON = (
    '{"type":"FeatureCollection","features":[\n'
    '{"type":"Feature","id":"8b4ae5f1-a941-46a0-956a-26afbccdafe5","geometry":{"type":"Point","coordinates":[10.50,8.00]},'
    '"properties":{"objectType":"detection","classification":{"name":"Nucleus","color":[200,0,120]},'
    '"measurements":{"confidence":0.9000,"area µm^2":12.50}}},\n'
    '{"type":"Feature","id":"62f90a94-5f56-43c6-8227-6ad5ab2da739","geometry":{"type":"Point","coordinates":[3.75,20.50]},'
    '"properties":{"objectType":"detection","classification":{"name":"Nucleus","color":[200,0,120]},'
    '"measurements":{"confidence":0.6123,"area µm^2":30.00}}}\n'
    ']}\n')
TWO_RECORD = """{
  "nuclei": 2,
  "outputs": {
    "csv": "s.csv",
    "density_png": "s_density.png",
    "density_tiff": "s_density.tiff",
    "geojson": "s.geojson",
    "record": "s.json"
  },
  "x": 1
}
"""


def _with_probs(det: Detections, probs: np.ndarray) -> Detections:
    return Detections(det.x_px, det.y_px, det.confidence, det.area_um2, np.asarray(probs, np.float32))


@pytest.fixture
def det(make_detections) -> Detections:
    """300 nuclei with random class probabilities (some classes more likely, so counts differ)."""
    plain = make_detections(seed=5, n=300, width_px=4000, height_px=3000, confidence=(0.5, 1.0), area_um2=(5, 60))
    probs = np.random.default_rng(5).dirichlet([2.0, 1.0, 0.5], len(plain))
    return _with_probs(plain, probs)


def _order(det: Detections) -> np.ndarray:
    return np.lexsort((det.x_px, det.y_px))


# -------------------------------------------------------------------------------------------- without classes


def test_without_classes_csv_and_geojson_are_those_of_before(tmp_path: Path) -> None:
    assert write_csv(tmp_path / "a.csv", TWO, MPP).read_text(encoding="utf-8") == TWO_CSV
    assert write_geojson(tmp_path / "a.geojson", TWO, MPP, id_seed=7).read_text(encoding="utf-8") == TWO_GEOJSON
    # Detections that had classes and lost them write the same bytes.
    stripped = _with_probs(TWO, TWO_PROBS).without_classes()
    assert write_csv(tmp_path / "b.csv", stripped, MPP).read_bytes() == (tmp_path / "a.csv").read_bytes()
    assert write_geojson(tmp_path / "b.geojson", stripped, MPP, id_seed=7).read_bytes() == (tmp_path / "a.geojson").read_bytes()


def test_without_classes_write_outputs_writes_the_files_of_before(tmp_path: Path) -> None:
    paths = write_outputs(tmp_path, "s", TWO, MPP, (100, 80), {"x": 1}, id_seed=3)
    assert list(paths) == ["csv", "geojson", "density_tiff", "density_png", "record"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.geojson", "s.json", "s_density.png", "s_density.tiff"]
    assert paths["record"].read_text(encoding="utf-8") == TWO_RECORD
    with tifffile.TiffFile(paths["density_tiff"]) as tif:
        assert len(tif.pages) == 1
        assert tif.pages[0].description == '{"quantity": "nuclei per cell", "cell_um": 50.0, "level0_mpp": 0.25, "shape_hw": [1, 1]}'
    assert class_density_maps(TWO, (100, 80), MPP) is None


# ------------------------------------------------------------------------------------------------------- CSV


def test_csv_has_class_and_probabilities_after_the_columns_of_before(tmp_path: Path, det: Detections) -> None:
    path = write_csv(tmp_path / "c.csv", det, MPP)
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["x", "y", "x_um", "y_um", "confidence", "area_um2", "class", *PROB_COLUMNS]
    assert len(rows) == len(det)
    order = _order(det)
    probs = det.class_probs[order]
    np.testing.assert_allclose([[float(r[c]) for c in PROB_COLUMNS] for r in rows], probs, atol=5e-5)
    assert [r["class"] for r in rows] == list(det.classes[order])
    assert {r["class"] for r in rows} == set(CLASSES)
    for r in rows[:20]:
        assert all(len(r[c].split(".")[1]) == 4 for c in PROB_COLUMNS)  # the confidence's decimals
    # The columns of before are unchanged by classes.
    plain = write_csv(tmp_path / "p.csv", det.without_classes(), MPP).read_text().splitlines()
    assert [",".join(line.split(",")[:6]) for line in path.read_text().splitlines()] == plain


def test_csv_fixed_two_nuclei_with_classes(tmp_path: Path) -> None:
    text = write_csv(tmp_path / "c.csv", _with_probs(TWO, TWO_PROBS), MPP).read_text()
    assert text == ("x,y,x_um,y_um,confidence,area_um2,class,p_epithelial,p_inflammatory,p_stromal\n"
                    "10.00,7.50,2.500,1.875,0.9000,12.50,inflammatory,0.1000,0.7000,0.2000\n"
                    "3.25,20.00,0.812,5.000,0.6123,30.00,epithelial,0.5000,0.2500,0.2500\n")


def test_empty_detections_with_classes_have_the_class_header(tmp_path: Path) -> None:
    empty = _with_probs(Detections.empty(), np.zeros((0, len(CLASSES))))
    assert write_csv(tmp_path / "e.csv", empty, MPP).read_text() == \
        "x,y,x_um,y_um,confidence,area_um2,class,p_epithelial,p_inflammatory,p_stromal\n"
    assert json.loads(write_geojson(tmp_path / "e.geojson", empty, MPP).read_text()) == {"type": "FeatureCollection", "features": []}


def test_non_finite_probabilities_are_refused(tmp_path: Path) -> None:
    bad = _with_probs(TWO, np.array([[np.nan, 0.5, 0.5], [0.2, 0.3, 0.5]]))
    with pytest.raises(ValueError, match="class_probs"):
        write_csv(tmp_path / "bad.csv", bad, MPP)
    with pytest.raises(ValueError, match="class_probs"):
        write_geojson(tmp_path / "bad.geojson", bad, MPP)
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------------------------------- GeoJSON


@pytest.mark.parametrize("gz", [False, True])
def test_geojson_classifies_each_nucleus_by_its_type(tmp_path: Path, det: Detections, gz: bool) -> None:
    path = write_geojson(tmp_path / ("c.geojson.gz" if gz else "c.geojson"), det, MPP, gzip=gz, id_seed=1)
    text = gzip.decompress(path.read_bytes()).decode() if gz else path.read_text(encoding="utf-8")
    collection = geojson.loads(text)
    assert collection == json.loads(text) and collection.is_valid
    features = collection["features"]
    assert len(features) == len(det)
    order = _order(det)
    expected_classes, probs = det.classes[order], det.class_probs[order]
    with open(write_csv(tmp_path / "c.csv", det, MPP), newline="") as fh:
        rows = list(csv.DictReader(fh))
    for feature, cls, p, row in zip(features, expected_classes, probs, rows):
        props = feature["properties"]
        name, rgb = QUPATH_CLASSES[cls]
        assert props["classification"] == {"name": name, "color": list(rgb)}
        m = props["measurements"]
        assert list(m) == ["confidence", "area µm^2", *PROB_COLUMNS]  # a QuPath 0.4+ name → number object
        np.testing.assert_allclose([m[c] for c in PROB_COLUMNS], p, atol=5e-5)
        assert all(m[c] == float(row[c]) for c in PROB_COLUMNS)  # CSV and GeoJSON carry identical values
        assert row["class"] == cls
    assert {f["properties"]["classification"]["name"] for f in features} == {"Epithelial", "Immune cells", "Stroma"}


def test_geojson_fixed_two_nuclei_with_classes(tmp_path: Path) -> None:
    text = write_geojson(tmp_path / "c.geojson", _with_probs(TWO, TWO_PROBS), MPP, id_seed=7).read_text(encoding="utf-8")
    # Ids, geometry and the measurements of before are where they were; the classification is the class'.
    assert text == TWO_GEOJSON.replace(
        '"classification":{"name":"Nucleus","color":[200,0,120]},"measurements":{"confidence":0.9000,"area µm^2":12.50}',
        '"classification":{"name":"Immune cells","color":[160,90,160]},"measurements":{"confidence":0.9000,"area µm^2":12.50,'
        '"p_epithelial":0.1000,"p_inflammatory":0.7000,"p_stromal":0.2000}').replace(
        '"classification":{"name":"Nucleus","color":[200,0,120]},"measurements":{"confidence":0.6123,"area µm^2":30.00}',
        '"classification":{"name":"Epithelial","color":[255,127,14]},"measurements":{"confidence":0.6123,"area µm^2":30.00,'
        '"p_epithelial":0.5000,"p_inflammatory":0.2500,"p_stromal":0.2500}')


# ---------------------------------------------------------------------------------------------- density maps


def test_class_density_maps_add_up_to_the_total(det: Detections) -> None:
    total = density_map(det, (3000, 4000), MPP, 50.0)
    maps = class_density_maps(det, (3000, 4000), MPP, 50.0)
    assert list(maps) == list(CLASSES)
    for name, d in maps.items():
        assert d.shape == total.shape and d.dtype == np.float32
        assert d.sum() == det.class_counts()[name]
    np.testing.assert_array_equal(sum(maps.values()), total)


def _record(width_px: int = 4000, height_px: int = 3000, fraction: float | None = 0.5) -> dict:
    return {"input": {"path": "/slides/s.svs", "level0_width_px": width_px, "level0_height_px": height_px},
            "mpp_used": MPP, "tiles": {"tissue_fraction": fraction}, "model": {"sha256": "ab" * 32},
            "wsiproc_version": "test"}


def test_write_outputs_with_classes(tmp_path: Path, det: Detections) -> None:
    paths = write_outputs(tmp_path, "s", det, MPP, (3000, 4000), _record(), cell_um=100.0)
    assert list(paths) == ["csv", "geojson", "density_tiff", "density_png", *(f"density_tiff_{c}" for c in CLASSES), "record"]
    assert {paths[f"density_tiff_{c}"].name for c in CLASSES} == {f"s_density_{c}.tiff" for c in CLASSES}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    assert all(any(p.name == f"s{suffix}" for suffix in RESULT_SUFFIXES) for p in paths.values())

    total = tifffile.imread(paths["density_tiff"])
    stack = []
    for name in CLASSES:
        with tifffile.TiffFile(paths[f"density_tiff_{name}"]) as tif:
            assert len(tif.pages) == 1
            meta = json.loads(tif.pages[0].description)
            assert meta["class"] == name and meta["cell_um"] == 100.0 and meta["level0_mpp"] == MPP
            assert tif.pages[0].resolution == pytest.approx((100.0, 100.0))  # per cm: the 100 µm cell
            stack.append(tif.pages[0].asarray())
    assert stack[0].shape == total.shape
    np.testing.assert_array_equal(np.sum(stack, axis=0), total)

    record = read_run_record(paths["record"])
    assert record["outputs"][f"density_tiff_{CLASSES[1]}"] == f"s_density_{CLASSES[1]}.tiff"
    tissue = 0.5 * 4000 * MPP * 3000 * MPP / 1e6
    assert sum(record["classes"][c]["nuclei"] for c in CLASSES) == record["nuclei"] == len(det)
    for name in CLASSES:
        assert record["classes"][name]["nuclei"] == det.class_counts()[name]
        assert record["classes"][name]["per_mm2"] == pytest.approx(det.class_counts()[name] / tissue, abs=0.05)

    # A slide whose set was left incomplete loses its class maps too.
    paths["record"].unlink()
    remove_incomplete(tmp_path, "s")
    assert not list(tmp_path.iterdir())


def test_class_figures_without_tissue_area() -> None:
    figures = class_figures({"epithelial": 3, "inflammatory": 0, "stromal": 1}, _record(fraction=None))
    assert figures == {"epithelial": {"nuclei": 3, "per_mm2": None}, "inflammatory": {"nuclei": 0, "per_mm2": None},
                       "stromal": {"nuclei": 1, "per_mm2": None}}
    assert tissue_mm2(_record(fraction=None)) is None and tissue_mm2({}) is None


# ----------------------------------------------------------------------------------------------- summary.csv


def _summary(out: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(summary.to_csv(summary.cohort_rows(out)))))


def test_summary_has_class_columns_where_some_slide_has_classes(tmp_path: Path, det: Detections) -> None:
    plain = {**_record(), "input": {**_record()["input"], "path": "/slides/a.svs"}}
    write_outputs(tmp_path, "a", det.without_classes(), MPP, (3000, 4000), plain)
    [row] = _summary(tmp_path)
    assert list(row) == list(summary.COLUMNS)  # a cohort without classes keeps the table of before

    write_outputs(tmp_path, "s", det, MPP, (3000, 4000), _record())
    rows = _summary(tmp_path)
    assert list(rows[0]) == [*summary.COLUMNS, *CLASSES, *(f"{c}_per_mm2" for c in CLASSES)]
    by_input = {r["input"]: r for r in rows}
    assert all(by_input["/slides/a.svs"][c] == "" for c in summary.CLASS_COLUMNS)
    row = by_input["/slides/s.svs"]
    assert sum(int(row[c]) for c in CLASSES) == int(row["nuclei"]) == len(det)
    for name in CLASSES:
        assert int(row[name]) == det.class_counts()[name]
        assert float(row[f"{name}_per_mm2"]) == pytest.approx(int(row[name]) / float(row["tissue_mm2"]), rel=1e-3)
    assert float(row["nuclei_per_mm2"]) == pytest.approx(len(det) / float(row["tissue_mm2"]), rel=1e-3)


# ------------------------------------------------------------------------------------------------- resume


def test_resume_compares_classes(tmp_path: Path) -> None:
    slide = tmp_path / "s.png"
    slide.write_bytes(b"not really an image")
    (tmp_path / "s.csv").write_text(TWO_CSV)
    assert "classes" in OUTPUT_PARAMETERS
    params = RunConfig().to_dict()
    del params["classes"]  # a record from before nucleus types
    record = {"input": {"fingerprint": input_fingerprint(slide)}, "model": {"sha256": "m"}, "parameters": params,
              "outputs": {"csv": "s.csv"}, "nuclei": 2}
    (tmp_path / "s.json").write_text(json.dumps(record))
    assert is_complete(tmp_path, "s", slide, RunConfig(), "m")  # ran as classes on with a detector alone
    assert is_complete(tmp_path, "s", slide, RunConfig(), "m", model_classes=False)
    assert not is_complete(tmp_path, "s", slide, RunConfig(classes=False), "m")
    assert not is_complete(tmp_path, "s", slide, RunConfig(), "m", model_classes=True)  # the record has no classes
    assert is_complete(tmp_path, "s", slide, RunConfig(classes=False), "m", model_classes=True) is False  # parameters differ

    record["parameters"] = RunConfig().to_dict()
    record["classes"] = class_figures({"epithelial": 1, "inflammatory": 1, "stromal": 0}, {})
    (tmp_path / "s.json").write_text(json.dumps(record))
    assert is_complete(tmp_path, "s", slide, RunConfig(), "m", model_classes=True)
    assert not is_complete(tmp_path, "s", slide, RunConfig(), "m", model_classes=False)


# ------------------------------------------------------------------------------------------------ QC picture


def test_qc_picture_with_classes_on_the_sample_slide(tmp_path: Path) -> None:
    from PIL import Image

    from wsiproc.detection.tiling import SlideSampler
    from wsiproc.detection.tissue import tissue_mask
    from wsiproc.io.slide import open_slide
    from wsiproc.outputs.qc import QcSlide, class_legend_labels

    slide = open_slide(SAMPLE_SLIDE)
    try:
        w0, h0 = slide.dimensions
        mpp0 = slide.require_mpp()
        sampler = SlideSampler.for_slide(slide, 0.5)
        rng = np.random.default_rng(3)
        n = 400
        det = Detections(rng.uniform(0, w0, n), rng.uniform(0, h0, n), np.full(n, 0.9, np.float32),
                         np.full(n, 20.0, np.float32), rng.dirichlet([1, 1, 1], n).astype(np.float32))
        paths = write_outputs(tmp_path, "s", det, mpp0, (h0, w0), {}, qc=QcSlide(sampler, tissue_mask(sampler)))
    finally:
        slide.close()
    assert list(paths)[-2:] == ["qc_png", "record"]
    with Image.open(paths["qc_png"]) as img:
        assert img.format == "PNG" and img.size[0] == 1200
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert rgb.std() > 20

    winners = np.argmax(det.class_probs, axis=1)
    inside = np.zeros(n, bool)
    inside[:10] = True
    labels = class_legend_labels(winners, inside)
    counts = det.class_counts()
    for name, label in zip(CLASSES, labels):
        assert label.startswith(f"{name}: {int((winners[:10] == CLASSES.index(name)).sum())} here, {counts[name]:,} in slide")
    assert class_legend_labels(np.zeros(0, np.int64), np.zeros(0, bool)) == [f"{c}: 0" for c in CLASSES]


# ----------------------------------------------------------------------------------------------- --no-classes


@pytest.mark.parametrize("args, config, expected", [
    ([], None, True),
    (["--no-classes"], None, False),
    ([], "classes: false\n", False),
    (["--no-classes"], "classes: true\n", False),  # the command line wins
])
def test_no_classes_option_reaches_run_config(tmp_path: Path, monkeypatch, args: list[str], config: str | None,
                                              expected: bool) -> None:
    from wsiproc.cohort import batch
    from wsiproc.detection import inference

    seen = {}

    class FakePredictor:
        def __init__(self, *a, **k) -> None:
            pass

    def fake_run_batch(inputs, out_dir, cfg, predictor, **kwargs):
        seen["cfg"] = cfg
        return batch.Outcomes()

    monkeypatch.setattr(inference, "Predictor", FakePredictor)
    monkeypatch.setattr(batch, "run_batch", fake_run_batch)
    extra = []
    if config is not None:
        (tmp_path / "run.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "run.yaml")]
    result = CliRunner().invoke(main, ["run", "--sample", "--out", str(tmp_path / "out"), "--quiet", *args, *extra])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].classes is expected


def test_run_no_classes_end_to_end_on_the_sample(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", "--sample", "--model", str(tiny_model), "--no-classes", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    stem = SAMPLE_SLIDE.stem
    record = json.loads((out / f"{stem}.json").read_text())
    assert record["parameters"]["classes"] is False and "classes" not in record
    assert (out / f"{stem}.csv").read_text().splitlines()[0] == "x,y,x_um,y_um,confidence,area_um2"
    assert not list(out.glob("*_density_*.tiff"))
    with open(out / "summary.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(summary.COLUMNS)
