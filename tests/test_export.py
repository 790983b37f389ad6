"""Result files: what a user (or QuPath) reads back from them, and that interrupted writes leave no trace."""
from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import geojson
import numpy as np
import pytest
import tifffile
from PIL import Image

from wsiproc.detection.detections import Detections
from wsiproc.io.files import atomic_path, atomic_write_text
from wsiproc.outputs.formats import density_map, write_csv, write_density_png, write_density_tiff, write_geojson, write_outputs
from wsiproc.outputs.record import read_run_record, write_run_record

MPP = 0.25


@pytest.fixture
def det(make_detections) -> Detections:
    return make_detections(seed=7, n=300, width_px=4000, height_px=3000, confidence=(0.3, 1.0), area_um2=(10, 80))


def _sorted_by_yx(det: Detections) -> Detections:
    return det.take(np.lexsort((det.x_px, det.y_px)))


def _features(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    collection = geojson.loads(text)
    assert collection == json.loads(text)
    assert collection["type"] == "FeatureCollection"
    assert isinstance(collection, geojson.FeatureCollection) and collection.is_valid
    return collection["features"]


def _folder_listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------ atomic


def test_atomic_path_moves_the_finished_file_into_place(tmp_path: Path) -> None:
    final = tmp_path / "result.txt"
    with atomic_path(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".result.txt.") and tmp.name.endswith(".partial")
        tmp.write_text("done")
        assert not final.exists()
    assert final.read_text() == "done"
    assert _folder_listing(tmp_path) == ["result.txt"]


def test_atomic_path_failure_leaves_neither_final_nor_temp_file(tmp_path: Path) -> None:
    final = tmp_path / "result.csv"
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_path(final) as tmp:
            tmp.write_text("half a file")
            raise RuntimeError("interrupted")
    assert _folder_listing(tmp_path) == []


def test_atomic_path_failure_keeps_an_existing_final_file(tmp_path: Path) -> None:
    final = tmp_path / "result.txt"
    atomic_write_text(final, "previous run")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_text("new run, half written")
            raise KeyboardInterrupt
    assert final.read_text() == "previous run"
    assert _folder_listing(tmp_path) == ["result.txt"]


def test_writer_failing_half_way_leaves_no_file(tmp_path: Path) -> None:
    bad = Detections(np.array([1.0, np.nan]), np.array([1.0, 2.0]), np.ones(2, np.float32), np.ones(2, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        write_geojson(tmp_path / "bad.geojson", bad, MPP)
    assert _folder_listing(tmp_path) == []


# --------------------------------------------------------------------------------------------- CSV


def test_csv_round_trips_sorted_with_micrometre_columns(tmp_path: Path, det: Detections) -> None:
    path = write_csv(tmp_path / "s.csv", det, MPP)

    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "x,y,x_um,y_um,confidence,area_um2"
    assert len(lines) == len(det) + 1
    x, y, x_um, y_um, conf, area = np.loadtxt(path, delimiter=",", skiprows=1, unpack=True)
    ref = _sorted_by_yx(det)
    np.testing.assert_allclose(x, ref.x_px, atol=0.005)
    np.testing.assert_allclose(y, ref.y_px, atol=0.005)
    np.testing.assert_allclose(x_um, ref.x_px * MPP, atol=0.0005)
    np.testing.assert_allclose(y_um, ref.y_px * MPP, atol=0.0005)
    np.testing.assert_allclose(conf, ref.confidence, atol=0.00005)
    np.testing.assert_allclose(area, ref.area_um2, atol=0.005)
    assert lines[1].split(",")[4] == f"{ref.confidence[0]:.4f}"  # fixed decimals, not shortest repr


def test_csv_does_not_depend_on_input_order(tmp_path: Path, det: Detections) -> None:
    shuffled = det.take(np.random.default_rng(1).permutation(len(det)))
    a = write_csv(tmp_path / "a.csv", det, MPP).read_bytes()
    b = write_csv(tmp_path / "b.csv", shuffled, MPP).read_bytes()
    assert a == b


# ----------------------------------------------------------------------------------------- GeoJSON


def test_geojson_is_a_qupath_detection_collection(tmp_path: Path, det: Detections) -> None:
    path = write_geojson(tmp_path / "s.geojson", det, MPP)

    features = _features(path)
    assert len(features) == len(det)
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)
    for f in features:
        parsed = uuid.UUID(f["id"])
        assert str(parsed) == f["id"] and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Point"
        props = f["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["name"] == "Nucleus"
        assert len(props["classification"]["color"]) == 3
        assert set(props["measurements"]) == {"confidence", "area µm^2"}

    ref = _sorted_by_yx(det)
    xy = np.array([f["geometry"]["coordinates"] for f in features])
    # QuPath's pixel (0, 0) spans [0, 1): GeoJSON carries pixel-index coordinates plus half a pixel.
    np.testing.assert_allclose(xy, ref.xy + 0.5, atol=0.005)
    conf = np.array([f["properties"]["measurements"]["confidence"] for f in features])
    area = np.array([f["properties"]["measurements"]["area µm^2"] for f in features])
    np.testing.assert_allclose(conf, ref.confidence, atol=0.00005)
    np.testing.assert_allclose(area, ref.area_um2, atol=0.005)


def test_geojson_is_one_feature_per_line_in_utf8(tmp_path: Path, det: Detections) -> None:
    lines = write_geojson(tmp_path / "s.geojson", det, MPP).read_bytes().split(b"\n")
    feature_lines = [line for line in lines if line.startswith(b'{"type":"Feature",')]
    assert len(feature_lines) == len(det)
    assert "area µm^2".encode("utf-8") in feature_lines[0]  # not \u00b5: QuPath shows the key as written


def test_geojson_matches_what_geojson_library_writes_for_one_feature(tmp_path: Path) -> None:
    one = Detections(np.array([12.5]), np.array([7.25]), np.array([0.875], np.float32), np.array([31.5], np.float32))
    [feature] = _features(write_geojson(tmp_path / "one.geojson", one, MPP))
    expected = geojson.Feature(
        id=feature["id"],
        geometry=geojson.Point((13.0, 7.75)),
        properties={
            "objectType": "detection",
            "classification": {"name": "Nucleus", "color": feature["properties"]["classification"]["color"]},
            "measurements": {"confidence": 0.875, "area µm^2": 31.5},
        },
    )
    assert feature == json.loads(geojson.dumps(expected))


def test_geojson_ids_are_random_by_default_and_reproducible_with_a_seed(tmp_path: Path, det: Detections) -> None:
    def ids(name: str, seed: int | None) -> list[str]:
        return [f["id"] for f in _features(write_geojson(tmp_path / name, det, MPP, id_seed=seed))]

    assert ids("a.geojson", 3) == ids("b.geojson", 3)
    assert ids("c.geojson", 3) != ids("d.geojson", 4)
    assert set(ids("e.geojson", None)).isdisjoint(ids("f.geojson", None))


def test_geojson_gz_holds_the_same_collection(tmp_path: Path, det: Detections) -> None:
    plain = write_geojson(tmp_path / "s.geojson", det, MPP, id_seed=5)
    packed = write_geojson(tmp_path / "s.geojson.gz", det, MPP, gzip=True, id_seed=5)
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
    assert _features(packed) == _features(plain)


# ----------------------------------------------------------------------------------------- density


def test_density_map_counts_every_nucleus_in_its_cell() -> None:
    # 1000 x 600 px at 0.25 µm/px = 250 x 150 µm -> 5 x 3 cells of 50 µm (rows x cols = 3 x 5).
    x = np.array([0.0, 199.0, 200.0, 999.0, 999.4, 1500.0, -3.0])
    y = np.array([0.0, 0.0, 0.0, 599.0, 599.4, 10.0, 10.0])
    det = Detections(x, y, np.ones(7, np.float32), np.ones(7, np.float32))

    density = density_map(det, (600, 1000), MPP, cell_um=50.0)

    assert density.dtype == np.float32 and density.shape == (3, 5)
    assert density.sum() == len(det)
    # pixel 199 spans 199.5 px -> 49.875 µm: still cell 0; pixel 200 (50.125 µm) is cell 1.
    assert density[0, 0] == 3  # (0, 0), (199, 0) and the clamped (-3, 10)
    assert density[0, 1] == 1
    assert density[2, 4] == 2  # the last pixel and a point on the far edge
    assert density[0, 4] == 1  # (1500, 10) lies beyond the slide: clamped into the last column


def test_density_grid_covers_a_partial_last_cell() -> None:
    density = density_map(Detections.empty(), (601, 1001), MPP, cell_um=50.0)
    assert density.shape == (4, 6)  # 150.25 x 250.25 µm
    assert density.sum() == 0


def test_density_tiff_records_the_cell_size(tmp_path: Path, det: Detections) -> None:
    density = density_map(det, (3000, 4000), MPP, cell_um=25.0)
    path = write_density_tiff(tmp_path / "d.tiff", density, cell_um=25.0, mpp=MPP)

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        np.testing.assert_array_equal(page.asarray(), density)
        assert page.dtype == np.float32
        meta = json.loads(page.description)
        assert meta["quantity"] == "nuclei per cell"
        assert meta["cell_um"] == 25.0 and meta["level0_mpp"] == MPP
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert page.get_resolution() == pytest.approx((400.0, 400.0))  # 10000 µm / 25 µm per cm


@pytest.mark.parametrize("shape_hw", [(3, 5), (40, 1300)])
def test_density_png_is_a_small_colour_preview(tmp_path: Path, shape_hw: tuple[int, int]) -> None:
    density = np.random.default_rng(0).poisson(3.0, shape_hw).astype(np.float32)
    path = write_density_png(tmp_path / "d.png", density, max_side_px=512)

    with Image.open(path) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert max(img.size) <= 512
        assert max(img.size) >= 256  # small grids are enlarged so cells stay visible
        w, h = img.size
        assert abs(w / h - shape_hw[1] / shape_hw[0]) < 0.2 * shape_hw[1] / shape_hw[0]
        assert len(set(np.asarray(img).reshape(-1, 3).view("V3").ravel().tolist())) > 1


# --------------------------------------------------------------------------------- record and outputs


def test_run_record_round_trips_as_sorted_pretty_json(tmp_path: Path) -> None:
    record = {"slide": "a.svs", "mpp": np.float32(0.5), "tiles": np.int64(12), "out": tmp_path, "µ": "ok"}
    path = write_run_record(tmp_path / "r.json", record)
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "mpp": 0.5,')
    assert read_run_record(path) == {"slide": "a.svs", "mpp": 0.5, "tiles": 12, "out": str(tmp_path), "µ": "ok"}


def test_write_outputs_writes_every_file_and_the_record_last(tmp_path: Path, det: Detections) -> None:
    record = {"slide": "s.svs", "model": "unet"}
    paths = write_outputs(tmp_path / "out", "s", det, MPP, (3000, 4000), record)

    assert {k: p.name for k, p in paths.items()} == {
        "csv": "s.csv",
        "geojson": "s.geojson",
        "density_tiff": "s_density.tiff",
        "density_png": "s_density.png",
        "record": "s.json",
    }
    assert _folder_listing(tmp_path / "out") == sorted(p.name for p in paths.values())
    written = read_run_record(paths["record"])
    assert written["nuclei"] == len(det) and written["slide"] == "s.svs"
    assert written["outputs"]["geojson"] == "s.geojson"
    assert "outputs" not in record  # the caller's dict is left alone
    assert paths["record"].stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in paths.values())
    assert tifffile.imread(paths["density_tiff"]).sum() == len(det)


def test_write_outputs_removes_an_old_record_before_rewriting(tmp_path: Path, det: Detections) -> None:
    write_outputs(tmp_path, "s", det, MPP, (3000, 4000), {})
    broken = Detections(np.array([np.nan]), np.array([0.0]), np.ones(1, np.float32), np.ones(1, np.float32))
    with pytest.raises(ValueError):
        write_outputs(tmp_path, "s", broken, MPP, (3000, 4000), {})
    assert not (tmp_path / "s.json").exists()  # the old marker must not vouch for the new partial result
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_write_outputs_with_gzipped_geojson(tmp_path: Path, det: Detections) -> None:
    paths = write_outputs(tmp_path, "s", det, MPP, (3000, 4000), {}, cell_um=100.0, geojson_gz=True)
    assert paths["geojson"].name == "s.geojson.gz"
    assert len(_features(paths["geojson"])) == len(det)
    assert json.loads(tifffile.TiffFile(paths["density_tiff"]).pages[0].description)["cell_um"] == 100.0


def test_empty_detections_give_valid_empty_outputs(tmp_path: Path) -> None:
    paths = write_outputs(tmp_path, "empty", Detections.empty(), MPP, (3000, 4000), {})

    assert paths["csv"].read_text(encoding="utf-8") == "x,y,x_um,y_um,confidence,area_um2\n"
    assert _features(paths["geojson"]) == []
    density = tifffile.imread(paths["density_tiff"])
    assert density.shape == (15, 20) and density.sum() == 0
    with Image.open(paths["density_png"]) as img:
        assert max(img.size) <= 512
    assert read_run_record(paths["record"])["nuclei"] == 0
