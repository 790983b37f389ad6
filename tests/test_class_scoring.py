"""Nucleus-type scoring (issue #23): HoVer-Net's F_c and the per-class F1 after one class-blind matching, the
class table and CSV, predicted classes read from results, class labels of the data sets, and `wsiproc evaluate`
printing a class table where both sides have classes (and saying why not where they do not).

Every expected number is worked out by hand in the comments beside it.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from wsiproc.cli import main
from wsiproc.detection.detections import Detections
from wsiproc.evaluate.scoring import (ClassScore, evaluate_class_sets, format_class_table, prediction_class_index,
                                      read_labelled_predictions, read_predictions, score_classes, score_image,
                                      write_class_scores_csv)
from wsiproc.outputs.formats import write_csv

EPI, INF, STR, NONE = 0, 1, 2, -1


def xy(*points: tuple[float, float]) -> np.ndarray:
    return np.asarray(points, dtype=np.float64).reshape(-1, 2)


# Six annotated nuclei on a line, seven detections; radius 2 px. [pred, truth] of the matched pairs:
#   P0-T0 (epi, epi)   P1-T1 (inf, epi)   P2-T2 (inf, inf)   P3-T3 (epi, str)   P4-T4 (str, unlabelled)
#   T5 (inf) missed; P5 (str), P6 (epi) false alarms.
TRUE_XY = xy((0, 0), (10, 0), (20, 0), (30, 0), (40, 0), (50, 0))
TRUE_CLASS = np.array([EPI, EPI, INF, STR, NONE, INF])
PRED_XY = xy((0.5, 0), (10, 1), (20, 0), (30, 0), (40, 0), (70, 0), (80, 0))
PRED_CLASS = np.array([EPI, INF, INF, EPI, STR, STR, EPI])


def _example() -> ClassScore:
    return score_classes(PRED_XY, PRED_CLASS, TRUE_XY, TRUE_CLASS, radius_px=2.0)


def test_counts_of_matched_pairs_and_of_detection_errors() -> None:
    s = _example()

    assert (s.tp_d, s.fp_d, s.fn_d) == (5, 2, 1)
    # The 4 pairs with a labelled truth: (epi,epi) (inf,epi) (inf,inf) (epi,str); the unlabelled T4 is in none.
    assert s.tp_c == (1, 1, 0)
    assert s.fp_c == (1, 1, 0)  # epi: P3 on a stromal nucleus; inf: P1 on an epithelial one
    assert s.fn_c == (1, 0, 1)  # epi: T1 called inflammatory; str: T3 called epithelial
    assert s.tn_c == (1, 2, 3)  # pairs with neither class: epi (inf,inf); inf (epi,epi) (epi,str); str all but P3-T3
    assert s.fp_u == (1, 0, 1) and s.fn_u == (0, 1, 0)
    assert s.n_pred == (3, 2, 2) and [s.n_true(c) for c in range(3)] == [2, 2, 1]
    assert all(s.tp_c[c] + s.tn_c[c] + s.fp_c[c] + s.fn_c[c] == 4 for c in range(3))


def test_hovernet_f_c_and_detection_f_d() -> None:
    s = _example()

    assert s.f_d == pytest.approx(10 / 13)  # 2·5 / (2·5 + 2 + 1)
    # 2(TP_c + TN_c) / (2(TP_c + TN_c) + 2 FP_c + 2 FN_c + FP_d + FN_d), FP_d + FN_d = 3
    assert s.f_c("epithelial") == pytest.approx(4 / 11)  # 2(1+1) / (4 + 2 + 2 + 3)
    assert s.f_c("inflammatory") == pytest.approx(6 / 11)  # 2(1+2) / (6 + 2 + 0 + 3)
    assert s.f_c(STR) == pytest.approx(6 / 11)  # 2(0+3) / (6 + 0 + 2 + 3)


def test_plain_per_class_f1_after_the_global_matching() -> None:
    s = _example()

    # epi: TP 1; FP = P3 (on stroma) + P6 (unmatched) = 2; FN = T1 (called inflammatory) = 1
    assert (s.counts(EPI).tp, s.counts(EPI).fp, s.counts(EPI).fn) == (1, 2, 1)
    assert (s.precision(EPI), s.recall(EPI), s.f1(EPI)) == pytest.approx((1 / 3, 1 / 2, 2 / 5))
    # inf: TP 1; FP = P1 = 1; FN = T5 (missed) = 1
    assert (s.precision(INF), s.recall(INF), s.f1(INF)) == pytest.approx((1 / 2, 1 / 2, 1 / 2))
    # str: TP 0; FP = P5 (unmatched; P4 sits on an unlabelled nucleus and counts nowhere); FN = T3
    assert (s.counts(STR).tp, s.counts(STR).fp, s.counts(STR).fn) == (0, 1, 1) and s.f1(STR) == 0.0


def test_classes_never_change_the_matching() -> None:
    """Class-blind pairing: a detection of the wrong class beside the truth is still its partner."""
    truth, pred = xy((0, 0), (3, 0)), xy((1.4, 0), (4.5, 0))
    s = score_classes(pred, np.array([INF, EPI]), truth, np.array([EPI, INF]), radius_px=1.5)

    detection = score_image(pred, truth, radius_px=1.5)
    assert s.detection == detection and (s.tp_d, s.fp_d, s.fn_d) == (2, 0, 0)
    assert s.tp_c == (0, 0, 0) and s.fp_c == (1, 1, 0) and s.fn_c == (1, 1, 0)
    assert s.f_c(EPI) == 0.0 and s.f_c(STR) == 1.0  # no stromal anywhere, no detection error: all TN


def test_perfect_and_empty_images() -> None:
    perfect = score_classes(TRUE_XY, TRUE_CLASS.clip(0), TRUE_XY, TRUE_CLASS.clip(0), radius_px=1.0)
    assert [perfect.f_c(c) for c in range(3)] == [1.0, 1.0, 1.0] and perfect.f_d == 1.0

    nothing = score_classes(xy(), np.zeros(0, np.int64), xy(), np.zeros(0, np.int64), radius_px=1.0)
    assert nothing == ClassScore.empty() and nothing.f_d == 0.0 and nothing.f_c(EPI) == 0.0

    missed = score_classes(xy(), np.zeros(0, np.int64), TRUE_XY, TRUE_CLASS, radius_px=1.0)
    assert (missed.tp_d, missed.fn_d) == (0, 6) and missed.fn_u == (2, 2, 1) and missed.recall(INF) == 0.0


def test_class_scores_add_up_over_images() -> None:
    a = score_classes(PRED_XY[:3], PRED_CLASS[:3], TRUE_XY[:3], TRUE_CLASS[:3], radius_px=2.0)
    b = score_classes(PRED_XY[3:], PRED_CLASS[3:], TRUE_XY[3:], TRUE_CLASS[3:], radius_px=2.0)

    assert a + b == _example() == sum([a, b])
    assert (a + b).f_c(EPI) == pytest.approx(4 / 11)  # micro: counts summed before the ratio


def test_bad_class_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="pred_class has 2 entries for 7 points"):
        score_classes(PRED_XY, np.array([0, 1]), TRUE_XY, TRUE_CLASS, radius_px=2.0)
    with pytest.raises(ValueError, match=r"true_class has indices outside -1 … 2"):
        score_classes(PRED_XY, PRED_CLASS, TRUE_XY, TRUE_CLASS + 1, radius_px=2.0)
    with pytest.raises(ValueError, match="must be class indices"):
        score_classes(PRED_XY, PRED_CLASS.astype(float), TRUE_XY, TRUE_CLASS, radius_px=2.0)
    with pytest.raises(ValueError, match="radius_px must be a positive number"):
        score_classes(PRED_XY, PRED_CLASS, TRUE_XY, TRUE_CLASS, radius_px=0)


def test_sets_score_every_annotated_image() -> None:
    truth = {"a": (TRUE_XY, TRUE_CLASS), "b": (xy((5, 5)), np.array([STR]))}
    pred = {"a": (PRED_XY, PRED_CLASS), "other": (xy((1, 1)), np.array([EPI]))}

    per_image, total = evaluate_class_sets(pred, truth, {"a": 2.0, "b": 2.0})

    assert list(per_image) == ["a", "b"]  # "b" without predictions: its nucleus is missed; "other" not scored
    assert per_image["b"].fn_u == (0, 0, 1) and total == _example() + per_image["b"]
    assert (total.tp_d, total.fp_d, total.fn_d) == (5, 2, 2)


# ------------------------------------------------------------------------------------------ reports


def test_class_table_shows_f_d_then_each_class() -> None:
    lines = format_class_table(_example(), radius_um=3.0).splitlines()

    assert lines[0].startswith("detection F_d 0.769 within 3 µm (tp 5, fp 2, fn 1)")
    assert lines[1].split() == ["class", "n_true", "n_pred", "f_c", "f1", "precision", "recall"]
    assert lines[3].split() == ["epithelial", "2", "3", "0.364", "0.400", "0.333", "0.500"]
    assert lines[4].split() == ["inflammatory", "2", "2", "0.545", "0.500", "0.500", "0.500"]
    assert lines[5].split() == ["stromal", "1", "2", "0.545", "0.000", "0.000", "0.000"]
    assert lines[6] == "(1 annotated nuclei without a class count for detection only)"
    assert len({len(line) for line in lines[1:6]}) == 1  # aligned


def test_class_scores_csv(tmp_path: Path) -> None:
    path = write_class_scores_csv(tmp_path / "run_class_scores.csv", _example())

    with open(path, newline="") as fh:
        rows = {r["class"]: r for r in csv.DictReader(fh)}
    assert list(rows) == ["detection", "epithelial", "inflammatory", "stromal"]
    assert rows["detection"]["f1"] == f"{10 / 13:.6f}" and rows["detection"]["f_c"] == ""
    epi = rows["epithelial"]
    assert (epi["n_true"], epi["n_pred"], epi["tp"], epi["fp"], epi["fn"]) == ("2", "3", "1", "2", "1")
    assert epi["f_c"] == f"{4 / 11:.6f}" and (epi["tp_c"], epi["tn_c"], epi["fp_c"], epi["fn_c"]) == ("1", "1", "1", "1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run_class_scores.csv"]


# ---------------------------------------------------------------------------------- predictions


def _with_classes(x: list[float], y: list[float], classes: list[int]) -> Detections:
    probs = np.full((len(x), 3), 0.1, np.float32)
    probs[np.arange(len(x)), classes] = 0.8
    n = len(x)
    return Detections(np.asarray(x, float), np.asarray(y, float), np.full(n, 0.9, np.float32),
                      np.full(n, 20.0, np.float32), probs)


def test_predicted_classes_are_read_from_results(tmp_path: Path) -> None:
    write_csv(tmp_path / "a.csv", _with_classes([10.0, 3.5], [20.0, 4.25], [INF, STR]), mpp=0.5)
    write_csv(tmp_path / "plain.csv", Detections(np.array([1.0]), np.array([2.0]), np.array([0.9]), np.array([30.0])), mpp=0.5)

    pred = read_labelled_predictions(tmp_path)

    np.testing.assert_array_equal(pred["a"].xy, [[3.5, 4.25], [10.0, 20.0]])  # rows sorted by y
    assert pred["a"].labels.tolist() == ["stromal", "inflammatory"] and pred["plain"].labels is None
    assert prediction_class_index(pred["a"].labels).tolist() == [STR, INF]
    np.testing.assert_array_equal(read_predictions(tmp_path)["a"], pred["a"].xy)  # unchanged for detection


def test_a_predicted_class_that_is_no_model_class_is_an_error_naming_the_source() -> None:
    labels = np.array(["epithelial", "tumour", None], dtype=object)
    with pytest.raises(ValueError, match=r"^results of 'a': predicted class\(es\) tumour are none of epithelial, "):
        prediction_class_index(labels, "results of 'a'")
    assert prediction_class_index(labels[[0, 2]]).tolist() == [EPI, -1]


# ------------------------------------------------------------------------- data sets and lab images


def test_the_class_data_sets_carry_their_own_labels(shared_data: Path) -> None:
    from wsiproc.learn import datasets

    with open(shared_data / "brca-m2c" / "points.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    held = datasets.domain("brca", shared_data, "held_out")
    names = {im.name for im in held}
    expected = {}
    for r in table:
        if r["image"] in names:
            expected[r["class"]] = expected.get(r["class"], 0) + 1
    labels = np.concatenate([im.labels for im in held])
    assert len(labels) == sum(len(im.points_xy) for im in held) == 8_858  # the authors' test split
    assert {k: int(n) for k, n in zip(*np.unique(labels, return_counts=True))} == expected
    assert set(expected) == {"lymphocyte", "tumor_epithelial", "stromal"}

    consep = datasets.domain("consep", shared_data, "all")
    assert sum(len(im.labels) for im in consep) == 15_555
    assert set(np.concatenate([im.labels for im in consep])) == {"inflammatory", "epithelial", "spindle_other"}
    assert all(im.labels is None for im in datasets.domain("crc", shared_data, "held_out")[:2])


def test_lab_images_carry_the_labels_of_their_annotations(tmp_path: Path) -> None:
    from wsiproc.learn.annotated import Annotations, lab_images

    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "s1.png")
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / "s2.png")
    (tmp_path / "points.csv").write_text("image,x,y,class\ns1,5,5,Tumor\ns1,9,9,\ns2,20,20,TILs\n")

    annotations = Annotations.read(str(tmp_path / "points.csv"))
    s1, s2 = lab_images([tmp_path / "s1.png", tmp_path / "s2.png"], annotations, mpp=0.5)

    assert s1.labels.tolist() == ["Tumor", None] and s2.labels.tolist() == ["TILs"]
    np.testing.assert_array_equal(s1.points_xy, [[5, 5], [9, 9]])


# ------------------------------------------------------------------------------- wsiproc evaluate


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """Results of a model with classes for image `img`: the example's detections shifted to (x, 100)."""
    folder = tmp_path / "results"
    folder.mkdir()
    write_csv(folder / "img.csv", _with_classes(list(PRED_XY[:, 0]), list(PRED_XY[:, 1] + 100), list(PRED_CLASS)), mpp=0.5)
    return folder


