"""Batch behaviour a lab relies on overnight: bad inputs are named and skipped, finished work is not redone."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from wsiproc.detection.classes import CLASSES
from click.testing import CliRunner
from PIL import Image

from wsiproc.cli import main


@pytest.fixture()
def small_slide(tmp_path: Path, slides: Path) -> Path:
    """A real, small H&E SVS region (MoNuSAC), copied under a name with spaces and parentheses."""
    path = tmp_path / "in" / "case 7 (HE).svs"
    path.parent.mkdir()
    shutil.copy(slides / "monusac" / "A9K0_3.svs", path)
    return path


def _run(*args: str) -> "CliRunner.invoke":
    return CliRunner().invoke(main, ["run", "--quiet", *args])


def test_bad_inputs_get_one_line_each_and_the_batch_goes_on(tmp_path: Path, slides: Path, small_slide: Path, shipped_model) -> None:
    fake = tmp_path / "in" / "notes.ndpi"
    fake.write_text("this is not a slide\n")
    truncated = tmp_path / "in" / "truncated.svs"
    truncated.write_bytes((slides / "CMU-1-Small-Region.svs").read_bytes()[:4096])
    bad = {
        slides / "openslide-fixtures" / "unopenable.tiff": "cannot be read",
        slides / "openslide-fixtures" / "unreadable.svs": "cannot be read",
        fake: "cannot be read",
        truncated: "cannot be read",
        tmp_path / "in" / "missing.svs": "file not found",
        tmp_path / "in": "is a directory",
    }
    out = tmp_path / "out"
    result = _run(*map(str, bad), str(small_slide), "--out", str(out))
    assert result.exit_code == 1
    for path, problem in bad.items():
        [line] = [l for l in result.output.splitlines() if l.startswith(f"{path}: ")]
        assert problem in line, line
    assert "Traceback" not in result.output
    assert (out / "case 7 (HE).json").is_file()
    assert "done 1, skipped 0, failed 6 of 7 inputs" in result.output
    per_class = tuple(f"_density_{c}.tiff" for c in CLASSES)  # the shipped model has a class head
    results = sorted(f"case 7 (HE){s}" for s in (".csv", ".geojson", ".json", "_density.png", "_density.tiff", "_qc.png", *per_class))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*results, "summary.csv"])
    assert not list(out.glob(".*.claim")) and not list(out.glob("*.partial"))


def test_finished_inputs_are_skipped_and_changes_mean_reprocessing(tmp_path: Path, small_slide: Path, shipped_model) -> None:
    out = tmp_path / "out"
    assert _run(str(small_slide), "--out", str(out)).exit_code == 0
    record = out / "case 7 (HE).json"
    first = record.stat().st_mtime_ns
    again = _run(str(small_slide), "--out", str(out))
    assert again.exit_code == 0 and "already done" in again.output and record.stat().st_mtime_ns == first
    changed = _run(str(small_slide), "--out", str(out), "--threshold", "0.6")
    assert "already done" not in changed.output and json.loads(record.read_text())["parameters"]["threshold"] == 0.6
    os.utime(small_slide, ns=(first, first + 10**9))  # the slide file itself changed
    assert "already done" not in _run(str(small_slide), "--out", str(out), "--threshold", "0.6").output
    (out / "case 7 (HE).csv").unlink()  # an output went missing
    assert "already done" not in _run(str(small_slide), "--out", str(out), "--threshold", "0.6").output
    assert (out / "case 7 (HE).csv").is_file()


def test_leftovers_of_an_interrupted_run_are_removed(tmp_path: Path, small_slide: Path, shipped_model) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / ".case 7 (HE).csv.1f2e.partial").write_text("x,y\n1,")
    assert _run(str(small_slide), "--out", str(out)).exit_code == 0
    assert not list(out.glob("*.partial")) and not list(out.glob(".*partial"))


def test_blank_and_tiny_images_complete_with_a_warning_or_a_result(tmp_path: Path, shared_data: Path, shipped_model) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (800, 600), (245, 245, 245)).save(blank)
    tiny = tmp_path / "tiny.png"
    he = Image.open(shared_data / "crc-dev" / "images" / "img1.png").convert("RGB")
    he.crop((100, 100, 140, 130)).save(tiny)  # 40 × 30 px: far smaller than one tile
    out = tmp_path / "out"
    result = _run(str(blank), str(tiny), "--mpp", "0.5", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"{blank}: warning: no tissue found" in result.output
    blank_record = json.loads((out / "blank.json").read_text())
    assert blank_record["nuclei"] == 0 and blank_record["tiles"]["tiles_computed"] == 0
    tiny_record = json.loads((out / "tiny.json").read_text())
    assert tiny_record["tiles"]["tiles_total"] == 1
    xy = np.loadtxt(out / "tiny.csv", delimiter=",", skiprows=1, ndmin=2)
    assert len(xy) == tiny_record["nuclei"] and (len(xy) == 0 or (xy[:, 0].max() < 40 and xy[:, 1].max() < 30))
