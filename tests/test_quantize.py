"""The int8 path: `wsiproc quantize` on the shipped model (OpenVINO IR + sidecar), then the int8 Predictor against float32.

Calibration is deliberately tiny here (8 crops of 64 px from two MoNuSeg training images) to keep the test fast;
the agreement it checks is on a real held-out MoNuSeg crop, so a broken conversion (wrong head, wrong input
scaling, ranges off by a factor) shows up as missing or extra nuclei. F1 over whole held-out images, bfloat16,
and auto's choice are in test_engines.py.
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
from wsiproc.io.files import file_sha256

CALIBRATION_GLOB = "TCGA-[13]8-*-01Z-00-DX1.tif"  # two training images: TCGA-18-5592, TCGA-38-6178
HELD_OUT_IMAGE = "TCGA-A7-A13E-01Z-00-DX1.tif"  # breast, never trained on nor calibrated on


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_data: Path, shipped_model: Path) -> tuple[Path, Path, object]:
    """(source .keras, int8 .xml, CLI result): the shipped model quantized through the command line."""
    work = tmp_path_factory.mktemp("int8")
    source = shutil.copy(shipped_model, work / "src.keras")
    images = shared_data / "monuseg-train" / "images"
    result = CliRunner().invoke(main, ["quantize", str(source), "--calibration", str(images / CALIBRATION_GLOB), "--mpp", "0.25",
                                       "--crops", "8", "--crop-px", "64"])
    return Path(source), work / "src.int8.xml", result


@pytest.fixture(scope="module")
def held_out_crop(shared_data: Path) -> np.ndarray:
    """A 256 × 256 crop at 0.5 µm/px of a held-out MoNuSeg image (stored at 0.25 µm/px)."""
    from PIL import Image

    from wsiproc.io.resample import rescale_rgb

    rgb = np.asarray(Image.open(shared_data / "monuseg-train" / "images" / HELD_OUT_IMAGE).convert("RGB"))
    return rescale_rgb(rgb, 0.25, 0.5)[96:352, 96:352][None]


def test_the_quantize_command_writes_an_int8_model_beside_the_source_with_its_provenance(converted) -> None:
    from wsiproc.detection.model_files import ir_sha256

    source, xml, result = converted
    assert result.exit_code == 0, result.output
    assert f"saved {xml}" in result.output and "8 crops of 64 px from 2 images" in result.output
    record = json.loads(xml.with_name(xml.name + ".json").read_text())
    assert record["source_sha256"] == file_sha256(source) and record["xml_sha256"] == file_sha256(xml)
    assert record["bin_sha256"] == file_sha256(xml.with_suffix(".bin")) and record["ir_sha256"] == ir_sha256(xml)
    assert record["precision"] == "int8" and record["calibration"]["crops"] == 8 and record["geometry"]["size_multiple_px"] in (4, 8)
    from wsiproc.detection.model import load_model

    float32_bytes = 4 * load_model(source).count_params()
    assert xml.with_suffix(".bin").stat().st_size < 0.4 * float32_bytes  # int8 weights: a quarter of float32's
    assert not [p for p in xml.parent.iterdir() if "partial" in p.name]


def test_the_int8_predictor_reports_its_own_file_and_keeps_the_contract(converted) -> None:
    from wsiproc.detection.model_files import ir_sha256
    from wsiproc.detection.inference import Predictor

    _, xml, _ = converted
    predictor = Predictor(xml)
    assert predictor.sha256 == ir_sha256(xml) and predictor.model_path == xml
    assert (predictor.engine, predictor.precision, predictor.device) == ("openvino", "int8", "CPU")
    m = predictor.size_multiple_px
    rng = np.random.default_rng(0)
    for shape in [(1, 8 * m, 8 * m, 3), (2, 12 * m, 16 * m, 3), (1, 8 * m, 8 * m, 3)]:
        conf = predictor(rng.integers(0, 256, shape, dtype=np.uint8))
        assert conf.shape == shape[:3] and conf.dtype == np.float32
        assert np.isfinite(conf).all() and conf.min() >= 0 and conf.max() <= 1
    with pytest.raises(ValueError, match="expected"):
        predictor(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="Keras"):
        predictor.model  # noqa: B018  (an IR has no Keras layers for LRP or training)


def test_int8_finds_the_same_nuclei_as_float32_on_a_held_out_image(converted, held_out_crop) -> None:
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.postprocess import find_nuclei

    source, xml, _ = converted
    conf32 = Predictor(source, "float32", "openvino")(held_out_crop)[0]
    conf8 = Predictor(source, "int8")(held_out_crop)[0]  # found beside the source
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


def test_a_stale_or_replaced_int8_model_is_refused_naming_it(converted, tmp_path: Path) -> None:
    from wsiproc.detection.inference import Predictor

    source, xml, _ = converted
    for part in (xml, xml.with_suffix(".bin"), xml.with_name(xml.name + ".json")):
        shutil.copy(part, tmp_path / part.name)
    stale = tmp_path / xml.name
    (tmp_path / source.name).write_bytes(source.read_bytes() + b"retrained")  # the .keras changed since
    with pytest.raises(ValueError, match="stale") as info:
        Predictor(stale)
    assert str(info.value).startswith(f"{stale}: ") and "\n" not in str(info.value)
    result = CliRunner().invoke(main, ["run", str(source), "--model", str(stale), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and f"{stale}: stale" in result.output
    with pytest.raises(ValueError, match="stale"):
        Predictor(tmp_path / source.name, "int8")  # found beside the changed .keras: refused too

    (tmp_path / source.name).unlink()
    weights = stale.with_suffix(".bin")
    weights.write_bytes(weights.read_bytes() + b"\0")  # the weights swapped or half-copied
    with pytest.raises(ValueError, match="does not match its sidecar"):
        Predictor(stale)


@pytest.mark.parametrize("args, message", [
    ([], "give either --domains DATA_ROOT or --calibration"),
    (["--calibration", "x/*.tif"], "--calibration needs --mpp"),
    (["--domains", ".", "--out", "m.int8.tflite"], "must end in .xml"),
])
def test_quantize_usage_errors_are_one_line(tiny_model: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["quantize", str(tiny_model), *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_a_labs_int8_model_validated_on_the_labs_own_images_is_what_auto_picks(converted, tmp_path: Path,
                                                                               shared_data: Path) -> None:
    """`--validate lab.yaml` scores float32 and int8 on the lab's held-out images (not the four built-in domains)
    and records the lab's domain and the tolerance judged with; auto then picks the int8 model on those terms."""
    from wsiproc.detection.engines import cpu_info, resolve
    from wsiproc.detection.model_files import read_record
    from wsiproc.learn import datasets

    source, _, _ = converted
    model = Path(shutil.copy(source, tmp_path / "lab.keras"))
    (tmp_path / "images").mkdir()
    rows = ["image,x,y"]
    for im in datasets.domain("crc", shared_data, "train")[:2]:
        shutil.copy(im.path, tmp_path / "images" / im.path.name)
        rows += [f"{im.name},{x:.2f},{y:.2f}" for x, y in im.points_xy]
    (tmp_path / "points.csv").write_text("\n".join(rows) + "\n")
    held = datasets.domain("crc", shared_data, "train")[1].name
    (tmp_path / "lab.yaml").write_text(f"domains:\n  - name: mylab\n    images: images/\n    points: points.csv\n"
                                       f"    mpp: 0.55\n    held_out: [{held}]\n")
    images = shared_data / "monuseg-train" / "images"
    result = CliRunner().invoke(main, ["quantize", str(model), "--calibration", str(images / CALIBRATION_GLOB), "--mpp", "0.25",
                                       "--crops", "8", "--crop-px", "64", "--validate", str(tmp_path / "lab.yaml"),
                                       "--tolerance", "0.5"])
    assert result.exit_code == 0, result.output
    assert "mylab: F1 float32 " in result.output and "validation: passed (F1 loss <= 0.5" in result.output
    validation = read_record(tmp_path / "lab.int8.xml")["validation"]
    assert list(validation["domains"]) == ["mylab"] and validation["domains"]["mylab"]["images"] == 1
    assert validation["tolerance"] == 0.5 and validation["passed"] is True
    if cpu_info().int8:
        choice = resolve(model)
        assert choice.precision == "int8" and "every validated domain (mylab" in choice.reason, choice.reason
