"""Build the speed benchmark slide: the sample's real tissue tiled 5 × 4 into one pyramidal tiled JPEG TIFF.

Why: the bundled sample (2 220 × 2 967 px, about 1 mm² of tissue) finishes in seconds and hides what a real
slide costs. Tiled 5 across and 4 down it is 11 100 × 11 868 px at 0.499 µm/px with about 20 mm² of tissue
and glass between the copies, so the tissue border, the tiles with a sliver of tissue and every per-slide
stage (tissue mask, reading, post-processing, outputs) weigh as they do on a whole slide. It is written as
scanners write slides: 256 px JPEG tiles (quality 90), a pyramid halving down to under 1 000 px, the pixel
size in the TIFF resolution tags, one tiled page per level (OpenSlide reads it as a generic tiled TIFF). No data enters the repository.

    python benchmarks/make_benchmark_slide.py --out runs/bench/sample-5x4.tiff [--across 5 --down 4]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

from wsiproc.cli import SAMPLE_SLIDE
from wsiproc.io.files import atomic_path
from wsiproc.io.slide import open_slide

TILE_PX = 256
JPEG_QUALITY = 90


def halve(rgb: np.ndarray) -> np.ndarray:
    """A 2 × 2 box average: the next pyramid level (the last odd row or column is dropped)."""
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    return rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3)).round().astype(np.uint8)


def build(out: Path, across: int = 5, down: int = 4, source: Path = SAMPLE_SLIDE) -> tuple[tuple[int, int], float]:
    """Write the tiled slide to `out`; returns ((height, width) of level 0, µm/px)."""
    with open_slide(source) as slide:
        w, h = slide.dimensions
        tissue = slide.read_level(0, 0, 0, w, h)
        mpp = slide.require_mpp()
    rgb = np.tile(tissue, (down, across, 1))
    levels = [rgb]
    while max(levels[-1].shape[:2]) > 1000:
        levels.append(halve(levels[-1]))
    px_per_cm = 1e4 / mpp
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
            options = dict(tile=(TILE_PX, TILE_PX), photometric="rgb", compression="jpeg",
                           compressionargs={"level": JPEG_QUALITY}, resolutionunit="CENTIMETER")
            for i, level in enumerate(levels):  # one tiled page per level: what OpenSlide's generic TIFF reads
                f = px_per_cm / 2**i
                tif.write(level, subfiletype=1 if i else 0, resolution=(f, f), **options)
    return rgb.shape[:2], mpp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench/sample-5x4.tiff"))
    parser.add_argument("--across", type=int, default=5)
    parser.add_argument("--down", type=int, default=4)
    args = parser.parse_args()
    (h, w), mpp = build(args.out, args.across, args.down)
    print(f"{args.out}: {w} × {h} px at {mpp} µm/px ({args.out.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
