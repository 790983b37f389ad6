"""Per-slide colour alignment: the nearest training domain's moments, one transform per slide, in every engine path.

`wsiproc adapt` switches it on for a foreign cohort by writing `<model>.colours.json` beside the adapted model;
these tests write that file themselves (from the shipped model's reference) to check what a run then does.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiproc.config import RunConfig
from wsiproc.detection.colour import ColourStats, DomainColours
from wsiproc.detection.inference import Predictor
from wsiproc.detection.loop import detect
from wsiproc.detection.model import DEFAULT_MODEL_PATH
from wsiproc.errors import ModelError
from wsiproc.io.slide import open_slide
from wsiproc.learn.calibrate import Reference

MONUSEG_IMAGE = "TCGA-21-5784-01Z-00-DX1.tif"


def _tissue(mean, cov, n: int, seed: int) -> np.ndarray:
    """(n, n, 3) uint8 'tissue' with the given RGB moments (in [0, 1]); every pixel darker than glass."""
    px = np.random.default_rng(seed).multivariate_normal(mean, cov, n * n)
    return (np.clip(px, 0.05, 0.8) * 255 + 0.5).astype(np.uint8).reshape(n, n, 3)


def _domains() -> DomainColours:
    return DomainColours({
        "pink": {"mean_rgb": [0.75, 0.45, 0.65], "cov_rgb": (np.diag([0.010, 0.012, 0.008]) + 0.004).tolist()},
        "blue": {"mean_rgb": [0.45, 0.40, 0.65], "cov_rgb": (np.diag([0.006, 0.008, 0.010]) + 0.003).tolist()},
    })


def test_a_slide_is_mapped_onto_the_moments_of_its_nearest_training_domain() -> None:
    colours = _domains()
    tiles = [_tissue([0.48, 0.38, 0.62], np.diag([0.004, 0.005, 0.006]) + 0.002, 96, seed) for seed in range(3)]
    aligned = colours.for_tiles(tiles)
    assert aligned is not None and aligned.domain == "blue" and aligned.distance > 0
    after = ColourStats()
    for tile in tiles:
        after.add(aligned.apply(tile))
    target = colours.domains["blue"]
    np.testing.assert_allclose(after.mean, target["mean_rgb"], atol=0.01)
    np.testing.assert_allclose(after.cov, target["cov_rgb"], atol=0.0015)
    # A slide that already looks like a domain is left (nearly) as it is.
    same = [_tissue(target["mean_rgb"], target["cov_rgb"], 96, 7)]
    again = colours.for_tiles(same)
    assert again.domain == "blue" and again.distance < 0.02
    assert np.abs(again.apply(same[0]).astype(int) - same[0]).mean() < 3


def test_a_slide_without_enough_tissue_is_not_aligned() -> None:
    assert _domains().for_tiles([np.full((128, 128, 3), 245, np.uint8)]) is None


def test_the_colours_file_sits_beside_the_keras_model_and_its_int8_model(tmp_path: Path) -> None:
    assert DomainColours.beside(tmp_path / "adapted.keras") == tmp_path / "adapted.colours.json"
    assert DomainColours.beside(tmp_path / "adapted.int8.xml") == tmp_path / "adapted.colours.json"
    saved = _domains().save(tmp_path / "x.colours.json")
    assert DomainColours.load(saved).domains == _domains().domains


@pytest.fixture(scope="module")
def aligning_model(tmp_path_factory) -> Path:
    """The shipped network under another name, with the shipped model's training-domain colours beside it."""
    folder = tmp_path_factory.mktemp("aligning")
    model = Path(shutil.copy(DEFAULT_MODEL_PATH, folder / "adapted.keras"))
    reference = Reference.load(Reference.beside(DEFAULT_MODEL_PATH))
    assert set(reference.domain_colours) == {"monuseg", "crc", "brca", "consep"}
    DomainColours(reference.domain_colours, windows_per_slide=4, seed=0).save(DomainColours.beside(model))
    return model


def test_a_broken_colours_file_stops_the_model_with_one_line_naming_it(tmp_path: Path) -> None:
    model = Path(shutil.copy(DEFAULT_MODEL_PATH, tmp_path / "m.keras"))
    DomainColours.beside(model).write_text('{"domains": {"a": {"mean_rgb": [0.5]}}}')
    with pytest.raises(ModelError) as err:
        Predictor(model, engine="openvino")
    assert "m.colours.json" in str(err.value) and "\n" not in str(err.value)