def _truth_csv(path: Path, labels: list[str]) -> Path:
    rows = [f"img,{x},{y + 100},{label}" for (x, y), label in zip(TRUE_XY, labels)]
    path.write_text("image,x,y,class\n" + "\n".join(rows) + "\n")
    return path


def _evaluate(*args: str):
    return CliRunner().invoke(main, ["evaluate", "--mpp", "0.5", "--radius-um", "1", *args])  # radius 2 px


def test_evaluate_prints_and_writes_the_class_table(results: Path, tmp_path: Path) -> None:
    # The data sets' names, mapped by the built-in aliases; the unlabelled T4 has an empty class cell.
    truth = _truth_csv(tmp_path / "truth.csv", ["tumor_epithelial", "epithelial", "lymphocyte", "spindle_other", "",
                                                "inflammatory"])

    result = _evaluate("--pred", str(results), "--truth", str(truth), "--out", str(tmp_path / "eval.csv"))

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert next(line for line in lines if line.startswith("img")).split()[1:6] == ["6", "7", "5", "2", "1"]
    assert any(line.startswith("detection F_d 0.769 within 1 µm") for line in lines)
    assert next(line for line in lines if line.startswith("epithelial")).split()[3] == "0.364"
    with open(tmp_path / "eval_class_scores.csv", newline="") as fh:
        rows = {r["class"]: r for r in csv.DictReader(fh)}
    assert rows["inflammatory"]["f_c"] == f"{6 / 11:.6f}" and (tmp_path / "eval.csv").is_file()


