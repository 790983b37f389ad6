"""Per-domain held-out accuracy of models, through the product's own detection pipeline.

    python benchmarks/accuracy.py                                   # shipped default, lean and unet + references
    python benchmarks/accuracy.py --models default,runs/x/model.keras --no-reference --csv benchmarks/results/accuracy

Domains and their held-out splits are fixed in `wsiproc.learn.datasets` (MoNuSeg 14, crc-dev every fifth, BRCA-M2C
test, CoNSeP every fourth). Scoring: one-to-one Hungarian matching within 5 µm, counts summed over a set's
images (micro-average). Each model runs with its run defaults (`RunConfig`: peaks post-processing, threshold
0.5) unless --postprocess/--threshold say otherwise. Reference rows: the model shipped before the four-domain
training (`--old-model`, paper's rule) and a classical detector (haematoxylin from colour deconvolution,
smoothed, local maxima over Otsu's threshold), so every table says what "better" is measured against.

Nucleus types: where a model has a class head and a domain labels its points (brca, consep), a class table
follows, scored as HoVer-Net does (within 3 µm: F_d, F_c per class) with each class' plain F1 beside it; the
data sets' names are mapped onto the model's classes by `wsiproc.detection.classes.ClassMap`. The 5 µm
detection scores above are unchanged by it. The full class comparison is benchmarks/classes.py.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsiproc.learn import datasets  # noqa: E402
from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.detection.classes import ClassMap  # noqa: E402
from wsiproc.detection.images import detections_of_images  # noqa: E402
from wsiproc.evaluate.scoring import (  # noqa: E402
    ClassScore, Score, evaluate_class_sets, evaluate_sets, format_class_table, format_table,
    write_class_scores_csv, write_scores_csv,
)

#: HoVer-Net's class-scoring radius: 12 px at 0.25 µm/px (Graham et al. 2019).
CLASS_RADIUS_UM = 3.0


def classical_detector(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Reference: haematoxylin optical density (Ruifrok–Johnston deconvolution), Gaussian of 1 µm, local maxima
    at least 3 µm apart over Otsu's threshold: what a pipeline without a network finds."""
    from scipy import ndimage
    from skimage.color import rgb2hed
    from skimage.feature import peak_local_max
    from skimage.filters import threshold_otsu

    h = ndimage.gaussian_filter(rgb2hed(rgb)[..., 0], 1.0 / mpp)
    peaks = peak_local_max(h, min_distance=max(1, int(round(3.0 / mpp))), threshold_abs=threshold_otsu(h))
    return peaks[:, ::-1].astype(np.float64)


def score_domain(images, pred, radius_um: float) -> tuple[dict, Score]:
    truth = {im.name: im.points_xy for im in images}
    radius = {im.name: radius_um / im.mpp for im in images}
    return evaluate_sets(pred, truth, radius)


def score_domain_classes(images, detections: dict, radius_um: float = CLASS_RADIUS_UM) -> ClassScore | None:
    """The class score of a domain's held-out images, or None where the model or the domain has no classes."""
    if any(im.labels is None for im in images) or any(d.class_probs is None for d in detections.values()):
        return None
    class_map = ClassMap()
    truth = {im.name: (im.points_xy, class_map.indices(im.labels, im.name)) for im in images}
    pred = {name: (d.xy, np.argmax(d.class_probs, axis=1) if len(d) else np.zeros(0, np.int64))
            for name, d in detections.items()}
    return evaluate_class_sets(pred, truth, {im.name: radius_um / im.mpp for im in images})[1]


def evaluate_model(label: str, predictor, cfg: RunConfig, data: Path, domains: list[str], radius_um: float,
                   csv_dir: Path | None, verbose: bool) -> dict[str, Score]:
    """Each domain's held-out detection score (what adaptation.py and architectures.py tabulate)."""
    return evaluate_model_with_classes(label, predictor, cfg, data, domains, radius_um, csv_dir, verbose)[0]


