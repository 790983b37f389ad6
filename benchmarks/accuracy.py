"""Per-domain held-out accuracy of models, through the product's own detection pipeline.

    python benchmarks/accuracy.py                                   # shipped default, lean and unet + references
    python benchmarks/accuracy.py --models default,runs/x/model.keras --no-reference --csv benchmarks/results/accuracy

Domains and their held-out splits are fixed in `wsiproc.learn.datasets` (MoNuSeg 14, crc-dev every fifth, BRCA-M2C
test, CoNSeP every fourth). Scoring: one-to-one Hungarian matching within 5 µm, counts summed over a set's
images (micro-average). Each model runs with its run defaults (`RunConfig`: peaks post-processing, threshold
0.5) unless --postprocess/--threshold say otherwise. Reference rows: the model shipped before the four-domain
training (`--old-model`, paper's rule) and a classical detector (haematoxylin from colour deconvolution,
smoothed, local maxima over Otsu's threshold), so every table says what "better" is measured against.
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
from wsiproc.evaluate.scoring import Score, detect_images, evaluate_sets, format_table, write_scores_csv  # noqa: E402


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


def evaluate_model(label: str, predictor, cfg: RunConfig, data: Path, domains: list[str], radius_um: float,
                   csv_dir: Path | None, verbose: bool) -> dict[str, Score]:
    rows = {}
    for dom in domains:
        images = datasets.domain(dom, data, "held_out")
        t0 = time.perf_counter()
        pred = detect_images(images, predictor, cfg) if predictor is not None else {
            im.name: classical_detector(im.read_rgb(), im.mpp) for im in images}
        per_image, total = score_domain(images, pred, radius_um)
        rows[dom] = total
        if verbose:
            print(f"\n## {label}: {dom} held-out ({len(images)} images, {time.perf_counter() - t0:.0f} s)\n{format_table(per_image, total)}")
        if csv_dir:
            write_scores_csv(csv_dir / f"{label.replace(' ', '_').replace('/', '_')}_{dom}.csv", per_image, total)
    return rows


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
    runs = [(name, resolve_model_path(name), cfg) for name in args.models.split(",")]
    if args.old_model:
        runs.append(("before (paper rule)", Path(args.old_model), RunConfig(tissue_mask=False, threshold=0.5, postprocess="components")))
    for label, path, run_cfg in runs:
        t0 = time.perf_counter()
        predictor = Predictor(path, engine=args.engine, precision=args.precision)
        results[label] = evaluate_model(label, predictor, run_cfg, args.data, domains, args.radius_um, args.csv, args.verbose)
        print(f"{label}: {path} (sha256 {predictor.sha256[:12]}), {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.no_reference:
        results["classical (deconvolution)"] = evaluate_model("classical", None, cfg, args.data, domains, args.radius_um, args.csv, args.verbose)
    print(f"\nHeld-out F1 (5 µm, micro-average); postprocess {args.postprocess}, threshold {args.threshold}\n")
    print(format_domain_table(results))


if __name__ == "__main__":
    main()
