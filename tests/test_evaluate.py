"""Scoring: one-to-one matching within a radius, the label-map rule, set totals and their reports."""
from __future__ import annotations

import csv
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import linear_sum_assignment

from wsiproc.io.annotations import read_points
from wsiproc.detection.detections import Detections
from wsiproc.evaluate.scoring import Score, evaluate_sets, format_table, match_points, read_predictions, score_image, write_scores_csv
from wsiproc.outputs.formats import write_csv

MONUSEG_IMAGE = "TCGA-18-5592-01Z-00-DX1"


def xy(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


# --------------------------------------------------------------------------------------- matching


def test_known_hits_false_alarms_and_misses() -> None:
    truth = xy((10, 10), (50, 50), (90, 90))
    pred = xy((12, 11), (49, 52), (200, 200), (48, 50))  # two detections near (50, 50): one is a duplicate

    pred_idx, true_idx = match_points(pred, truth, radius_px=5)

    assert sorted(zip(pred_idx.tolist(), true_idx.tolist())) in ([(0, 0), (1, 1)], [(0, 0), (3, 1)])
    assert score_image(pred, truth, radius_px=5) == Score(tp=2, fp=2, fn=1)


def test_chain_where_nearest_first_matching_loses_a_pair() -> None:
    """P0 is nearest to T1, but taking that pair leaves P1 (which only reaches T1) and T0 unmatched."""
    truth = xy((0, 0), (10, 0))
    pred = xy((6, 0), (15, 0))  # P0: 6 from T0, 4 from T1; P1: 5 from T1, 15 from T0

    pred_idx, true_idx = match_points(pred, truth, radius_px=6.5)

    assert pred_idx.tolist() == [0, 1] and true_idx.tolist() == [0, 1]
    assert score_image(pred, truth, radius_px=6.5) == Score(tp=2, fp=0, fn=0)


def test_among_equally_many_pairs_the_closest_pairing_wins() -> None:
    truth = xy((0.9, 0), (0.1, 0))
    pred = xy((0, 0), (1, 0))

    pred_idx, true_idx = match_points(pred, truth, radius_px=2)

    assert true_idx[np.argsort(pred_idx)].tolist() == [1, 0]


def test_radius_is_inclusive_and_nothing_beyond_it_matches() -> None:
    truth = xy((0, 0), (100, 0))
    pred = xy((10, 0), (100, 10.000001))

    assert score_image(pred, truth, radius_px=10) == Score(tp=1, fp=1, fn=1)


def test_empty_predictions_or_truth() -> None:
    truth = xy((1, 1), (2, 2))

    missed = score_image(np.zeros((0, 2)), truth, radius_px=5)
    invented = score_image(truth, np.zeros((0, 2)), radius_px=5)
    nothing = score_image([], [], radius_px=5)

    assert missed == Score(0, 0, 2) and (missed.precision, missed.recall, missed.f1) == (0.0, 0.0, 0.0)
    assert invented == Score(0, 2, 0) and invented.f1 == 0.0
    assert nothing == Score(0, 0, 0) and nothing.f1 == 0.0
    assert [a.tolist() for a in match_points(np.zeros((0, 2)), truth, 5)] == [[], []]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"radius_px must be a positive number of pixels, got 0"):
        match_points(xy((0, 0)), xy((0, 0)), 0)
    with pytest.raises(ValueError, match=r"pred_xy has shape \(3,\), expected \(N, 2\) x, y"):
        match_points(np.ones(3), xy((0, 0)), 5)