def test_a_run_aligns_the_slide_once_and_the_record_says_how(shared_data: Path, aligning_model: Path, predictor) -> None:
    from wsiproc.cohort.cluster import dask_client

    slide = open_slide(shared_data / "monuseg-train" / "images" / MONUSEG_IMAGE, mpp=0.25)
    cfg = RunConfig(tile_px=128, batch_size=4, tissue_mask=False)
    aligning = Predictor(aligning_model, engine="openvino", precision="bfloat16")
    assert aligning.describe()["colour_alignment"]["domains"] == ["brca", "consep", "crc", "monuseg"]
    local = detect(slide, cfg, aligning)
    how = local.figures["colour_alignment"]
    assert how["domain"] in {"monuseg", "crc", "brca", "consep"} and how["tissue_pixels"] > 10000
    assert np.asarray(how["a"]).shape == (3, 3) and len(how["c"]) == 3
    plain = detect(slide, cfg, Predictor(DEFAULT_MODEL_PATH, engine="openvino", precision="bfloat16"))
    assert "colour_alignment" not in plain.figures
    assert len(local.detections) > 100
    assert len(local.detections) != len(plain.detections) or not np.array_equal(local.detections.x_px, plain.detections.x_px)
    # The transform travels with the batches to dask workers: the same nuclei.
    with dask_client("local", n_workers=2) as client:
        remote = detect(slide, cfg, aligning, client=client)
    assert remote.figures["colour_alignment"] == how
    np.testing.assert_array_equal(remote.detections.x_px, local.detections.x_px)
    np.testing.assert_array_equal(remote.detections.confidence, local.detections.confidence)


def _two_crc_crops(folder: Path, shared_data: Path) -> list[Path]:
    """A two-slide cohort: 384² crops of two crc-dev images, at 0.55 µm/px."""
    from PIL import Image

    cohort = []
    for name in ("img3", "img17"):
        crop = Image.open(shared_data / "crc-dev" / "images" / f"{name}.png").convert("RGB").crop((0, 0, 384, 384))
        cohort.append(folder / f"{name}.png")
        crop.save(cohort[-1])
    return cohort


def test_adapt_aligns_a_foreign_cohort_per_slide_and_runs_repeat_its_transform(tmp_path: Path, shared_data: Path) -> None:
    from click.testing import CliRunner

    from wsiproc.cli import main
    from wsiproc.io.files import file_sha256

    cohort, shipped = _two_crc_crops(tmp_path, shared_data), Reference.load(Reference.beside(DEFAULT_MODEL_PATH))
    # A reference whose training domains were all far more confident than this cohort: the cohort is foreign.
    foreign = Reference(shipped.mean_rgb, shipped.cov_rgb, {"a": 0.985, "b": 0.99}, "test", shipped.domain_colours)
    foreign.save(tmp_path / "foreign.reference.json")
    out = tmp_path / "adapted.keras"

    def adapt_args(work: str, *extra: str) -> list[str]:
        return ["adapt", *map(str, cohort), "--recipe", "calibrate", "--mpp", "0.55", "--out", str(out), "--work", str(tmp_path / work),
                "--reference", str(tmp_path / "foreign.reference.json"), *extra]

    result = CliRunner().invoke(main, adapt_args("w"))
    assert result.exit_code == 0, result.output
    assert "each slide's colours are aligned" in result.output
    provenance = json.loads(out.with_suffix(".json").read_text())
    per_slide = provenance["calibration"]["slide_colours"]
    assert set(per_slide) == {str(p) for p in cohort}
    assert provenance["colour_alignment"] == str(DomainColours.beside(out)) and DomainColours.beside(out).is_file()

    # A run of the adapted model computes each slide's transform exactly as adapt measured it.
    results = tmp_path / "results"
    run = CliRunner().invoke(main, ["run", str(cohort[0]), "--mpp", "0.55", "--model", str(out), "--out", str(results)])
    assert run.exit_code == 0, run.output
    (record_file,) = results.glob("img3*.json")
    record = json.loads(record_file.read_text())
    assert record["stats"]["colour_alignment"] == per_slide[str(cohort[0])]
    assert record["model"]["colours_sha256"] == file_sha256(DomainColours.beside(out))  # resume compares it

    # An aligning model is not a base for another adapt; a later adapt without alignment removes the stale file.
    refused = CliRunner().invoke(main, ["adapt", *map(str, cohort), "--mpp", "0.55", "--model", str(out), "--out",
                                        str(tmp_path / "again.keras")])
    assert refused.exit_code != 0 and "adapted.colours.json" in refused.output
    plain = CliRunner().invoke(main, adapt_args("w2", "--no-slide-colours"))
    assert plain.exit_code == 0, plain.output
    assert not DomainColours.beside(out).exists()
    assert json.loads(out.with_suffix(".json").read_text())["calibration"]["slide_colours"] == {}


