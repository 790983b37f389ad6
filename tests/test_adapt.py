"""`wsiproc adapt` on real unlabeled H&E: the block store, resume, provenance and the guard against no positives."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsiproc.cli import main


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data: Path) -> list[Path]:
    """Three crc-dev images (another lab and scanner), used without their annotations."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("cohort")
    paths = []
    for name in ("img3", "img17", "img40"):
        # 192 × 192 crops keep the test quick: one small tile each at 0.5 µm/px.
        crop = Image.open(shared_data / "crc-dev" / "images" / f"{name}.png").convert("RGB").crop((0, 0, 192, 192))
        paths.append(folder / f"{name}.png")
        crop.save(paths[-1])
    return paths


def _adapt(cohort: list[Path], out: Path, work: Path, *extra: str):
    return CliRunner().invoke(main, ["adapt", *map(str, cohort), "--mpp", "0.55", "--out", str(out), "--work", str(work),
                                     "--epochs", "1", "--steps-per-epoch", "2", "--per-slide-cap", "40", *extra])


def test_adapt_mines_a_block_store_fine_tunes_and_records_provenance(tmp_path: Path, cohort, shipped_model) -> None:
    import zarr

    from wsiproc.io.files import file_sha256
    from wsiproc.detection.model import load_model

    out, work = tmp_path / "adapted.keras", tmp_path / "work"
    result = _adapt(cohort, out, work)
    assert result.exit_code == 0, result.output
    store = zarr.open_group(str(work / "blocks.zarr"), mode="r")
    slides = store.attrs["slides"]
    assert [Path(s["path"]).name for s in slides] == ["img3.png", "img17.png", "img40.png"]
    n = sum(s["blocks"] for s in slides)
    assert 0 < n <= 3 * 40 and all(s["hard_positives"] >= s["blocks"] for s in slides)
    assert store["images"].shape == (n, 64, 64, 3) and store["masks"].shape == (n, 64, 64)
    assert store["slide"].shape == (n,) and store["position"].shape == (n, 2)
    masks = store["masks"][:]
    assert masks[:, 32, 32].mean() > 0.9  # each block is centred on a confident nucleus
    assert 0.02 < masks.mean() < 0.5  # other nuclei are drawn too, the rest is background
    provenance = json.loads((tmp_path / "adapted.json").read_text())
    assert provenance["base_model"]["sha256"] == file_sha256(shipped_model)
    assert provenance["adapted_model_sha256"] == file_sha256(out)
    assert provenance["thresholds"] == {"high": 0.8, "low": 0.5} and provenance["blocks"] == n
    assert [c["sha256"] for c in provenance["cohort"]] == [file_sha256(p) for p in cohort]
    assert load_model(out).count_params() == load_model(shipped_model).count_params()

    again = _adapt(cohort, tmp_path / "again.keras", work)  # same work folder: resumes, mines nothing anew
    assert again.exit_code == 0, again.output
    assert again.output.count("already mined") == 3
    assert sum(s["blocks"] for s in zarr.open_group(str(work / "blocks.zarr"), mode="r").attrs["slides"]) == n


def test_a_half_written_slide_in_the_store_is_dropped_on_resume(tmp_path: Path) -> None:
    from wsiproc.learn.adapt import BlockStore, MinedSlide

    store = BlockStore(tmp_path / "blocks.zarr", 64)
    mined = MinedSlide(np.zeros((5, 64, 64, 3), np.uint8), np.zeros((5, 64, 64), bool), np.zeros((5, 2)), 7, 0.1)
    store.add({"path": "a", "sha256": "aa"}, mined)
    store.group["images"].append(np.zeros((3, 64, 64, 3), np.uint8), axis=0)  # killed before the commit
    reopened = BlockStore(tmp_path / "blocks.zarr", 64)
    assert len(reopened) == 5 and reopened.group["images"].shape[0] == 5
    assert reopened.finished("aa")["blocks"] == 5 and reopened.finished("bb") is None


def test_adapt_refuses_a_cohort_without_confident_nuclei(tmp_path: Path, shipped_model) -> None:
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("RGB", (256, 256), (250, 250, 250)).save(blank)
    result = _adapt([blank], tmp_path / "a.keras", tmp_path / "work", "--no-tissue-mask")
    assert result.exit_code == 1
    assert "no confident nuclei were found in any slide of the cohort" in result.output
    assert "no confident nuclei (none above the high threshold)" in result.output
    assert not (tmp_path / "a.keras").exists()
