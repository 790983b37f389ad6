"""Confidence map → nuclei, as in the paper: threshold, 8-connected components, centre of mass."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# scipy.ndimage (0.2 s to import) is loaded by the functions that use it: `config` needs only the names here.

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Components:
    """Components of one confidence map, in that map's pixel-index coordinates."""

    y: np.ndarray
    x: np.ndarray
    confidence: np.ndarray  # max of the map inside the component
    area_px: np.ndarray
    class_probs: np.ndarray | None = None  # (n, K), where the model has a class head

    def __len__(self) -> int:
        return len(self.x)

    def with_class_probs(self, class_probs: np.ndarray) -> "Components":
        return Components(self.y, self.x, self.confidence, self.area_px, class_probs)


def find_nuclei(confidence: np.ndarray, threshold: float = 0.5) -> Components:
    """Components of `confidence > threshold` with their (unweighted) centre of mass."""
    mask = confidence > threshold
    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if n == 0:
        empty = np.zeros(0)
        return Components(empty, empty, empty.astype(np.float32), empty)
    index = np.arange(1, n + 1)
    area = ndimage.sum_labels(np.ones_like(labels, dtype=np.float64), labels, index)
    rows, cols = np.indices(labels.shape, dtype=np.float64)
    y = ndimage.sum_labels(rows, labels, index) / area
    x = ndimage.sum_labels(cols, labels, index) / area
    peak = ndimage.maximum(confidence, labels, index).astype(np.float32)
    return Components(y, x, peak, area)


def find_peaks(confidence: np.ndarray, threshold: float = 0.5, min_distance_px: int = 3, sigma_px: float = 1.0) -> Components:
    """Local maxima of the smoothed confidence map: one nucleus per peak, so touching nuclei stay apart.

    Thresholding merges two touching nuclei whose disks of confidence overlap into one component; their
    peaks stay distinct. A peak is a pixel of the map smoothed with a Gaussian of `sigma_px` that equals the
    maximum of its (2·`min_distance_px` + 1)² neighbourhood and exceeds `threshold`; a flat top of several
    such pixels counts once, at its centre. `area_px` is the peak's share of the thresholded map (each
    pixel over the threshold goes to the peak it climbs to, a watershed on the smoothed map), so the
    `area µm²` output keeps its meaning.
    """
    from skimage.segmentation import watershed  # lazy: about a second to import; only this step needs it

    smooth = ndimage.gaussian_filter(confidence.astype(np.float32), sigma_px) if sigma_px > 0 else confidence.astype(np.float32)
    size = 2 * int(min_distance_px) + 1
    peaks = (smooth == ndimage.maximum_filter(smooth, size=size, mode="nearest")) & (smooth > threshold)
    labels, n = ndimage.label(peaks, structure=EIGHT_CONNECTED)
    if n == 0:
        empty = np.zeros(0)
        return Components(empty, empty, empty.astype(np.float32), empty)
    index = np.arange(1, n + 1)
    y, x = (np.asarray(c) for c in zip(*ndimage.center_of_mass(peaks, labels, index)))
    confidence_at = ndimage.maximum(confidence, labels, index).astype(np.float32)
    regions = watershed(-smooth, labels, mask=smooth > threshold)
    area = ndimage.sum_labels(np.ones_like(regions, dtype=np.float64), regions, index)
    return Components(np.asarray(y, float), np.asarray(x, float), confidence_at, np.maximum(area, 1.0))


POSTPROCESSES = ("peaks", "components")


@dataclass(frozen=True)
class Postprocess:
    """Confidence map → nuclei, on the model grid: which rule, and its parameters in model pixels.

    `peaks` (default) separates touching nuclei; `components` is the paper's threshold + 8-connected rule.
    """

    method: str = "peaks"
    threshold: float = 0.5
    min_distance_px: int = 3
    sigma_px: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in POSTPROCESSES:
            raise ValueError(f"postprocess must be one of {', '.join(POSTPROCESSES)} (got {self.method!r})")

    @classmethod
    def from_um(cls, method: str, threshold: float, min_distance_um: float, smooth_sigma_um: float, model_mpp: float) -> "Postprocess":
        return cls(method, threshold, max(1, int(round(min_distance_um / model_mpp))), smooth_sigma_um / model_mpp)

    @property
    def reach_px(self) -> int:
        """How far beyond a pixel this rule looks: a tile's halo must cover it on top of the receptive field."""
        if self.method == "components":
            return 0
        return int(np.ceil(4 * self.sigma_px)) + self.min_distance_px

    def __call__(self, confidence: np.ndarray) -> Components:
        if self.method == "components":
            return find_nuclei(confidence, self.threshold)
        return find_peaks(confidence, self.threshold, self.min_distance_px, self.sigma_px)
