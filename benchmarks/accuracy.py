"""Accuracy of a model on the annotated sets: MoNuSeg held-out (split fixed in wsiproc.datasets) and crc-dev.

    python benchmarks/accuracy.py [--model wsiproc/models/default.keras] [--data ../shared/data] [--sets monuseg,crc]

Scores with the project's rule (one-to-one Hungarian matching within 5 µm, micro-averaged F1), and for
MoNuSeg also with the paper's mask rule (a detection inside an unmatched nucleus mask is a hit).
Prints per-image tables and one summary line per set; `--csv DIR` also writes the tables.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from wsiproc import datasets
from wsiproc.annotations import read_label_map
from wsiproc.config import RunConfig
from wsiproc.evaluate import evaluate_sets, format_table, write_scores_csv
from wsiproc.inference import Predictor
from wsiproc.pipeline import detect
from wsiproc.slide import open_slide


def predict_set(images: list[datasets.AnnotatedImage], predictor: Predictor, cfg: RunConfig) -> dict:
    out = {}
    for im in images:
        slide = open_slide(im.path, mpp=im.mpp)
        out[im.name] = detect(slide, cfg, predictor).detections.xy
        slide.close()
    return out


def score(name: str, images, pred, radius_um: float, csv_dir: Path | None, masks: bool = False) -> float:
    truth = {im.name: im.points_xy for im in images}
    radius = {im.name: radius_um / im.mpp for im in images}
    label_maps = {im.name: read_label_map(im.label_path) for im in images if im.label_path} if masks else None
    per_image, total = evaluate_sets(pred, truth, radius, label_maps=label_maps)
    print(f"\n## {name}\n{format_table(per_image, total)}")
    if csv_dir:
        write_scores_csv(csv_dir / f"{name.replace(' ', '_')}.csv", per_image, total)
    return total.f1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a .keras model (default: the shipped one)")
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--sets", default="monuseg,crc")
    ap.add_argument("--radius-um", type=float, default=5.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--csv", type=Path, default=None, help="folder for per-image score tables")
    args = ap.parse_args()
    if args.csv:
        args.csv.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(args.model)
    cfg = RunConfig(tissue_mask=False, threshold=args.threshold)  # annotated crops are tissue throughout
    data = Path(args.data)
    summary = []
    if "monuseg" in args.sets:
        held = datasets.monuseg(data / "monuseg-train", "held_out")
        t0 = time.perf_counter()
        pred = predict_set(held, predictor, cfg)
        dt = time.perf_counter() - t0
        f1 = score("MoNuSeg held-out (14 images)", held, pred, args.radius_um, args.csv)
        f1_mask = score("MoNuSeg held-out, mask rule", held, pred, args.radius_um, args.csv, masks=True)
        summary.append(f"MoNuSeg held-out: F1 {f1:.3f} (5 µm points), {f1_mask:.3f} (mask rule); {dt:.0f} s")
    if "crc" in args.sets:
        crc = datasets.crc_dev(data / "crc-dev")
        t0 = time.perf_counter()
        pred = predict_set(crc, predictor, cfg)
        dt = time.perf_counter() - t0
        f1 = score("crc-dev (50 images)", crc, pred, args.radius_um, args.csv)
        summary.append(f"crc-dev: F1 {f1:.3f}; {dt:.0f} s")
    print(f"\nmodel {predictor.model_path} (sha256 {predictor.sha256[:12]}…), threshold {args.threshold}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