def test_matching_equals_an_exhaustive_assignment_on_crowded_random_points() -> None:
    """Reference: one dense assignment over all points, where a non-pair costs more than any pairing."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        truth = rng.uniform(0, 100, (int(rng.integers(1, 80)), 2))
        pred = rng.uniform(0, 100, (int(rng.integers(1, 80)), 2))
        distance = np.hypot(*(pred[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
        rows, cols = linear_sum_assignment(np.where(distance <= 12, distance, 1e9))
        within = distance[rows, cols] <= 12

        pred_idx, true_idx = match_points(pred, truth, radius_px=12)

        assert len(pred_idx) == within.sum()
        assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(true_idx.tolist())) == len(true_idx)
        assert np.all(distance[pred_idx, true_idx] <= 12)
        assert distance[pred_idx, true_idx].sum() == pytest.approx(distance[rows, cols][within].sum())


def test_matching_a_whole_image_of_crowded_nuclei_equals_the_exhaustive_assignment() -> None:
    """MoNuSeg-like density at the 5 µm radius: candidate pairs chain across the whole image."""
    rng = np.random.default_rng(3)
    truth = rng.uniform(0, 600, (1500, 2))
    pred = np.vstack([truth[:1400] + rng.normal(0, 6, (1400, 2)), rng.uniform(0, 600, (150, 2))])
    distance = np.hypot(*(pred[:, None, :] - truth[None, :, :]).transpose(2, 0, 1))
    rows, cols = linear_sum_assignment(np.where(distance <= 20, distance, 1e9))
    within = distance[rows, cols] <= 20

    pred_idx, true_idx = match_points(pred, truth, radius_px=20)

    assert len(pred_idx) == within.sum()
    assert distance[pred_idx, true_idx].sum() == pytest.approx(distance[rows, cols][within].sum())


# --------------------------------------------------------------------------------------- Score


def test_score_ratios_and_micro_average() -> None:
    a, b = Score(tp=8, fp=2, fn=0), Score(tp=0, fp=0, fn=10)

    assert (a.precision, a.recall, a.f1) == (0.8, 1.0, pytest.approx(16 / 18))
    total = a + b
    assert total == Score(8, 2, 10) and sum([a, b]) == total
    assert (total.n_true, total.n_pred) == (18, 10)
    assert total.recall == pytest.approx(8 / 18)  # not the mean of the images' recalls (0.5)


# ------------------------------------------------------------------------------------ label maps


def _toy_label_map() -> np.ndarray:
    """Nucleus 1: a long bar (centroid (20, 2)); nucleus 2: a square (centroid (4.5, 10.5)); nucleus 7: small."""
    label_map = np.zeros((20, 45), np.uint16)
    label_map[1:4, 1:40] = 1
    label_map[8:14, 2:8] = 2
    label_map[17:19, 40:42] = 7
    return label_map


def test_label_map_rule_counts_detections_on_a_nucleus_off_its_centroid() -> None:
    label_map = _toy_label_map()
    pred = xy(
        (37.4, 2.4),  # inside the bar, 17 px from its centroid: a hit only by the mask
        (3.0, 2.0),  # also inside the bar: the bar is found once, so this is a false alarm
        (5.0, 11.0),  # near the square's centroid
        (30.0, 12.0),  # background, far from everything
    )

    with_mask = score_image(pred, None, radius_px=5, label_map=label_map)
    centroids_only = score_image(pred, xy((20, 2), (4.5, 10.5), (40.5, 17.5)), radius_px=5)

    assert with_mask == Score(tp=2, fp=2, fn=1)
    assert centroids_only == Score(tp=1, fp=3, fn=2)


def test_label_map_rule_pairs_jointly_rather_than_centroids_first() -> None:
    """A is within the radius of the bar's centroid but lies on the square; B lies on the bar only.

    Pairing A with the bar (centroid rule first) would leave B and the square unmatched.
    """
    label_map = np.zeros((12, 30), np.uint16)
    label_map[0:2, 0:30] = 1  # bar along the top: centroid (14.5, 0.5)
    label_map[2:6, 13:17] = 2  # square just below its middle: centroid (14.5, 3.5)
    pred = xy((14.5, 1.6), (2.0, 1.0))  # A: on the square, 1.1 px from the bar's centroid, 1.9 from the square's

    assert score_image(pred, None, radius_px=3, label_map=label_map) == Score(tp=2, fp=0, fn=0)


def test_label_map_rule_on_real_data_agrees_with_the_published_centroids(shared_data: Path) -> None:
    centroids = read_points(shared_data / "monuseg-train/centroids" / f"train_{MONUSEG_IMAGE}_from_masks.csv")
    from_masks = read_points(shared_data / "monuseg-train/labels" / f"{MONUSEG_IMAGE}.png")

    per_image, total = evaluate_sets(centroids, from_masks, radius_px=5 / 0.25)
    label_map = shared_data / "monuseg-train/labels" / f"{MONUSEG_IMAGE}.png"
    with_rule, _ = evaluate_sets(centroids, from_masks, radius_px=20.0, label_maps={MONUSEG_IMAGE: label_map})

    assert per_image[MONUSEG_IMAGE] == Score(tp=480, fp=0, fn=0) and total.f1 == 1.0
    assert with_rule[MONUSEG_IMAGE].f1 == 1.0


# ------------------------------------------------------------------------------------------ sets


def test_set_scores_every_annotated_image_and_warns_about_mismatched_names() -> None:
    truth = {"a": xy((0, 0), (10, 10)), "b": xy((5, 5)), "c": xy((1, 1), (2, 2), (3, 3))}
    pred = {"a": xy((0, 1), (50, 50)), "b": xy((5, 9)), "typo": xy((1, 1))}

    with pytest.warns(UserWarning) as caught:
        per_image, total = evaluate_sets(pred, truth, radius_px={"a": 2.0, "b": 5.0, "c": 2.0})

    assert list(per_image) == ["a", "b", "c"]
    assert per_image == {"a": Score(1, 1, 1), "b": Score(1, 0, 0), "c": Score(0, 0, 3)}
    assert total == Score(2, 1, 4)
    messages = [str(w.message) for w in caught]
    assert messages == [
        "no predictions for 1 of 3 annotated images (c): their 3 nuclei count as missed",
        "predictions for 1 images without annotations (typo): not scored",
    ]


def test_set_needs_a_radius_for_every_image() -> None:
    with pytest.raises(ValueError, match="no radius_px given for image 'b'"):
        evaluate_sets({"a": xy((0, 0))}, {"a": xy((0, 0)), "b": xy((1, 1))}, radius_px={"a": 2.0})


def test_set_scores_label_map_images_by_their_labels_and_says_when_points_disagree(tmp_path: Path) -> None:
    path = tmp_path / "a_labels.png"
    Image.fromarray(_toy_label_map()).save(path)
    truth = {"a": xy((20, 2)), "b": xy((0, 0))}  # "a" has 3 labels but only 1 annotated point
    pred = {"a": xy((37.4, 2.4), (5.0, 11.0)), "b": xy((0, 1))}

    with pytest.warns(UserWarning, match=r"count different nuclei \(a: 3 labels, 1 points\): scored against"):
        per_image, total = evaluate_sets(pred, truth, radius_px=5, label_maps={"a": path})

    assert per_image == {"a": Score(2, 0, 1), "b": Score(1, 0, 0)}
    assert total == Score(3, 0, 1)


def test_set_errors_name_the_label_map_file(tmp_path: Path) -> None:
    path = tmp_path / "a_labels.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: RGB image, not an instance label map"):
        evaluate_sets({"a": xy((0, 0))}, {"a": xy((0, 0))}, radius_px=5, label_maps={"a": path})


# --------------------------------------------------------------------------------------- reports


def test_table_is_aligned_and_ends_with_the_micro_average() -> None:
    per_image = {"img1": Score(9, 1, 0), "a-much-longer-name": Score(0, 0, 5)}

    lines = format_table(per_image, Score(9, 1, 5)).splitlines()

    assert lines[0].split() == ["image", "n_true", "n_pred", "tp", "fp", "fn", "precision", "recall", "f1"]
    assert lines[2].split() == ["img1", "9", "10", "9", "1", "0", "0.900", "1.000", "0.947"]
    assert lines[-1].split() == ["ALL", "(micro)", "14", "10", "9", "1", "5", "0.900", "0.643", "0.750"]
    assert len({len(line) for line in lines}) == 1


def test_scores_csv_is_written_whole(tmp_path: Path) -> None:
    path = tmp_path / "set_scores.csv"

    write_scores_csv(path, {"img1": Score(2, 1, 0)}, Score(2, 1, 0))

    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["image"] for r in rows] == ["img1", "ALL (micro)"]
    assert rows[0]["precision"] == "0.666667" and rows[1]["tp"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set_scores.csv"]


# ---------------------------------------------------------------------------------- predictions


def test_predictions_are_read_from_a_results_folder(tmp_path: Path) -> None:
    det = Detections(np.array([10.0, 3.5]), np.array([20.0, 4.25]), np.array([0.9, 0.8]), np.array([30.0, 40.0]))
    write_csv(tmp_path / "train_slide_points.csv", det, mpp=0.5)  # the stem is kept exactly as written
    write_csv(tmp_path / "empty.csv", Detections.empty(), mpp=0.5)
    write_scores_csv(tmp_path / "run_scores.csv", {}, Score(0, 0, 0))
    (tmp_path / "empty.geojson").write_text('{"type": "FeatureCollection", "features": []}')
    (tmp_path / "summary.csv").write_text("input,status,detail,nuclei\nslide.svs,done,,12\n")  # the cohort table

    pred = read_predictions(tmp_path)

    assert sorted(pred) == ["empty", "train_slide_points"]
    np.testing.assert_array_equal(pred["train_slide_points"], [[3.5, 4.25], [10.0, 20.0]])  # rows sorted by y
    assert pred["empty"].shape == (0, 2)
    assert list(read_predictions(tmp_path / "empty.csv")) == ["empty"]


def test_predictions_folder_without_results_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=rf"{re.escape(str(tmp_path))}: no prediction files"):
        read_predictions(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing: no such file or folder"):
        read_predictions(tmp_path / "missing")


def test_no_warning_when_names_agree() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, total = evaluate_sets({"a": xy((0, 0))}, {"a": xy((0, 0))}, radius_px=1.0)
    assert total == Score(1, 0, 0)
