"""GeoJSON at scale: time to write N nuclei as a QuPath FeatureCollection (streamed), plain and gzipped.

    python benchmarks/geojson_scale.py [--n 1000000]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from wsiproc.detection.detections import Detections
from wsiproc.outputs.formats import write_csv, write_geojson


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    det = Detections(rng.uniform(0, 100_000, args.n), rng.uniform(0, 80_000, args.n),
                     rng.uniform(0.5, 1, args.n).astype(np.float32), rng.uniform(5, 80, args.n).astype(np.float32))
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [("geojson", lambda p: write_geojson(p / "a.geojson", det, 0.25)),
                         ("geojson.gz", lambda p: write_geojson(p / "a.geojson.gz", det, 0.25, gzip=True)),
                         ("csv", lambda p: write_csv(p / "a.csv", det, 0.25))]:
            t0 = time.perf_counter()
            path = fn(Path(tmp))
            dt = time.perf_counter() - t0
            print(f"{name:>10}: {args.n} nuclei in {dt:.2f} s ({args.n / dt / 1e6:.2f} M/s), {Path(path).stat().st_size / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
