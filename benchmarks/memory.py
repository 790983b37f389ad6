"""Peak memory of `wsiproc run` against slide size, on generated pyramidal tiled TIFFs made of real H&E.

    python benchmarks/memory.py --sizes 20000,40000,80000 [--real-model]

Each slide is `size × size` px at 0.25 µm/px (JPEG tiles of 512 px, a 2× pyramid), tiled from the bundled
sample slide's tissue. The run happens in a child process whose resident memory (with its children) is
sampled every 0.2 s. By default the child runs a one-convolution Keras model of the same input/output
contract: the network's own memory is constant per tile, so this measures what grows with the slide
(reading, tissue mask, tile graph, detections, writers) in minutes instead of hours of CPU inference;
`--real-model` uses the shipped network.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SAMPLE = Path(__file__).resolve().parents[1] / "wsiproc" / "sample" / "CMU-1-Small-Region.svs"


def make_slide(path: Path, size: int) -> None:
    import tifffile

    from wsiproc.io.slide import open_slide

    sample = open_slide(SAMPLE)
    w, h = sample.dimensions
    patch = sample.read_level(0, 0, 0, w, h)[:2048, :2048]  # real H&E texture

    def tiles(level_size: int, step: int):
        for y in range(0, level_size, 512):
            for x in range(0, level_size, 512):
                sy, sx = (y * step) % (2048 - 512), (x * step) % (2048 - 512)
                yield np.ascontiguousarray(patch[sy : sy + 512, sx : sx + 512])

    levels = [size]
    while levels[-1] > 2048:
        levels.append(levels[-1] // 2)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i, s in enumerate(levels):
            tif.write(tiles(s, 2**i), shape=(s, s, 3), dtype=np.uint8, tile=(512, 512), compression="jpeg",
                      photometric="rgb", subfiletype=1 if i else 0, resolution=(1e4 / 0.25 / 2**i, 1e4 / 0.25 / 2**i),
                      resolutionunit="CENTIMETER", description=f"wsiproc memory benchmark level {i}")


def tiny_model(path: Path) -> None:
    import keras

    from wsiproc.detection.model import save_model

    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")(inputs)
    save_model(keras.Model(inputs, outputs), path)


def peak_rss(cmd: list[str]) -> tuple[float, float, int]:
    import psutil

    t0 = time.perf_counter()
    proc = psutil.Popen(cmd)
    peak = 0
    while proc.poll() is None:
        try:
            rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.2)
    return peak / 2**30, time.perf_counter() - t0, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,20000")
    ap.add_argument("--real-model", action="store_true")
    ap.add_argument("--tile-px", type=int, default=1024)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = []
        if not args.real_model:
            tiny_model(tmp / "tiny.keras")
            model = ["--model", str(tmp / "tiny.keras")]
        for size in map(int, args.sizes.split(",")):
            slide = tmp / f"slide_{size}.tif"
            t0 = time.perf_counter()
            make_slide(slide, size)
            made = time.perf_counter() - t0
            cmd = [sys.executable, "-m", "wsiproc.cli", "run", str(slide), "--out", str(tmp / "out"), "--quiet", "--no-resume",
                   "--tile-px", str(args.tile_px), *model]
            peak, dt, rc = peak_rss(cmd)
            record = tmp / "out" / f"slide_{size}.json"
            nuclei = json.loads(record.read_text())["nuclei"] if rc == 0 and record.is_file() else None
            print(f"{size}×{size} px at 0.25 µm/px ({size * 0.25 / 1e3:.1f}×{size * 0.25 / 1e3:.1f} mm, "
                  f"{slide.stat().st_size / 2**20:.0f} MiB file, made in {made:.0f} s): peak RSS {peak:.2f} GiB, "
                  f"{dt:.0f} s, {nuclei} nuclei written, exit {rc}", flush=True)
            slide.unlink()


if __name__ == "__main__":
    main()
