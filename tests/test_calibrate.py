"""Cohort calibration: colour moments matched exactly, the threshold rule, and both folds exact in the network."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from wsiproc.learn.calibrate import (SHARE_TOLERANCE, ColourStats, Reference, colour_transform, fold_colour, fold_threshold,
                                     recalibrated_threshold, share_reaching)


def _reference(mean, cov, shares=(0.75, 0.85)) -> Reference:
    return Reference(list(mean), [list(r) for r in cov], {"a": shares[0], "b": shares[1]})


def test_the_colour_transform_gives_the_cohort_the_reference_moments() -> None:
    rng = np.random.default_rng(0)
    cohort_px = rng.multivariate_normal([0.75, 0.58, 0.78], [[0.010, 0.006, 0.004], [0.006, 0.012, 0.005], [0.004, 0.005, 0.008]], 20000)
    img = np.clip(np.round(cohort_px * 255), 0, 255).astype(np.uint8).reshape(100, 200, 3)
    stats = ColourStats().add(img, step=1)
    ref = _reference([0.69, 0.51, 0.69], [[0.02, 0.012, 0.006], [0.012, 0.018, 0.007], [0.006, 0.007, 0.011]])
    a, c = colour_transform(stats, ref)
    px = img.reshape(-1, 3)[img.reshape(-1, 3).min(1) < 216] / 255.0
    mapped = px @ a.T + c
    np.testing.assert_allclose(mapped.mean(0), ref.mean_rgb, atol=1e-9)
    np.testing.assert_allclose(np.cov(mapped.T, bias=True), ref.cov_rgb, atol=1e-9)


def test_glass_is_left_out_of_the_colour_moments() -> None:
    img = np.full((10, 10, 3), 245, np.uint8)
    img[:5] = (150, 80, 160)
    stats = ColourStats().add(img, step=1)
    assert stats.n == 50
    np.testing.assert_allclose(stats.mean, np.array([150, 80, 160]) / 255.0)


def test_the_threshold_moves_only_when_the_cohort_leaves_the_training_range() -> None:
    ref = _reference([0.5] * 3, np.eye(3) * 0.01, shares=(0.75, 0.85))
    familiar = np.r_[np.full(80, 0.9), np.full(20, 0.3)]  # 80 % reach 0.5: inside 75–85 %
    assert recalibrated_threshold(familiar, ref) == (0.5, 0.8)
    faint = np.r_[np.full(50, 0.9), np.linspace(0.15, 0.45, 50)]  # 50 %: lower to let 75 % through
    t, share = recalibrated_threshold(faint, ref)
    assert share == 0.5 and 0.2 <= t < 0.5
    assert share_reaching(faint, t) == pytest.approx(0.75, abs=0.02)
    t, share = recalibrated_threshold(np.full(10, 0.05), ref)  # nothing above the floor to judge from: as is
    assert t == 0.5 and np.isnan(share)


def test_folding_equals_transforming_the_input_and_shifting_the_threshold() -> None:
    import keras

    from wsiproc.detection import architectures

    model = architectures.build("unet")
    rng = np.random.default_rng(1)
    x = rng.uniform(0.2, 0.9, (1, 64, 64, 3)).astype(np.float32)
    a = np.array([[1.1, -0.05, 0.02], [0.03, 0.95, 0.04], [-0.02, 0.06, 1.2]])
    c = np.array([-0.04, 0.03, -0.08])
    before = model.predict(((x.reshape(-1, 3) @ a.T + c).reshape(x.shape)).astype(np.float32), verbose=0)[0, ..., 0]
    fold_colour(model, a, c)
    fold_threshold(model, 0.3)
    after = model.predict(x, verbose=0)[0, ..., 0]
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    inner = (slice(8, -8), slice(8, -8))  # away from the zero-padded border
    np.testing.assert_allclose(logit(after)[inner], logit(before)[inner] - logit(0.3), atol=2e-3)
    assert keras.ops.convert_to_numpy(model.get_layer("confidence").bias).shape == (1,)


def test_wsiproc_adapt_calibrates_the_shipped_model_to_a_cohort(tmp_path: Path, shared_data: Path, shipped_model) -> None:
    from PIL import Image

    from wsiproc.cli import main
    from wsiproc.detection.model import load_model
    from wsiproc.io.files import file_sha256

    cohort = []
    for name in ("img3", "img17", "img40"):
        crop = Image.open(shared_data / "crc-dev" / "images" / f"{name}.png").convert("RGB").crop((0, 0, 384, 384))
        cohort.append(tmp_path / f"{name}.png")
        crop.save(cohort[-1])
    out, work = tmp_path / "calibrated.keras", tmp_path / "work"
    args = ["adapt", *map(str, cohort), "--recipe", "calibrate", "--mpp", "0.55", "--out", str(out), "--work", str(work)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "calibrated from 3 slides" in result.output and not (work / "blocks.zarr").exists()
    provenance = json.loads(out.with_suffix(".json").read_text())
    cal = provenance["calibration"]
    assert provenance["recipe"] == "calibrate" and provenance["training"] is None
    assert provenance["base_model"]["sha256"] == file_sha256(shipped_model)
    assert cal["tiles"] == 3 and cal["tissue_pixels"] > 10000 and cal["peaks"] > 50
    assert 0.2 <= cal["threshold"] <= 0.8
    assert np.array_equal(cal["colour_a"], np.eye(3)) and cal["colour_c"] == [0.0, 0.0, 0.0]  # colours as they are
    base = load_model(shipped_model)

    def changed_layers(path: Path) -> list[str]:
        adapted = load_model(path)
        return [layer.name for layer, other in zip(base.layers, adapted.layers)
                if any(not np.array_equal(np.asarray(w), np.asarray(v)) for w, v in zip(layer.get_weights(), other.get_weights()))]

    # Only the confidence bias may move, and only when the cohort's confident share left the training range.
    assert changed_layers(out) == ([] if cal["threshold"] == 0.5 else ["confidence"])
    lo, hi = cal["reference_share_range"]
    inside = lo - SHARE_TOLERANCE <= cal["cohort_confident_share"] <= hi + SHARE_TOLERANCE
    assert inside == (cal["threshold"] == 0.5)

    again = CliRunner().invoke(main, args)  # same work folder: the calibration is reused
    assert again.exit_code == 0 and "cohort calibration already done" in again.output

    coloured = tmp_path / "coloured.keras"
    result = CliRunner().invoke(main, [*args[:-4], "--out", str(coloured), "--work", str(tmp_path / "w2"), "--align-colour"])
    assert result.exit_code == 0, result.output
    assert changed_layers(coloured)[0] == "block1_conv1" and set(changed_layers(coloured)) <= {"block1_conv1", "confidence"}
    assert np.linalg.det(np.array(json.loads(coloured.with_suffix(".json").read_text())["calibration"]["colour_a"])) > 0
