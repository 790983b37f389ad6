"""Is there a teacher better than the student? Held-out F1 of candidate teachers for adaptation (issue 26).

    # leave-one-out: networks trained without the colorectal sets (benchmarks/train_domains.py --domains monuseg,brca)
    python benchmarks/teachers.py --models runs/loo26/crc-unet/model.keras,runs/loo26/crc-lean/model.keras \
        --domains crc,consep --out benchmarks/results/teachers/crc_loo.md
    # the shipped networks on every domain
    python benchmarks/teachers.py --models default,lean,unet

Rows: each network as is, each under the consistency recipe's four test-time views (as is, two flips, a half
turn; maps averaged), and the ensemble of every network under every view (the mean of all maps). `--scales`
adds scale views: each tile shown as if scanned at that µm/px (resized by 0.5 / mpp, its map resized back), under
the four views too, to each network's views row and to the ensemble. Every row is
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
from skimage.transform import resize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import evaluate_model, format_domain_table  # noqa: E402

from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.detection.inference import Predictor  # noqa: E402
from wsiproc.detection.model import MODEL_MPP, resolve_model_path, size_multiple  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.adapt.views import VIEWS, predict_views  # noqa: E402


class Ensemble:
    """The mean confidence map of several networks, each under the first `views` test-time views and at each
    scale in `view_mpps` (µm/px the tile is shown as if scanned at; the model grid's 0.5 is the tile as is).

    It tiles like its most demanding member: the largest halo and the least common multiple of the input
    multiples, so every member sees a tile it can take and the halo covers every member's reach.
    """

    def __init__(self, members: list[Predictor], views: int, view_mpps: tuple[float, ...] = (MODEL_MPP,)):
        self.members, self.views, self.view_mpps = members, views, view_mpps
        widest = max(members, key=lambda p: p.geometry.get("halo_px", 0))
        self.multiple = math.lcm(*(size_multiple(p.geometry) for p in members))
        self.geometry = {**widest.geometry, "size_multiple_px": self.multiple}
        self.model_path, self.requested = widest.model_path, widest.requested

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        return np.mean([self._at_scale(p, tiles, mpp) for p in self.members for mpp in self.view_mpps], axis=0)

    def _at_scale(self, member: Predictor, tiles: np.ndarray, view_mpp: float) -> np.ndarray:
        """The member's views-mean map of the tiles resized by 0.5 / `view_mpp` (to the input multiple), resized back."""
        if view_mpp == MODEL_MPP:
            return predict_views(member, tiles, self.views).mean(axis=0)
        n, h, w = tiles.shape[:3]
        f = MODEL_MPP / view_mpp
        size = tuple(max(self.multiple, round(side * f / self.multiple) * self.multiple) for side in (h, w))
        shown = resize(tiles, (n, *size, 3), order=1, preserve_range=True, anti_aliasing=f < 1).round().astype(np.uint8)
        maps = predict_views(member, shown, self.views).mean(axis=0)
        return resize(maps, (n, h, w), order=1, anti_aliasing=f > 1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated shipped names or .keras paths; the first is the student")
    ap.add_argument("--domains", default=",".join(datasets.DOMAINS))
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--engine", default="tensorflow")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--thresholds", default="0.5", help="comma-separated detection thresholds, each a row per candidate "
                    "(a teacher is judged at its best threshold too: calibration already moves the student's)")
    ap.add_argument("--scales", default="", help="comma-separated µm/px of scale views, e.g. 0.45,0.55 (with the tile "
                    "as is, 0.5, they join each views row and the ensemble)")
    ap.add_argument("--only-views", action="store_true", help="skip the plain network rows (measured already)")
    ap.add_argument("--out", type=Path, default=None, help="markdown table")
    args = ap.parse_args()
    paths = [resolve_model_path(m) for m in args.models.split(",")]
    members = [Predictor(p, engine=args.engine, precision=args.precision) for p in paths]
    names = [p.parent.name if p.name == "model.keras" else p.stem for p in paths]
    domains = args.domains.split(",")
    scales = (MODEL_MPP, *(float(m) for m in args.scales.split(",") if m))
    at = f" at {', '.join(f'{m:g}' for m in scales)} µm/px" if len(scales) > 1 else ""
    candidates: list[tuple[str, object]] = []
    for name, member in zip(names, members):
        candidates += [] if args.only_views else [(name, member)]
        candidates.append((f"{name}, {len(VIEWS)} views{at}", Ensemble([member], len(VIEWS), scales)))
    if len(members) > 1:
        candidates.append((f"ensemble of {len(members)} networks × {len(VIEWS)} views{at}", Ensemble(members, len(VIEWS), scales)))
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
