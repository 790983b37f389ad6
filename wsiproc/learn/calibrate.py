"""Cohort calibration: bring a new lab's colours and confidences back to what the model was trained on.

Two label-free corrections, both folded into the network's own weights (no new layer, so every engine and
`wsiproc run --model` use the result as is). Re-calibration is the default; colour alignment is optional
(`AdaptConfig.colour`): measured, it lifted one new lab but cost the shipped model 0.014 F1 on a lab it was
trained on, so it is not applied unasked.

- **Colour alignment.** The affine RGB transform that maps the cohort's tissue-pixel mean and covariance onto
  those of the model's training images (whitening, then colouring: `A = Σ_ref^½ Σ_cohort^-½`,
  `c = μ_ref − A μ_cohort`) is folded into the first convolution. It is stain normalisation to the
  training domain, done once per cohort instead of per tile.
- **Confidence re-calibration.** On a new lab the model's confidences sink: fewer of its candidate peaks
  (above a floor of 0.1) reach 0.5 than on any training domain. When the cohort's share falls outside the
  range the training domains showed, the threshold `t` that restores the nearest end of that range is folded
  into the last layer's bias (`b − logit(t)`), so that 0.5 on the adapted model means `t` on the aligned one.
  A cohort inside the range is left alone: adapting "just in case" on familiar data changes nothing here.
- **Per-slide colour alignment** (the default where the reference has each training domain's colours): for a
  cohort whose share fell *below* the training range (sunk confidences: the symptom of unlearnt colours; a cohort
  more confident than training gets the threshold only), every slide's colours are mapped onto its nearest training domain
  (`wsiproc.detection.colour`), the threshold is measured again on the aligned slides, and the adapted model gets
  a `<model>.colours.json` that makes every later run align each slide the same way. Unlike the cohort-wide
  colour fold above it moves no other lab's slides.

What "trained on" looked like is a `Reference` (JSON beside the model, `<model>.reference.json`), measured
once from the training domains by `benchmarks/reference_stats.py`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..detection.colour import ColourStats, DomainColours, affine_onto  # noqa: F401 (re-exported)
from ..detection.model_files import ModelFiles
from ..io.files import atomic_write_text

#: Candidate peaks below this confidence are not counted: they are the map's noise floor in every domain.
PEAK_FLOOR = 0.1
#: A cohort share within this of the training range counts as inside it (the reference is stored to 4 decimals,
#: and a share measured on a few tiles per slide wobbles by about this much).
SHARE_TOLERANCE = 0.005
#: The re-calibrated threshold stays within these bounds whatever the cohort looks like.
THRESHOLD_BOUNDS = (0.2, 0.8)


@dataclass
class Reference:
    """The model's training data as the model saw it: tissue colour moments and its confident-peak shares."""

    mean_rgb: list[float]
    cov_rgb: list[list[float]]
    confident_share: dict[str, float]  # per training domain: share of peaks >= PEAK_FLOOR that reach 0.5
    source: str = ""
    #: per training domain: its tissue colour moments {"mean_rgb", "cov_rgb"} (per-slide alignment's targets)
    domain_colours: dict[str, dict[str, list]] = field(default_factory=dict)

    @property
    def share_range(self) -> tuple[float, float]:
        values = list(self.confident_share.values())
        return min(values), max(values)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Reference":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a model reference (colour and confidence statistics): {exc}") from exc

    @staticmethod
    def beside(model_path: str | Path) -> Path:
        """`<model>.reference.json` beside the model (`ModelFiles.reference`)."""
        return ModelFiles.of(model_path).reference


def colour_transform(cohort: ColourStats, reference: Reference) -> tuple[np.ndarray, np.ndarray]:
    """(A, c) with `A @ rgb + c` giving the cohort's tissue the reference's mean and covariance."""
    return affine_onto(cohort, reference.mean_rgb, reference.cov_rgb)


def share_reaching(peaks: np.ndarray, threshold: float = 0.5) -> float:
    """Share of candidate peaks (>= PEAK_FLOOR) whose confidence reaches `threshold`."""
    peaks = np.asarray(peaks)
    peaks = peaks[peaks >= PEAK_FLOOR]
    return float((peaks >= threshold).mean()) if len(peaks) else float("nan")


def recalibrated_threshold(peaks: np.ndarray, reference: Reference) -> tuple[float, float]:
    """(threshold, cohort share): the threshold at which the cohort's confident share re-enters the reference range.

    0.5 when the share is already inside the range (or there are no peaks to judge from).
    """
    peaks = np.asarray(peaks)
    peaks = peaks[peaks >= PEAK_FLOOR]
    share = share_reaching(peaks)
    lo, hi = reference.share_range
    if not np.isfinite(share) or lo - SHARE_TOLERANCE <= share <= hi + SHARE_TOLERANCE:
        return 0.5, share
    wanted = lo if share < lo else hi
    t = float(np.quantile(peaks, 1.0 - wanted))
    return float(np.clip(t, *THRESHOLD_BOUNDS)), share


def _first_convolution(model):
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            if layer.kernel.shape[2] != 3:
                raise ValueError(f"{model.name}: the first convolution takes {layer.kernel.shape[2]} channels, not RGB")
            return layer
    raise ValueError(f"{model.name}: no convolution to fold a colour transform into")


def fold_colour(model, a: np.ndarray, c: np.ndarray) -> None:
    """Fold `rgb → A rgb + c` into the first convolution.

    Exact inside the image; within the first convolution's reach of a zero-padded border the padding now
    stands for colour `c` instead of black, which the tiles' halo keeps out of every core.
    """
    conv = _first_convolution(model)
    kernel, bias = (np.asarray(w, np.float64) for w in conv.get_weights())
    new_kernel = np.einsum("hwjo,ji->hwio", kernel, a)
    new_bias = bias + np.einsum("hwjo,j->o", kernel, c)
    conv.set_weights([new_kernel.astype(np.float32), new_bias.astype(np.float32)])


def fold_threshold(model, threshold: float) -> None:
    """Fold a threshold into the confidence layer's bias: 0.5 on the result is `threshold` on the model before."""
    if threshold != 0.5:
        head = model.get_layer("confidence")
        k, b = head.get_weights()
        head.set_weights([k, (b - np.log(threshold / (1.0 - threshold))).astype(np.float32)])


@dataclass
class Calibration:
    """What adapting did to the base model before any fine-tuning, for the provenance."""

    colour_a: list[list[float]]
    colour_c: list[float]
    cohort_mean_rgb: list[float]
    tissue_pixels: int
    threshold: float  # on the colour-aligned model; 0.5 = unchanged
    cohort_confident_share: float
    reference_share_range: tuple[float, float]
    tiles: int
    peaks: int
    #: per-slide colour alignment (a cohort judged foreign, a reference with domain colours): slide → its
    #: transform as `run` will compute it; the threshold above is then measured on the aligned slides
    slide_colours: dict[str, dict | None] = field(default_factory=dict)

    @property
    def familiar(self) -> bool:
        """The cohort looked like a training domain: neither its colours nor the threshold were touched (a cohort
        whose aligned slides land back in the training range was still foreign)."""
        return self.threshold == 0.5 and not self.slide_colours