def evaluate_model_with_classes(label: str, predictor, cfg: RunConfig, data: Path, domains: list[str], radius_um: float,
                                csv_dir: Path | None, verbose: bool) -> tuple[dict[str, Score], dict[str, ClassScore]]:
    """Each domain's held-out detection score and, where there are classes on both sides, its class score."""
    rows, class_rows = {}, {}
    file_label = label.replace(' ', '_').replace('/', '_')
    for dom in domains:
        images = datasets.domain(dom, data, "held_out")
        t0 = time.perf_counter()
        found = detections_of_images(images, predictor, cfg) if predictor is not None else {}
        pred = {name: d.xy for name, d in found.items()} if predictor is not None else {
            im.name: classical_detector(im.read_rgb(), im.mpp) for im in images}
        per_image, total = score_domain(images, pred, radius_um)
        rows[dom] = total
        if verbose:
            print(f"\n## {label}: {dom} held-out ({len(images)} images, {time.perf_counter() - t0:.0f} s)\n{format_table(per_image, total)}")
        if csv_dir:
            write_scores_csv(csv_dir / f"{file_label}_{dom}.csv", per_image, total)
        classes = score_domain_classes(images, found) if found else None
        if classes is not None:
            class_rows[dom] = classes
            if csv_dir:
                write_class_scores_csv(csv_dir / f"{file_label}_{dom}_class_scores.csv", classes)
    return rows, class_rows


def score_cell(score: Score) -> str:
    """One table cell: precision / recall / **F1**."""
    return f"{score.precision:.3f} / {score.recall:.3f} / **{score.f1:.3f}**"


def format_domain_table(results: dict[str, dict[str, Score]]) -> str:
    domains = list(next(iter(results.values())))
    head = "| model | " + " | ".join(f"{d} P / R / F1" for d in domains) + " | mean F1 |"
    lines = [head, "|" + "---|" * (len(domains) + 2)]
    for label, row in results.items():
        cells = " | ".join(score_cell(s) for s in row.values())
        lines.append(f"| {label} | {cells} | {np.mean([s.f1 for s in row.values()]):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="default,lean,unet", help="shipped names or .keras paths, comma-separated")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--domains", default=",".join(datasets.DOMAINS))
    ap.add_argument("--radius-um", type=float, default=5.0)
    ap.add_argument("--threshold", type=float, default=RunConfig.threshold)
    ap.add_argument("--postprocess", default=RunConfig.postprocess)
    ap.add_argument("--engine", default="tensorflow", help="engine for every model (accuracy is the model's, not the engine's)")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--old-model", default=None, help="the model shipped before, scored with the paper's rule (reference row)")
    ap.add_argument("--no-reference", action="store_true", help="skip the classical detector row")
    ap.add_argument("--csv", type=Path, default=None, help="folder for per-image score tables")
    ap.add_argument("--verbose", action="store_true", help="per-image tables")
    args = ap.parse_args()
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import resolve_model_path

    if args.csv:
        args.csv.mkdir(parents=True, exist_ok=True)
    domains = args.domains.split(",")
    cfg = RunConfig(tissue_mask=False, threshold=args.threshold, postprocess=args.postprocess)  # crops are tissue throughout
    results: dict[str, dict[str, Score]] = {}
    class_results: dict[str, dict[str, ClassScore]] = {}
    runs = [(name, resolve_model_path(name), cfg) for name in args.models.split(",")]
    if args.old_model:
        runs.append(("before (paper rule)", Path(args.old_model), RunConfig(tissue_mask=False, threshold=0.5, postprocess="components")))
    for label, path, run_cfg in runs:
        t0 = time.perf_counter()
        predictor = Predictor(path, engine=args.engine, precision=args.precision)
        results[label], class_results[label] = evaluate_model_with_classes(label, predictor, run_cfg, args.data, domains,
                                                                           args.radius_um, args.csv, args.verbose)
        print(f"{label}: {path} (sha256 {predictor.sha256[:12]}), {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_reference:
        results["classical (deconvolution)"] = evaluate_model("classical", None, cfg, args.data, domains, args.radius_um,
                                                              args.csv, args.verbose)
    print(f"\nHeld-out F1 ({args.radius_um:g} µm, micro-average); postprocess {args.postprocess}, threshold {args.threshold}\n")
    print(format_domain_table(results))
    for label, per_domain in class_results.items():
        for dom, score in per_domain.items():
            print(f"\n## {label}: {dom} held-out nucleus types (HoVer-Net's protocol, {CLASS_RADIUS_UM:g} µm)\n"
                  f"{format_class_table(score, CLASS_RADIUS_UM)}")


if __name__ == "__main__":
    main()
