"""Peak memory of `wsiproc adapt` when the cohort doubles: mining streams slide by slide into the zarr block store.

    python benchmarks/adapt_memory.py [--data ../shared/data/crc-dev/images] [--n 10] [--model wsiproc/models/default.keras]

Runs `wsiproc adapt` (real model, one short fine-tuning epoch) in a child process on the first N crc-dev images,
then on the first 2N, sampling the resident memory of the process and its children every 0.2 s, and prints both
peaks, the blocks stored and the ratio. Memory that grew with the cohort would show as a ratio well above 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from memory import peak_rss  # benchmarks/memory.py: same sampling for every memory figure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data/crc-dev/images"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--mpp", type=float, default=0.55)
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    images = sorted(args.data.glob("*.png"), key=lambda p: int("".join(c for c in p.stem if c.isdigit()) or 0))
    if len(images) < 2 * args.n:
        sys.exit(f"{args.data}: need {2 * args.n} images, found {len(images)}")
    peaks = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.n, 2 * args.n):
            out = Path(tmp) / f"adapted_{n}.keras"
            cmd = [sys.executable, "-m", "wsiproc.cli", "adapt", *map(str, images[:n]), "--mpp", str(args.mpp),
                   "--out", str(out), "--work", str(Path(tmp) / f"work_{n}"), "--epochs", "1", "--steps-per-epoch", "2"]
            if args.model:
                cmd += ["--model", args.model]
            peak, seconds, rc = peak_rss(cmd)
            provenance = out.with_suffix(".json")
            blocks = json.loads(provenance.read_text()).get("blocks") if provenance.is_file() else None
            peaks.append(peak)
            print(f"cohort of {n} slides: peak RSS {peak:.2f} GiB, {blocks} blocks stored, {seconds:.0f} s, exit {rc}", flush=True)
    print(f"peak RSS ratio, doubled cohort / cohort: {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