CELLCOUNTER = """<?xml version="1.0" encoding="UTF-8"?>
<CellCounter_Marker_File>
  <Image_Properties><Image_Filename>img.tif</Image_Filename></Image_Properties>
  <Marker_Data>
    <Marker_Type><Type>1</Type>
      <Marker><MarkerX>0</MarkerX><MarkerY>100</MarkerY></Marker>
      <Marker><MarkerX>10</MarkerX><MarkerY>100</MarkerY></Marker>
    </Marker_Type>
    <Marker_Type><Type>2</Type>
      <Marker><MarkerX>20</MarkerX><MarkerY>100</MarkerY></Marker>
      <Marker><MarkerX>50</MarkerX><MarkerY>100</MarkerY></Marker>
    </Marker_Type>
    <Marker_Type><Type>3</Type><Name>Fibroblast</Name>
      <Marker><MarkerX>30</MarkerX><MarkerY>100</MarkerY></Marker>
    </Marker_Type>
    <Marker_Type><Type>4</Type><Name>Unsure</Name>
      <Marker><MarkerX>40</MarkerX><MarkerY>100</MarkerY></Marker>
    </Marker_Type>
  </Marker_Data>
</CellCounter_Marker_File>
"""


def test_evaluate_maps_cellcounter_types_with_class_map(results: Path, tmp_path: Path) -> None:
    """The example again, marked in Fiji: counters 1 and 2 unnamed, 3 named after a type, 4 a doubt to ignore."""
    truth = tmp_path / "CellCounter_img.xml"
    truth.write_text(CELLCOUNTER)

    unmapped = _evaluate("--pred", str(results), "--truth", str(truth))
    assert unmapped.exit_code == 0, unmapped.output
    assert " 6 " in next(line for line in unmapped.output.splitlines() if line.startswith("img"))  # detection as ever
    assert unmapped.output.splitlines()[-1] == (
        f"no class table: {truth}: label(s) Type 1, Type 2, Unsure map to no class; say what they are with "
        "--class-map 'NAME=CLASS' (CLASS one of epithelial, inflammatory, stromal or ignore)")

    mapped = _evaluate("--pred", str(results), "--truth", str(truth),
                       "--class-map", "Type 1=epithelial, Type 2=inflammatory,unsure=ignore")
    assert mapped.exit_code == 0, mapped.output
    assert next(line for line in mapped.output.splitlines() if line.startswith("stromal")).split()[3] == "0.545"

    typo = _evaluate("--pred", str(results), "--truth", str(truth), "--class-map", "Type 1=epithelial,Type 2=inflammatory")
    assert typo.exit_code == 2 and typo.output.startswith(f"error: {truth}: label(s) Unsure map to no class")
    assert len(typo.output.splitlines()) == 1 and "n_true" not in typo.output  # refused before any table

    bad = _evaluate("--pred", str(results), "--truth", str(truth), "--class-map", "Type 1=tumour")
    assert bad.exit_code == 2
    assert bad.output.strip() == ("error: --class-map: 'tumour' is not a class (one of epithelial, inflammatory, "
                                  "stromal or ignore)")


