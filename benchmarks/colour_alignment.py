"""Per-image colour alignment to the model's training colours: does it help a model on labs it never saw, and does
it hurt the model on labs it knows? (Issue 13's "stain normalisation to the training domain" idea.)

    python benchmarks/colour_alignment.py --models colorectal-LOO=runs/loo/colorectal/model.keras,\
breast-LOO=runs/loo/breast/model.keras,default=wsiproc/models/default.keras \
        --thresholds 0.3,0.35,0.4,0.45,0.5,0.55,0.6 --out benchmarks/results/adaptation/colour_per_image.md

For each model and every domain's held-out images (whole images at 0.5 µm/px, the run's post-processing: peaks
of the map smoothed with σ 0.5 µm, 1 µm apart, above 0.5; 5 µm one-to-one matching, micro-average), three inputs:
- `as scanned`;
- `mean + covariance`: each image's tissue RGB mean and covariance mapped onto the reference's (whitening and
  colouring, `calibrate.colour_transform`; what `adapt --align-colour` folds into the network for a whole cohort,
  here per image so that no other lab is moved);
- `mean + std`: per channel only (Reinhard-like, in RGB);
- `nearest domain` (where the reference holds each training domain's colours): the image aligned as a run of an
  adapted model aligns a slide (`wsiproc.detection.colour`: mean and covariance onto those of the training domain
  nearest by Gaussian Wasserstein-2 distance), so that an image from a known lab moves little; the distances are
  printed, to see whether they could gate the alignment.
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

from architectures import cpu_name  # noqa: E402
from heldout_maps import held_out_maps, score  # noqa: E402

from wsiproc.detection.inference import Predictor  # noqa: E402
from wsiproc.detection.postprocess import find_peaks  # noqa: E402
from wsiproc.detection.colour import DomainColours  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.calibrate import ColourStats, Reference, colour_transform  # noqa: E402

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


def nearest_domain(colours: DomainColours):
    """An input transform aligning each image to its nearest training domain as a run aligns a slide
    (`DomainColours.for_stats`, `SlideColour.apply`); it records (domain, distance) per image."""
    seen: list[tuple[str, float]] = []

    def transform(rgb: np.ndarray) -> np.ndarray:
        aligned = colours.for_stats(ColourStats().add(rgb))
        seen.append((aligned.domain, aligned.distance))
        return aligned.apply(rgb)

    transform.seen = seen
    return transform


def inputs_for(reference: Reference) -> dict:
    """The inputs compared for one model: as scanned, per-image alignments, and (where the reference has each
    training domain's colours) alignment to the nearest domain."""
    inputs = {"as scanned": lambda rgb: rgb,
              "mean + covariance": lambda rgb: align_full(rgb, reference),
              "mean + std": lambda rgb: align_diagonal(rgb, reference)}
    if reference.domain_colours:
        inputs["nearest domain"] = nearest_domain(DomainColours(reference.domain_colours))
    return inputs


def _best_over(by_image: dict, data: Path, thresholds: list[float]) -> dict[str, str]:
    """Per domain: the best F1 over `thresholds` and the threshold that gave it."""
    by_threshold = {t: score(by_image, data, lambda c, t=t: find_peaks(c, t, 2, 1.0)) for t in thresholds}
    out = {}
    for dom in datasets.DOMAINS:
        best = max(thresholds, key=lambda t: by_threshold[t][dom].f1)
        out[dom] = f"{by_threshold[best][dom].f1:.3f} ({best:g})"
    return out


def _nearest_summary(seen: list[tuple[str, float]], by_image: dict) -> str:
    """Per held-out domain: which training domains its images were aligned to, and their median distance."""
    parts = []
    for dom in datasets.DOMAINS:
        picks = [pick for key, pick in zip(by_image, seen) if key.startswith(dom + "/")]
        counts = {d: sum(p[0] == d for p in picks) for d in dict.fromkeys(p[0] for p in picks)}
        parts.append(f"{dom} → " + ", ".join(f"{d} {n}" for d, n in counts.items())
                     + f" (W2 {np.median([p[1] for p in picks]):.3f})")
    return "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="label=path.keras, comma-separated")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here too")
    ap.add_argument("--thresholds", default="", help="also the best F1 over these thresholds, per domain and input "
                    "(chosen on the held-out labels: a ceiling for any threshold re-calibration, not a recipe)")
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",") if t]
    lines = [f"CPU: {cpu_name()}", "",
             "| model | input | " + " | ".join(f"{d} F1 (P / R)" for d in datasets.DOMAINS) + " | mean F1 |",
             "|---|---|" + "---|" * (len(datasets.DOMAINS) + 1)]
    print("\n".join(lines), flush=True)
    for item in args.models.split(","):
        label, path = item.split("=", 1)
        reference = Reference.load(Reference.beside(path))
        inputs = inputs_for(reference)
        predictor = (Predictor(path) if label == "default"
                     else Predictor(path, engine="tensorflow", precision="float32"))
        maps = held_out_maps(predictor, args.data, inputs)
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
        if thresholds:
            lines += ["", f"{label}: best F1 over thresholds {args.thresholds} (threshold)", ""]
            lines += ["| input | " + " | ".join(datasets.DOMAINS) + " |", "|---|" + "---|" * len(datasets.DOMAINS)]
            for name, by_image in maps.items():
                lines.append(f"| {name} | " + " | ".join(_best_over(by_image, args.data, thresholds).values()) + " |")
                print(lines[-1], flush=True)
            lines.append("")
        if "nearest domain" in inputs:
            lines.append("")
            lines.append(f"{label}: nearest training domain per held-out image (count, median distance): "
                         + _nearest_summary(inputs["nearest domain"].seen, maps["as scanned"]))
            lines.append("")
            print(lines[-2], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(__doc__.split("\n\n")[0] + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
