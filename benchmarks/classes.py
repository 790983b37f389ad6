"""Nucleus types on held-out images, with HoVer-Net's protocol: what the model card's and README's class tables say.

    python benchmarks/classes.py                          # shipped default (its class head), float32 and int8
    python benchmarks/classes.py --model runs/x.keras --int8 runs/x.int8.xml --read-radius 0,2 --timing

Images: BRCA-M2C's test split (30 images; the authors' split) and CoNSeP train's fixed held-out images (6, every
fourth; `wsiproc.learn.datasets`), neither seen by the class head. Each model runs through the same `detect` as
`wsiproc run` (OpenVINO). Scoring (Graham et al. 2019, HoVer-Net): one-to-one matching within 3 µm; F_d for
detection; per class F_c = 2(TP_c + TN_c) / (2(TP_c + TN_c) + 2FP_c + 2FN_c + FP_d + FN_d) over matched pairs,
and the plain per-class F1 after the same matching. Reference rows: the majority class (every nucleus of the same
detections given the class most frequent in the head's training labels) and HoVer-Net's own CoNSeP-test figures
(Table V of its paper: trained and tested on CoNSeP). `--read-radius` compares reading the class map at the
centroid's pixel (0) with averaging it over a disk. `--timing` measures the model alone with and without the
class head (same engine, same tiles).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.architectures import cpu_name  # noqa: E402
from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.detection import classes as class_module  # noqa: E402
from wsiproc.detection.classes import CLASSES, ClassMap  # noqa: E402
from wsiproc.detection.inference import Predictor  # noqa: E402
from wsiproc.detection.model import DEFAULT_MODEL_PATH  # noqa: E402
from wsiproc.detection.images import detections_of_images  # noqa: E402
from wsiproc.evaluate.scoring import ClassScore, evaluate_class_sets  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402

RADIUS_UM = 3.0
DOMAINS = ("brca", "consep")
#: HoVer-Net on CoNSeP test, trained on CoNSeP (Graham et al. 2019, Table V): F_d and F_c per class.
HOVERNET_CONSEP = {"f_d": 0.748, "epithelial": 0.635, "inflammatory": 0.631, "stromal": 0.566}
#: Class counts of the head's training labels (BRCA-M2C train + val, CoNSeP train without its held-out images).
MAJORITY_CLASS = "epithelial"


def truth_of(images) -> dict:
    cmap = ClassMap()
    return {im.name: (im.points_xy, cmap.indices(im.labels, im.name)) for im in images}


def score(dets: dict, images, constant: int | None = None) -> ClassScore:
    pred = {}
    for name, det in dets.items():
        cls = (np.full(len(det), constant, np.int64) if constant is not None
               else np.argmax(det.class_probs, axis=1) if det.class_probs is not None else np.full(len(det), -1))
        pred[name] = (det.xy, cls)
    radius = {im.name: RADIUS_UM / im.mpp for im in images}
    return evaluate_class_sets(pred, truth_of(images), radius)[1]


def row(label: str, s: ClassScore | dict, with_classes: bool = True) -> str:
    if isinstance(s, dict):
        return f"| {label} | {s['f_d']:.3f} | " + " | ".join(f"{s[c]:.3f}" for c in CLASSES) + " | – | – | – |"
    fc = " | ".join(f"{s.f_c(c):.3f}" if with_classes else "–" for c in CLASSES)
    f1 = " | ".join(f"{s.f1(c):.3f}" if with_classes else "–" for c in CLASSES)
    return f"| {label} | {s.f_d:.3f} | {fc} | {f1} |"


def header() -> str:
    cols = ["model", "F_d", *(f"F_c {c}" for c in CLASSES), *(f"F1 {c}" for c in CLASSES)]
    return "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)


def timing(model: Path, base: Path | None, precision: str, reps: int = 5) -> str:
    """Seconds per batch of 4 tiles of 576² (a run's default tile and halo) with and without the class head."""
    from PIL import Image

    rgb = np.asarray(Image.open(Path("../shared/data/consep-train/images/train_1.png")).convert("RGB"))
    tile = np.pad(rgb, ((38, 38), (38, 38), (0, 0)), mode="reflect")[:576, :576]
    x = np.stack([tile, tile[::-1], tile[:, ::-1], tile[::-1, ::-1]])
    lines = []
    times = {}
    for label, path in (("detector alone", base), ("with class head", model)):
        if path is None:
            continue
        p = Predictor(path, precision=precision, engine="openvino")
        p.maps(x)
        best = min(_timed(lambda: p.maps(x)) for _ in range(reps))
        times[label] = best
        lines.append(f"{label}: {best:.3f} s per 4 × 576² ({4 * 576 * 576 / best / 1e6:.2f} MP/s), {p.precision}")
    if len(times) == 2:
        lines.append(f"class head costs {times['with class head'] / times['detector alone'] - 1:+.1%} model time")
    return "\n".join(lines)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="a .keras model with a class head")
    ap.add_argument("--int8", type=Path, help="its int8 IR (default: the one beside --model, if any)")
    ap.add_argument("--base", type=Path, help="the detector without a class head, for the timing (and a reference row)")
    ap.add_argument("--base-int8", type=Path, help="its int8 IR, for the timing")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--read-radius", default=str(class_module.CLASS_READ_RADIUS_PX), help="comma-separated disk radii (model px) to read classes over")
    ap.add_argument("--timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="only the model-time comparison")
    args = ap.parse_args()
    print(f"machine: {cpu_name()}\nmodel: {args.model}\n")
    int8 = args.int8 or (args.model.with_suffix(".int8.xml") if args.model.with_suffix(".int8.xml").is_file() else None)
    predictors = {"float32": Predictor(args.model, precision="float32", engine="openvino")}
    if int8 is not None:
        predictors["int8"] = Predictor(int8, engine="openvino")
    radii = [float(r) for r in args.read_radius.split(",")]
    cfg = RunConfig(tissue_mask=False)
    for dom in DOMAINS if not args.timing_only else ():
        images = datasets.domain(dom, args.data, "held_out")
        n = sum(len(im.points_xy) for im in images)
        print(f"### {dom} held-out ({len(images)} images, {n} nuclei), radius {RADIUS_UM:g} µm\n\n{header()}")
        base_dets = None
        for label, pred in predictors.items():
            for r in radii if label == "float32" else [class_module.CLASS_READ_RADIUS_PX]:
                class_module.CLASS_READ_RADIUS_PX = r  # read by the loop at call time
                import wsiproc.detection.loop as loop

                loop.CLASS_READ_RADIUS_PX = r
                t0 = time.perf_counter()
                dets = detections_of_images(images, pred, cfg)
                s = score(dets, images)
                print(row(f"class head, {label}" + (f", read over {r:g} px" if len(radii) > 1 and label == "float32" else ""), s)
                      + f" <!-- {time.perf_counter() - t0:.0f} s -->")
                if base_dets is None:
                    base_dets = dets
            class_module.CLASS_READ_RADIUS_PX = loop.CLASS_READ_RADIUS_PX = radii[0]
        print(row(f"majority class ({MAJORITY_CLASS}), same detections", score(base_dets, images, CLASSES.index(MAJORITY_CLASS))))
        if args.base is not None:
            base = Predictor(args.base, precision="float32", engine="openvino")
            print(row("detector without class head, float32", score(detections_of_images(images, base, cfg), images), False))
        if dom == "consep":
            print(row("HoVer-Net, CoNSeP test (its paper, Table V)", HOVERNET_CONSEP))
        print()
    if args.timing or args.timing_only:
        print(f"model time, OpenVINO float32:\n{timing(args.model, args.base, 'float32')}\n")
        if int8 is not None and args.base_int8 is not None:
            print(f"model time, OpenVINO int8:\n{timing(int8, args.base_int8, 'auto')}")


if __name__ == "__main__":
    main()