def test_evaluate_says_why_there_is_no_class_table(results: Path, tmp_path: Path) -> None:
    plain_truth = tmp_path / "truth.csv"
    plain_truth.write_text("image,x,y\n" + "".join(f"img,{x},{y + 100}\n" for x, y in TRUE_XY))
    no_truth_classes = _evaluate("--pred", str(results), "--truth", str(plain_truth))
    assert no_truth_classes.exit_code == 0, no_truth_classes.output
    assert no_truth_classes.output.splitlines()[-1] == "no class table: the annotations name no classes"
    assert "F_d" not in no_truth_classes.output

    plain = tmp_path / "plain"
    plain.mkdir()
    write_csv(plain / "img.csv", _with_classes(list(PRED_XY[:, 0]), list(PRED_XY[:, 1] + 100), list(PRED_CLASS)).without_classes(), mpp=0.5)
    labelled_truth = _truth_csv(tmp_path / "labelled.csv", ["epithelial"] * 6)
    no_pred_classes = _evaluate("--pred", str(plain), "--truth", str(labelled_truth))
    assert no_pred_classes.exit_code == 0, no_pred_classes.output
    assert no_pred_classes.output.splitlines()[-1].startswith("no class table: the results have no class column")


def test_evaluate_model_without_a_class_head_scores_detection_and_says_so(tmp_path: Path, tiny_model: Path) -> None:
    """`--model` runs the model itself; the dark-pixel model of conftest has no class head."""
    rgb = np.full((64, 64, 3), 230, np.uint8)
    yy, xx = np.mgrid[:64, :64]
    for cx, cy in ((16, 16), (44, 40)):
        rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= 16] = 40  # two dark nuclei
    Image.fromarray(rgb).save(tmp_path / "img.png")
    truth = tmp_path / "points.csv"
    truth.write_text("image,x,y,class\nimg,16,16,lymphocyte\nimg,44,40,stromal\n")

    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model), "--images", str(tmp_path / "img.png"),
                                       "--truth", str(truth), "--mpp", "0.5"])

    assert result.exit_code == 0, result.output
    assert next(line for line in result.output.splitlines() if line.startswith("img")).split()[1] == "2"
    assert result.output.splitlines()[-1] == "no class table: the model tiny.keras has no class head"


