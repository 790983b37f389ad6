"""Confidence maps of a model on every domain's held-out images, cached, and the scores of post-processings on them.

    python benchmarks/heldout_maps.py --model runs/unet/model.keras --cache runs/maps/unet.npz

The maps are computed once per model (whole images at 0.5 µm/px, padded to the model's multiple) so that
thresholds and peak parameters can be compared without running the network again.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsiproc.learn import datasets  # noqa: E402
from wsiproc.evaluate.scoring import evaluate_sets  # noqa: E402
from wsiproc.io.resample import map_coords, rescale_rgb  # noqa: E402

MODEL_MPP = 0.5


def compute_maps(model_path: str, data: Path, split: str = "held_out") -> dict:
    import keras

    from wsiproc.detection.architectures import geometry

    model = keras.models.load_model(model_path, compile=False, safe_mode=True)
    m = geometry(model).size_multiple_px
    pad = 32
    maps, t0, mp = {}, time.perf_counter(), 0.0
    for dom in datasets.DOMAINS:
        for a in datasets.domain(dom, data, split):
            rgb = rescale_rgb(a.read_rgb(), a.mpp, MODEL_MPP)
            h, w = rgb.shape[:2]
            H, W = -(-(h + 2 * pad) // m) * m, -(-(w + 2 * pad) // m) * m
            x = np.full((1, H, W, 3), 255, np.uint8)
            x[0, pad : pad + h, pad : pad + w] = rgb
            y = keras.ops.convert_to_numpy(model(x.astype(np.float32) / 255.0, training=False))[0, pad : pad + h, pad : pad + w, 0]
            maps[f"{dom}/{a.name}"] = y.astype(np.float16)
            mp += h * w / 1e6
    return {"maps": maps, "seconds": time.perf_counter() - t0, "mp": mp}


def score(maps: dict, data: Path, post, split: str = "held_out", radius_um: float = 5.0) -> dict:
    """Per-domain micro-averaged Score of one post-processing (a function confidence map → Components)."""
    out = {}
    for dom in datasets.DOMAINS:
        pred, truth, radius = {}, {}, {}
        for a in datasets.domain(dom, data, split):
            comp = post(maps[f"{dom}/{a.name}"].astype(np.float32))
            xy = np.stack([comp.x, comp.y], 1) if len(comp) else np.zeros((0, 2))
            pred[a.name] = map_coords(xy, MODEL_MPP, a.mpp)
            truth[a.name] = a.points_xy
            radius[a.name] = radius_um / a.mpp
        out[dom] = evaluate_sets(pred, truth, radius)[1]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--split", default="held_out")
    args = ap.parse_args()
    if not args.cache.is_file():
        r = compute_maps(args.model, args.data, args.split)
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.cache, **r["maps"])
        print(f"{args.model}: {r['mp']:.1f} MP in {r['seconds']:.0f} s")
    maps = dict(np.load(args.cache))
    from wsiproc.detection.postprocess import find_nuclei, find_peaks

    rows = [(f"components t={t}", lambda c, t=t: find_nuclei(c, t)) for t in (0.3, 0.4, 0.5, 0.6)]
    rows += [(f"peaks t={t} d={d} s={s}", lambda c, t=t, d=d, s=s: find_peaks(c, t, d, s))
             for t in (0.3, 0.4, 0.5, 0.6) for d in (2, 3) for s in (1.0, 1.5)]
    for name, post in rows:
        sc = score(maps, args.data, post, args.split)
        cells = "  ".join(f"{d} {s.f1:.3f} ({s.precision:.2f}/{s.recall:.2f})" for d, s in sc.items())
        print(f"{name:24s} mean {np.mean([s.f1 for s in sc.values()]):.3f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
