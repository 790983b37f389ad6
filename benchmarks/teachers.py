"""Is there a teacher better than the student? Held-out F1 of candidate teachers for adaptation (issue 26).

    # leave-one-out: networks trained without the colorectal sets (benchmarks/train_domains.py --domains monuseg,brca)
    python benchmarks/teachers.py --models runs/loo26/crc-unet/model.keras,runs/loo26/crc-lean/model.keras \
        --domains crc,consep --out benchmarks/results/teachers/crc_loo.md
    # the shipped networks on every domain
    python benchmarks/teachers.py --models default,lean,unet

Rows: each network as is, each under the consistency recipe's four test-time views (as is, two flips, a half
turn; maps averaged), and the ensemble of every network under every view (the mean of all maps). Every row is
scored as a run scores (peaks at each `--thresholds` value, 0.5 by default, 5 µm one-to-one matching, micro-average) on each domain's held-out part.
A teacher pays only where its row beats the student's (the first network) on a domain the student never saw:
that is the head-room that distilling it into the student can win, before any adaptation is built on it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import evaluate_model, format_domain_table  # noqa: E402

from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.detection.inference import Predictor  # noqa: E402
from wsiproc.detection.model import resolve_model_path, size_multiple  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.adapt.views import VIEWS, predict_views  # noqa: E402


class Ensemble:
    """The mean confidence map of several networks, each under the first `views` test-time views.

    It tiles like its most demanding member: the largest halo and the least common multiple of the input
    multiples, so every member sees a tile it can take and the halo covers every member's reach.
    """

    def __init__(self, members: list[Predictor], views: int):
        self.members, self.views = members, views
        widest = max(members, key=lambda p: p.geometry.get("halo_px", 0))
        multiple = math.lcm(*(size_multiple(p.geometry) for p in members))
        self.geometry = {**widest.geometry, "size_multiple_px": multiple}
        self.model_path, self.requested = widest.model_path, widest.requested

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return np.mean([predict_views(p, tiles, self.views).mean(axis=0) for p in self.members], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated shipped names or .keras paths; the first is the student")
    ap.add_argument("--domains", default=",".join(datasets.DOMAINS))
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--engine", default="tensorflow")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--thresholds", default="0.5", help="comma-separated detection thresholds, each a row per candidate "
                    "(a teacher is judged at its best threshold too: calibration already moves the student's)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table")
    args = ap.parse_args()
    paths = [resolve_model_path(m) for m in args.models.split(",")]
    members = [Predictor(p, engine=args.engine, precision=args.precision) for p in paths]
    names = [p.parent.name if p.name == "model.keras" else p.stem for p in paths]
    domains = args.domains.split(",")
    candidates: list[tuple[str, object]] = []
    for name, member in zip(names, members):
        candidates += [(name, member), (f"{name}, {len(VIEWS)} views", Ensemble([member], len(VIEWS)))]
    if len(members) > 1:
        candidates.append((f"ensemble of {len(members)} networks × {len(VIEWS)} views", Ensemble(members, len(VIEWS))))
    results = {}
    thresholds = [float(t) for t in args.thresholds.split(",")]
    for name, predictor in candidates:
        for threshold in thresholds:
            label = name if thresholds == [0.5] else f"{name}, threshold {threshold}"
            cfg = RunConfig(tissue_mask=False, threshold=threshold)  # annotated crops are tissue throughout
            t0 = time.perf_counter()
            results[label] = evaluate_model(label, predictor, cfg, args.data, domains, 5.0, None, False)
            print(f"{label}: " + ", ".join(f"{d} {s.f1:.3f}" for d, s in results[label].items())
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
    table = format_domain_table(results)
    text = (f"# Candidate teachers: {', '.join(str(p) for p in paths)}\n\nHeld-out parts, run defaults (peaks), "
            f"5 µm, micro-average; engine {args.engine} {args.precision}; the first network is the student.\n\n{table}\n")
    print("\n" + text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