def test_evaluate_model_with_classes_scores_inside_the_annotated_region(tmp_path: Path, tiny_model: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """QuPath points in a drawn region, classified with QuPath's classes; the model's detections stand in by hand
    (as in test_class_outputs: no network with a class head is needed to check what is scored)."""
    import json

    import wsiproc.detection.images as detection_images

    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(tmp_path / "img.png")
    region = [[-0.5, -0.5], [39.5, -0.5], [39.5, 63.5], [-0.5, 63.5], [-0.5, -0.5]]
    features = [
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[10, 10], [30, 10]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "MultiPoint", "coordinates": [[20, 50]]},
         "properties": {"objectType": "annotation", "classification": {"name": "Immune cells"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [55, 30]},  # outside the region
         "properties": {"objectType": "annotation", "classification": {"name": "Stroma"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [region]},
         "properties": {"objectType": "annotation"}},
    ]
    (tmp_path / "img.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    found = _with_classes([10, 30, 20, 56, 35], [11, 10, 50, 30, 35], [EPI, INF, INF, EPI, STR])
    monkeypatch.setattr(detection_images, "detections_of_images", lambda images, predictor, cfg: {"img": found})

    result = CliRunner().invoke(main, ["evaluate", "--model", str(tiny_model), "--images", str(tmp_path / "img.png"),
                                       "--truth", str(tmp_path / "img.geojson"), "--mpp", "0.5", "--radius-um", "1"])

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    # Inside: truths epi, epi, inf; detections epi, inf, inf (matched in that order) and one stromal false alarm.
    assert next(line for line in lines if line.startswith("img")).split()[1:6] == ["3", "4", "3", "1", "0"]
    assert any(line.startswith("detection F_d 0.857 ") for line in lines)  # 2·3 / (2·3 + 1 + 0)
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split()[:1] in (["epithelial"], ["inflammatory"], ["stromal"])}
    # F_c: epi 2(1+1)/(4+0+2+1) = 4/7, inf 2(1+1)/(4+2+0+1) = 4/7, str 2(0+3)/(6+1) = 6/7; F1 epi 2/3, inf 2/3, str 0
    assert rows == {"epithelial": ["2", "1", "0.571", "0.667", "1.000", "0.500"],
                    "inflammatory": ["1", "2", "0.571", "0.667", "0.500", "1.000"],
                    "stromal": ["0", "1", "0.857", "0.000", "0.000", "0.000"]}
