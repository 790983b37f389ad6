"""The functions behind `wsiproc.detect` and `wsiproc.run_batch`: the library's two entry points."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from .config import RunConfig
from .detection.detections import Detections
from .detection.inference import Predictor
from .detection.model import resolve_model_path
from .io.slide import Slide, open_slide
from .detection.loop import detect as detect_slide
from .cohort import batch, claims


def _predictor(cfg: RunConfig, model: Predictor | str | os.PathLike[str] | None) -> Predictor:
    """`model` as given: a Predictor, a shipped model's name (default, lean…) or a file; None: the config's."""
    if isinstance(model, Predictor):
        return model
    path = resolve_model_path(model) if model is not None else cfg.model_path
    return Predictor(path, precision=cfg.precision, engine=cfg.engine)


def detect(slide: Slide | str | os.PathLike[str], config: RunConfig | None = None, *,
           model: Predictor | str | os.PathLike[str] | None = None, client=None) -> Detections:
    """Every nucleus of one slide (an open `Slide` or a file path), in level-0 pixel-index coordinates.

    `config`: the run parameters (default `RunConfig()`, those of `wsiproc run`); `model`: a `Predictor` to reuse
    across slides, a shipped model's name (`default`, `lean`, `unet`) or a model file (default: `config.model_path`, else the shipped model); `client`: a
    dask.distributed client to spread the tiles over (the result is the same).
    """
    cfg = (config or RunConfig()).validate()
    predictor = _predictor(cfg, model)
    if isinstance(slide, Slide):
        return detect_slide(slide, cfg, predictor, client=client).detections
    opened = open_slide(slide, cfg.mpp)
    try:
        return detect_slide(opened, cfg, predictor, client=client).detections
    finally:
        opened.close()


def run_batch(inputs: Iterable[str | os.PathLike[str]], out_dir: str | os.PathLike[str], config: RunConfig | None = None, *,
              model: Predictor | str | os.PathLike[str] | None = None, resume: bool = True,
              echo: Callable[[str], None] = print, client=None, claim_timeout_s: float | None = None):
    """What `wsiproc run` does: every input's result files and run record in `out_dir`, and summary.csv there.

    Finished inputs are skipped (`resume`), several processes may share `out_dir`, and each input succeeds or
    fails on its own; returns one `Outcome` per input (status done, skipped or failed, with the reason).
    """
    cfg = (config or RunConfig()).validate()
    return batch.run_batch([Path(p) for p in inputs], Path(out_dir), cfg, _predictor(cfg, model), resume=resume, echo=echo,
                           client=client, claim_timeout_s=claims.DEFAULT_TIMEOUT_S if claim_timeout_s is None else claim_timeout_s)