def test_adapt_leaves_the_colours_of_a_cohort_more_confident_than_training(tmp_path: Path, shared_data: Path) -> None:
    """Sunk confidences point at colours; raised ones do not: such a cohort gets a higher threshold, no slide colours."""
    from click.testing import CliRunner

    from wsiproc.cli import main

    cohort, shipped = _two_crc_crops(tmp_path, shared_data), Reference.load(Reference.beside(DEFAULT_MODEL_PATH))
    # Training domains all far less confident than this cohort.
    timid = Reference(shipped.mean_rgb, shipped.cov_rgb, {"a": 0.05, "b": 0.08}, "test", shipped.domain_colours)
    timid.save(tmp_path / "timid.reference.json")
    out = tmp_path / "adapted.keras"
    result = CliRunner().invoke(main, ["adapt", *map(str, cohort), "--recipe", "calibrate", "--mpp", "0.55", "--out", str(out),
                                       "--work", str(tmp_path / "w"), "--reference", str(tmp_path / "timid.reference.json")])
    assert result.exit_code == 0, result.output
    assert "each slide's colours are aligned" not in result.output
    calibration = json.loads(out.with_suffix(".json").read_text())["calibration"]
    assert calibration["threshold"] > 0.5 and calibration["cohort_confident_share"] > 0.08
    assert calibration["slide_colours"] == {}
    assert not DomainColours.beside(out).exists()


def test_an_aligned_slide_gives_the_same_nuclei_whatever_the_tiles_and_the_tissue_mask(shared_data: Path, aligning_model: Path) -> None:
    from scipy.spatial import cKDTree

    slide = open_slide(shared_data / "monuseg-train" / "images" / MONUSEG_IMAGE, mpp=0.25)
    aligning = Predictor(aligning_model, engine="openvino", precision="bfloat16")
    untiled = detect(slide, RunConfig(tile_px=512, tissue_mask=False), aligning)  # one tile: no seams
    assert len(untiled.detections) > 100
    for cfg in (RunConfig(tile_px=128, tissue_mask=False), RunConfig(tile_px=200, tissue_mask=True)):
        tiled = detect(slide, cfg, aligning)
        assert tiled.figures["colour_alignment"] == untiled.figures["colour_alignment"]
        assert len(tiled.detections) == len(untiled.detections)
        dist, _ = cKDTree(untiled.detections.xy).query(tiled.detections.xy)
        assert dist.max() <= 0.5


def test_explain_shows_the_network_the_slide_as_a_run_aligns_it(shared_data: Path, aligning_model: Path, tmp_path: Path) -> None:
    from wsiproc.evaluate.explain import _slide_colour, explain_slide

    path = shared_data / "monuseg-train" / "images" / MONUSEG_IMAGE
    slide = open_slide(path, mpp=0.25)
    aligning = Predictor(aligning_model, engine="openvino", precision="bfloat16")
    cfg = RunConfig(model_path=str(aligning_model), mpp=0.25)
    in_a_run = detect(slide, cfg, aligning).figures["colour_alignment"]
    assert _slide_colour(slide, cfg, aligning).to_dict() == in_a_run
    assert _slide_colour(slide, cfg, Predictor(DEFAULT_MODEL_PATH, engine="openvino")) is None
    panel = explain_slide(path, tmp_path, aligning_model, n=4, mpp=0.25)
    assert panel.is_file() and panel.stat().st_size > 10_000


def test_consistency_mines_blocks_as_the_aligning_model_sees_them(shared_data: Path, aligning_model: Path, tmp_path: Path) -> None:
    from PIL import Image

    from wsiproc.detection.colour import slide_colour
    from wsiproc.detection.tiling import SlideSampler
    from wsiproc.learn.adapt import AdaptConfig, mine_slide

    path = tmp_path / "img17.png"
    Image.open(shared_data / "crc-dev" / "images" / "img17.png").convert("RGB").save(path)
    aligning = Predictor(aligning_model, engine="openvino", precision="bfloat16")
    cfg = AdaptConfig(recipe="consistency", views=1, block_px=64)
    mined = mine_slide(path, RunConfig(mpp=0.55), aligning, cfg, cap=12, seed=0)
    assert len(mined.images) >= 4
    slide = open_slide(path, mpp=0.55)
    sampler = SlideSampler.for_slide(slide, 0.5)
    colour = slide_colour(sampler, aligning.colours)
    assert colour is not None
    for block, (x, y) in zip(mined.images, mined.positions):
        # read again on its own: resampling a 64-px box instead of the whole tile moves a few values by 1-4 levels
        raw = sampler.read(int(y) - 32, int(x) - 32, 64, 64).astype(int)
        assert np.abs(block - colour.apply(raw.astype(np.uint8)).astype(int)).mean() < 1.0
        assert np.abs(block - raw).mean() > 5.0  # the colours did move
