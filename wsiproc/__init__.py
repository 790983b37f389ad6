"""wsiproc: find every cell nucleus in H&E whole-slide images (Valkonen et al.'s detector, made a product).

The public API, the way tiffslide and openslide-python offer theirs::

    import wsiproc

    slide = wsiproc.open_slide("case.svs")                     # any slide or plain image (pass mpp= if it has none)
    model = wsiproc.Predictor()                                # the shipped model, loaded once for many slides
    nuclei = wsiproc.detect(slide)                             # wsiproc.Detections, level-0 pixel coordinates
    nuclei.classes, nuclei.class_probs                         # epithelial / inflammatory / stromal (wsiproc.CLASSES)
    nuclei = wsiproc.detect("case.svs", wsiproc.RunConfig(threshold=0.6))
    outcomes = wsiproc.run_batch(["a.svs", "b.svs"], "results/")  # what `wsiproc run` does

Everything is imported on first use: `import wsiproc` loads no numerical library and never TensorFlow, and changes
nothing global (keeping TensorFlow's start-up lines off the terminal is the CLI's choice: `wsiproc._tensorflow`).
"""
from __future__ import annotations

import importlib

from ._version import __version__

#: Public name → the module that defines it (imported when the name is first used).
_PUBLIC = {
    "open_slide": "wsiproc.io.slide",
    "RunConfig": "wsiproc.config",
    "Detections": "wsiproc.detection.detections",
    "CLASSES": "wsiproc.detection.classes",
    "Predictor": "wsiproc.detection.inference",
    "detect": "wsiproc.api",
    "run_batch": "wsiproc.api",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'wsiproc' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
