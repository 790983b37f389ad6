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


PAD_PX = 32


def held_out_maps(predictor, data: Path, inputs: dict | None = None, split: str = "held_out") -> dict[str, dict[str, np.ndarray]]:
    """input name → {domain/image: confidence map at 0.5 µm/px} of every domain's `split` images, whole images
    padded with white to the model's multiple. `inputs` maps a name to a transform of the image (uint8 RGB at
    0.5 µm/px) before the model; by default the image as scanned."""
    inputs = inputs or {"as scanned": lambda rgb: rgb}
    m = predictor.size_multiple_px or 8
    maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in inputs}
    for dom in datasets.DOMAINS:
        for ann in datasets.domain(dom, data, split):
            rgb = rescale_rgb(ann.read_rgb(), ann.mpp, MODEL_MPP)
            h, w = rgb.shape[:2]
            height, width = -(-(h + 2 * PAD_PX) // m) * m, -(-(w + 2 * PAD_PX) // m) * m
            for name, transform in inputs.items():
                x = np.full((1, height, width, 3), 255, np.uint8)
                x[0, PAD_PX : PAD_PX + h, PAD_PX : PAD_PX + w] = transform(rgb)
                maps[name][f"{dom}/{ann.name}"] = predictor(x)[0, PAD_PX : PAD_PX + h, PAD_PX : PAD_PX + w]
    return maps


def compute_maps(model_path: str, data: Path, split: str = "held_out") -> dict:
    """The model's maps (TensorFlow float32, stored as float16) on `split`, with the seconds and megapixels."""
    from wsiproc.detection.inference import Predictor

    t0 = time.perf_counter()
    (maps,) = held_out_maps(Predictor(model_path, engine="tensorflow", precision="float32"), data, split=split).values()
    return {"maps": {k: v.astype(np.float16) for k, v in maps.items()}, "seconds": time.perf_counter() - t0,
            "mp": sum(v.size for v in maps.values()) / 1e6}


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
