"""The int8 TFLite path: `wsiproc quantize` on the shipped model, then the int8 Predictor against the float32 one.

Calibration is deliberately tiny here (8 crops of 64 px from two MoNuSeg training images) to keep the test fast;
the agreement it checks is on a real held-out MoNuSeg crop, so a broken conversion (wrong upsampling, wrong input
scaling, ranges off by a factor) shows up as missing or extra nuclei.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from wsiproc.cli import main
from wsiproc.model import file_sha256

CALIBRATION_GLOB = "TCGA-[13]8-*-01Z-00-DX1.tif"  # two training images: TCGA-18-5592, TCGA-38-6178
HELD_OUT_IMAGE = "TCGA-A7-A13E-01Z-00-DX1.tif"  # breast, never trained on nor calibrated on


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data: Path, shipped_model: Path) -> tuple[Path, Path, object]:
    """(source .keras, int8 .tflite, CLI result): the shipped model quantized through the command line."""
    work = tmp_path_factory.mktemp("int8")
    source = shutil.copy(shipped_model, work / "src.keras")
    images = shared_data / "monuseg-train" / "images"
    result = CliRunner().invoke(main, ["quantize", str(source), "--calibration", str(images / CALIBRATION_GLOB), "--mpp", "0.25",
                                       "--out", str(work / "src.int8.tflite"), "--crops", "8", "--crop-px", "64"])
    return Path(source), work / "src.int8.tflite", result


@pytest.fixture(scope="module")
def held_out_crop(shared_data: Path) -> np.ndarray:
    """A 256 × 256 crop at 0.5 µm/px of a held-out MoNuSeg image (stored at 0.25 µm/px)."""
    from PIL import Image

    from wsiproc.resample import rescale_rgb

    rgb = np.asarray(Image.open(shared_data / "monuseg-train" / "images" / HELD_OUT_IMAGE).convert("RGB"))
    return rescale_rgb(rgb, 0.25, 0.5)[100:356, 100:356][None]


def test_the_quantize_command_writes_an_int8_file_and_its_provenance(converted) -> None:
    source, tflite, result = converted
    assert result.exit_code == 0, result.output
    assert f"saved {tflite}" in result.output and "8 crops of 64 px from 2 images" in result.output
    record = json.loads(tflite.with_name(tflite.name + ".json").read_text())
    assert record["source_sha256"] == file_sha256(source) and record["tflite_sha256"] == file_sha256(tflite)
    assert record["precision"] == "int8" and record["calibration"]["crops"] == 8
    assert 5e6 < tflite.stat().st_size < 12e6  # int8 weights: a quarter of the 31.8 MB float32 model
    assert not [p for p in tflite.parent.iterdir() if "partial" in p.name]


def test_the_int8_predictor_reports_its_own_file_and_keeps_the_contract(converted) -> None:
    from wsiproc.inference import Predictor

    _, tflite, _ = converted
    predictor = Predictor(tflite)
    assert predictor.sha256 == file_sha256(tflite) and predictor.model_path == tflite
    assert predictor.precision == "int8" and predictor.device == "CPU"
    rng = np.random.default_rng(0)
    for shape in [(1, 64, 64, 3), (2, 96, 128, 3), (1, 64, 64, 3)]:  # the interpreter is resized each time
        conf = predictor(rng.integers(0, 256, shape, dtype=np.uint8))
        assert conf.shape == shape[:3] and conf.dtype == np.float32
        assert np.isfinite(conf).all() and conf.min() >= 0 and conf.max() <= 1
    with pytest.raises(ValueError, match="expected"):
        predictor(np.zeros((64, 64, 3), np.uint8))


def test_int8_finds_the_same_nuclei_as_float32_on_a_held_out_image(converted, held_out_crop, predictor) -> None:
    from wsiproc.inference import Predictor
    from wsiproc.postprocess import find_nuclei

    conf32 = predictor(held_out_crop)[0]
    conf8 = Predictor(converted[1])(held_out_crop)[0]
    assert np.abs(conf8 - conf32).mean() < 0.02
    nuc32, nuc8 = find_nuclei(conf32), find_nuclei(conf8)
    yx32 = np.column_stack([nuc32.y, nuc32.x])
    yx8 = np.column_stack([nuc8.y, nuc8.x])
    assert len(yx32) > 50  # a real, nucleus-dense crop
    assert abs(len(yx8) - len(yx32)) <= 0.1 * len(yx32)
    dist = cdist(yx32, yx8)
    rows, cols = linear_sum_assignment(dist)
    matched = int((dist[rows, cols] <= 2.0).sum())
    assert matched >= 0.9 * len(yx32), f"{matched} of {len(yx32)} float32 nuclei found by int8 within 2 px"


def test_a_stale_or_replaced_int8_file_is_refused_naming_it(converted, tmp_path: Path) -> None:
    from wsiproc.inference import Predictor

    source, tflite, _ = converted
    stale = Path(shutil.copy(tflite, tmp_path / tflite.name))
    shutil.copy(tflite.with_name(tflite.name + ".json"), tmp_path / (tflite.name + ".json"))
    (tmp_path / source.name).write_bytes(source.read_bytes() + b"retrained")  # the .keras changed since
    with pytest.raises(ValueError, match="stale") as info:
        Predictor(stale)
    assert str(info.value).startswith(f"{stale}: ") and "\n" not in str(info.value)
    result = CliRunner().invoke(main, ["run", str(source), "--model", str(stale), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{stale}: stale" in result.output

    (tmp_path / source.name).unlink()
    stale.write_bytes(stale.read_bytes() + b"\0")  # the .tflite itself swapped or half-copied
    with pytest.raises(ValueError, match="does not match its sidecar"):
        Predictor(stale)


def test_float32_tflite_conversion_gives_the_keras_confidence(shipped_model: Path, predictor, tmp_path: Path) -> None:
    """The layer rewrite (upsampling as depth_to_space) must not move a pixel: float32 TFLite equals Keras."""
    from wsiproc.inference import Predictor
    from wsiproc.quantize import convert_float32, write_tflite

    path = write_tflite(convert_float32(shipped_model), tmp_path / "f32.tflite", shipped_model)
    tiles = np.random.default_rng(2).integers(0, 256, (2, 64, 96, 3), dtype=np.uint8)
    tflite = Predictor(path)
    assert tflite.precision == "float32"
    np.testing.assert_allclose(tflite(tiles), predictor(tiles), atol=1e-5)
