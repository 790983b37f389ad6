"""Pipeline efficiency: `wsiproc run` throughput on tissue pixels ÷ bare-model throughput, same tiles, same run.

    python benchmarks/throughput.py [--slide wsiproc/sample/CMU-1-Small-Region.svs] [--tile-px 512] [--batch-size 4] [--plain]

Bare model: the same compiled forward pass on real tiles already in memory (no reading, no post-processing).
Pipeline: `detect()` on the slide (tissue mask, lazy reads in threads, post-processing, stitching).
Both count megapixels of tile cores at 0.5 µm/px, so halos cost both the same.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from wsiproc.config import RunConfig
from wsiproc.inference import Predictor
from wsiproc.pipeline import detect, plan_tiles
from wsiproc.slide import open_slide
from wsiproc.tiling import SlideSampler, halo_tiles


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default=os.path.join(os.path.dirname(__file__), "..", "wsiproc", "sample", "CMU-1-Small-Region.svs"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--bare-batches", type=int, default=2)
    ap.add_argument("--plain", action="store_true", help="also time the plain Keras model (no head rewrite)")
    args = ap.parse_args()
    cfg = RunConfig(tile_px=args.tile_px, batch_size=args.batch_size)
    predictor = Predictor(args.model)
    slide = open_slide(args.slide)
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    grid, tiles, _, _ = plan_tiles(sampler, cfg)
    blocks = halo_tiles(sampler, grid)
    batch = np.stack([blocks.blocks[r, c].compute() for r, c in tiles[: args.batch_size]])
    core_mp = len(batch) * grid.tile_px**2 / 1e6

    def bare_mps(forward) -> float:
        forward(batch)  # trace and warm up
        t0 = time.perf_counter()
        for _ in range(args.bare_batches):
            forward(batch)
        return args.bare_batches * core_mp / (time.perf_counter() - t0)

    # The bare model is timed before and after the pipeline and averaged, so a change of background load
    # during the run affects both sides of the ratio alike.
    bare_before = bare_mps(predictor)
    t0 = time.perf_counter()
    result = detect(slide, cfg, predictor)
    dt = time.perf_counter() - t0
    bare_after = bare_mps(predictor)
    bare = (bare_before + bare_after) / 2
    plain = None
    if args.plain:
        import tensorflow as tf

        model = predictor.model
        plain = bare_mps(tf.function(lambda x: model(tf.cast(x, tf.float32) / 255.0, training=False)))
    pipe_mps = result.stats["tiles_computed"] * grid.tile_px**2 / 1e6 / dt
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, device {predictor.device}")
    print(f"slide {args.slide}: {result.stats['tiles_computed']}/{result.stats['tiles_total']} tiles of {grid.tile_px}+2×{grid.halo_px} px, "
          f"{len(result.detections)} nuclei, {dt:.1f} s")
    print(f"bare model:  {bare:.4f} MP/s (tile cores at 0.5 µm/px; {bare_before:.4f} before, {bare_after:.4f} after the run)")
    if plain is not None:
        print(f"plain Keras: {plain:.4f} MP/s (the network as Keras runs it, without the sub-pixel head rewrite): "
              f"the rewrite is {bare / plain:.2f}× that")
    print(f"pipeline:    {pipe_mps:.4f} MP/s")
    print(f"efficiency:  {pipe_mps / bare:.3f} (pipeline / bare model)")
    print(f"time split:  predict {result.stats['predict_s']:.1f} s, tissue mask {result.stats['tile_mask_s']:.1f} s, "
          f"rest {dt - result.stats['predict_s'] - result.stats['tile_mask_s']:.1f} s; post-processing "
          f"{result.stats['postprocess_s']:.1f} s ran in threads beside the model")


if __name__ == "__main__":
    main()
