"""Reduced precision on the CPU: throughput and accuracy of the int8 TFLite path against the float32 Keras path.

    python benchmarks/precision.py [--model wsiproc/models/default.keras] [--int8 X.tflite] [--data ../shared/data]
                                   [--tiles 2] [--repeats 3] [--no-float-tflite] [--no-f1]

In one run on one machine:
- throughput in MP/s (pixels of the network's 576 × 576 input, tile core 512 + 2 × 32 px halo, at 0.5 µm/px) of
  (a) float32 Keras/TensorFlow, (b) int8 TFLite, (c) float32 TFLite, on the same real tissue tiles of the sample
  slide, batch 1, repeats interleaved (a b c a b c …) so background load hits every path alike; the median is reported;
- F1 (5 µm, one-to-one Hungarian, micro-averaged: `benchmarks/accuracy.py`'s own scoring) of float32 and int8 on
  the 14 held-out MoNuSeg images.
Without `--int8` the model is quantized here with the default recipe: 48 crops of 128 px at 0.5 µm/px, drawn evenly
from the 16 MoNuSeg *training* images (never the held-out ones that are scored).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import predict_set  # noqa: E402  (same detection as accuracy.py)

from wsiproc import datasets  # noqa: E402
from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.evaluate import evaluate_sets  # noqa: E402
from wsiproc.inference import Predictor  # noqa: E402
from wsiproc.model import DEFAULT_MODEL_PATH  # noqa: E402
from wsiproc.pipeline import plan_tiles  # noqa: E402
from wsiproc.quantize import calibration_crops, convert_float32, quantize_model, write_tflite  # noqa: E402
from wsiproc.slide import open_slide  # noqa: E402
from wsiproc.tiling import SlideSampler, halo_tiles  # noqa: E402

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "wsiproc" / "sample" / "CMU-1-Small-Region.svs"


def tissue_tiles(slide_path: Path, n: int) -> list[np.ndarray]:
    """`n` real tissue tiles with their halo (576 × 576 at 0.5 µm/px), as the pipeline would send them."""
    cfg = RunConfig()
    slide = open_slide(slide_path)
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    grid, tiles, _, _ = plan_tiles(sampler, cfg)
    blocks = halo_tiles(sampler, grid)
    middle = tiles[len(tiles) // 2 - n // 2 :][:n]  # central tiles: tissue throughout, not the glass border
    out = [blocks.blocks[r, c].compute() for r, c in middle]
    slide.close()
    return out


def int8_model(model: Path, data: Path, work: Path) -> Path:
    """Quantize with the default recipe, calibrated on the MoNuSeg training images only."""
    train = datasets.monuseg(data / "monuseg-train", "train")
    crops = calibration_crops([(im.read_rgb(), im.mpp) for im in train])
    t0 = time.perf_counter()
    path = quantize_model(model, crops, work / f"{model.stem}.int8.tflite")
    print(f"quantized {model.name} → {path.name} ({path.stat().st_size / 1e6:.1f} MB) on {len(crops)} crops of "
          f"{crops[0].shape[0]} px from {len(train)} training images in {time.perf_counter() - t0:.0f} s")
    return path


def interleaved_mps(paths: dict[str, Callable[[np.ndarray], np.ndarray]], tiles: list[np.ndarray], repeats: int) -> dict[str, float]:
    """Median MP/s per path over `repeats` rounds; each round runs every path on every tile, one after the other."""
    for fn in paths.values():
        fn(tiles[0][None])  # warm-up: tracing, interpreter allocation
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for tile in tiles:
            for name, fn in paths.items():
                t0 = time.perf_counter()
                fn(tile[None])
                seconds[name].append(time.perf_counter() - t0)
    megapixels = tiles[0].shape[0] * tiles[0].shape[1] / 1e6
    for name, s in seconds.items():
        print(f"  {name:<16} per tile: {', '.join(f'{x:.2f}' for x in s)} s")
    return {name: megapixels / statistics.median(s) for name, s in seconds.items()}


def held_out_f1(predictor: Predictor, data: Path) -> tuple[float, float, float, float]:
    """(precision, recall, F1, seconds) on the 14 held-out MoNuSeg images, scored as benchmarks/accuracy.py does."""
    held = datasets.monuseg(data / "monuseg-train", "held_out")
    t0 = time.perf_counter()
    pred = predict_set(held, predictor, RunConfig(tissue_mask=False))
    dt = time.perf_counter() - t0
    _, total = evaluate_sets(pred, {im.name: im.points_xy for im in held}, {im.name: 5.0 / im.mpp for im in held})
    return total.precision, total.recall, total.f1, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="the float32 .keras model")
    ap.add_argument("--int8", type=Path, default=None, help="an int8 .tflite of it (default: quantized here)")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--tiles", type=int, default=2, help="distinct 576 × 576 tiles timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-float-tflite", action="store_true", help="skip (c), float32 TFLite")
    ap.add_argument("--no-f1", action="store_true", help="throughput only")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        int8_path = args.int8 or int8_model(args.model, args.data, work)
        predictors = {"float32 Keras/TF": Predictor(args.model), "int8 TFLite": Predictor(int8_path)}
        if not args.no_float_tflite:
            f32 = write_tflite(convert_float32(args.model), work / f"{args.model.stem}.float32.tflite", args.model)
            predictors["float32 TFLite"] = Predictor(f32)
        tiles = tissue_tiles(SAMPLE_SLIDE, args.tiles)
        print(f"throughput: {len(tiles)} tissue tiles of {tiles[0].shape[0]} × {tiles[0].shape[1]} px from {SAMPLE_SLIDE.name}, "
              f"batch 1, {args.repeats} interleaved rounds")
        mps = interleaved_mps(predictors, tiles, args.repeats)
        for name, value in mps.items():
            print(f"  {name:<16} {value:.4f} MP/s (median)")
        ratio = mps["int8 TFLite"] / mps["float32 Keras/TF"]
        print(f"  int8 / float32 Keras: {ratio:.2f}×")
        if not args.no_f1:
            print("held-out MoNuSeg (14 images), 5 µm, Hungarian, micro-averaged:")
            f1 = {}
            for name in ("float32 Keras/TF", "int8 TFLite"):
                p, r, f1[name], dt = held_out_f1(predictors[name], args.data)
                print(f"  {name:<16} precision {p:.4f}  recall {r:.4f}  F1 {f1[name]:.4f}  ({dt:.0f} s)")
            loss = f1["float32 Keras/TF"] - f1["int8 TFLite"]
            print(f"  F1 loss int8 vs float32: {loss:+.4f}")
            verdict = "meets" if ratio >= 2 and loss <= 0.005 else "does not meet"
            print(f"verdict: int8 {verdict} the bar (≥ 2× throughput and ≤ 0.005 F1 loss): {ratio:.2f}×, {loss:+.4f} F1")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
