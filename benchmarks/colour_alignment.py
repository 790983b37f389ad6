"""Per-image colour alignment to the model's training colours: does it help a model on labs it never saw, and does
it hurt the model on labs it knows? (Issue 13's "stain normalisation to the training domain" idea.)

    python benchmarks/colour_alignment.py --models colorectal-LOO=runs/loo/colorectal/model.keras,\
breast-LOO=runs/loo/breast/model.keras,default=wsiproc/models/default.keras --out benchmarks/results/adaptation/colour_per_image.md

For each model and every domain's held-out images (whole images at 0.5 µm/px, the run's post-processing: peaks
of the map smoothed with σ 0.5 µm, 1 µm apart, above 0.5; 5 µm one-to-one matching, micro-average), three inputs:
- `as scanned`;
- `mean + covariance`: each image's tissue RGB mean and covariance mapped onto the reference's (whitening and
  colouring, `calibrate.colour_transform`; what `adapt --align-colour` folds into the network for a whole cohort,
  here per image so that no other lab is moved);
- `mean + std`: per channel only (Reinhard-like, in RGB).
The reference is `<model>.reference.json` (made by `benchmarks/reference_stats.py`). Models named `default` run
with the run's engine choice (OpenVINO int8 here); the others in TensorFlow float32.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from heldout_maps import MODEL_MPP, score  # noqa: E402

from wsiproc.detection.engines import cpu_info  # noqa: E402
from wsiproc.detection.inference import Predictor  # noqa: E402
from wsiproc.detection.postprocess import find_peaks  # noqa: E402
from wsiproc.io.resample import rescale_rgb  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.calibrate import ColourStats, Reference, colour_transform  # noqa: E402

PAD_PX = 32


def _to_uint8(rgb01: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return (np.clip(rgb01, 0.0, 1.0).reshape(shape) * 255.0 + 0.5).astype(np.uint8)


def align_full(rgb: np.ndarray, reference: Reference) -> np.ndarray:
    """The image's tissue mean and covariance mapped onto the reference's."""
    a, c = colour_transform(ColourStats().add(rgb), reference)
    return _to_uint8((rgb.reshape(-1, 3) / 255.0) @ a.T + c, rgb.shape)


def align_diagonal(rgb: np.ndarray, reference: Reference) -> np.ndarray:
    """Per channel: the image's tissue mean and standard deviation mapped onto the reference's."""
    stats = ColourStats().add(rgb)
    scale = np.sqrt(np.diag(reference.cov_rgb)) / np.sqrt(np.maximum(np.diag(stats.cov), 1e-8))
    return _to_uint8((rgb.reshape(-1, 3) / 255.0 - stats.mean) * scale + np.asarray(reference.mean_rgb), rgb.shape)


INPUTS = {"as scanned": lambda rgb, ref: rgb, "mean + covariance": align_full, "mean + std": align_diagonal}


def confidence_maps(predictor: Predictor, reference: Reference, data: Path) -> dict[str, dict[str, np.ndarray]]:
    """input name → {domain/image: confidence map at 0.5 µm/px} over every domain's held-out images."""
    m = predictor.size_multiple_px or 8
    maps: dict[str, dict[str, np.ndarray]] = {name: {} for name in INPUTS}
    for dom in datasets.DOMAINS:
        for ann in datasets.domain(dom, data, "held_out"):
            rgb = rescale_rgb(ann.read_rgb(), ann.mpp, MODEL_MPP)
            h, w = rgb.shape[:2]
            height, width = -(-(h + 2 * PAD_PX) // m) * m, -(-(w + 2 * PAD_PX) // m) * m
            for name, transform in INPUTS.items():
                x = np.full((1, height, width, 3), 255, np.uint8)
                x[0, PAD_PX : PAD_PX + h, PAD_PX : PAD_PX + w] = transform(rgb, reference)
                maps[name][f"{dom}/{ann.name}"] = predictor(x)[0, PAD_PX : PAD_PX + h, PAD_PX : PAD_PX + w]
    return maps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="label=path.keras, comma-separated")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    args = ap.parse_args()
    lines = [f"CPU: {cpu_info()}", "",
             "| model | input | " + " | ".join(f"{d} F1 (P / R)" for d in datasets.DOMAINS) + " | mean F1 |",
             "|---|---|" + "---|" * (len(datasets.DOMAINS) + 1)]
    print("\n".join(lines), flush=True)
    for item in args.models.split(","):
        label, path = item.split("=", 1)
        reference = Reference.load(Reference.beside(path))
        predictor = (Predictor(path) if label == "default"
                     else Predictor(path, engine="tensorflow", precision="float32"))
        maps = confidence_maps(predictor, reference, args.data)
        base = None
        for name, by_image in maps.items():
            scores = score(by_image, args.data, lambda c: find_peaks(c, 0.5, 2, 1.0))
            f1 = {d: s.f1 for d, s in scores.items()}
            base = base or f1
            cells = " | ".join(f"{s.f1:.3f} ({s.precision:.2f} / {s.recall:.2f})"
                               + ("" if name == "as scanned" else f" {f1[d] - base[d]:+.3f}")
                               for d, s in scores.items())
            row = f"| {label} | {name} | {cells} | {np.mean(list(f1.values())):.3f} |"
            lines.append(row)
            print(row, flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(__doc__.split("\n\n")[0] + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
