"""A model's calibration reference: the colours and confidences of its training domains (`wsiproc.learn.calibrate`).

    python benchmarks/reference_stats.py --model default --domains monuseg,crc,brca,consep
    python benchmarks/reference_stats.py --model runs/loo/colorectal/model.keras --domains monuseg,brca

Writes `<model>.reference.json` beside the model (for a shipped name, into `wsiproc/models/`), which `wsiproc adapt`
reads to align a cohort's colours and re-calibrate its confidences. Uses every training image of each domain
(their 'train' split; labels unused) through the product's tiling, with the engine a run would use.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a shipped model name or a .keras path")
    ap.add_argument("--domains", required=True, help="the model's training domains, comma-separated")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--precision", default="auto")
    args = ap.parse_args()
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import resolve_model_path
    from wsiproc.learn.adapt import measure_reference
    from wsiproc.learn.calibrate import Reference

    model_path = resolve_model_path(args.model)
    predictor = Predictor(model_path, engine=args.engine, precision=args.precision)
    domains = {}
    for name in args.domains.split(","):
        images = datasets.domain(name, args.data, "train")
        domains[name] = ([im.path for im in images], images[0].mpp)
    reference = measure_reference(domains, predictor, RunConfig(tissue_mask=False, engine=args.engine, precision=args.precision))
    reference.source = f"{model_path.name}: training splits of {args.domains}"
    out = reference.save(Reference.beside(model_path))
    print(f"{out}: colour mean {[round(v, 3) for v in reference.mean_rgb]}, confident shares {reference.confident_share}")


if __name__ == "__main__":
    main()
