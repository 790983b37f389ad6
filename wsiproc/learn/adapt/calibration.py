"""The cohort step of adaptation: confidences (and colours) of a cohort judged against the model's training
domains and folded into the weights (`calibrate_cohort`), and a model's training statistics (`measure_reference`).

The rules (the threshold, the colour transform) are `wsiproc.learn.calibrate`'s; this module reads the slides
for them and writes `calibration.json` and `aligned.keras` into the work folder."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np

from ...config import RunConfig
from ...detection.colour import MIN_TISSUE_PIXELS, DomainColours, SlideColour, slide_colour
from ...detection.inference import Predictor
from ...detection.model import load_model, save_model
from ...detection.tiling import SlideSampler
from ...errors import one_line
from ...io.files import atomic_write_text
from ...io.slide import open_slide
from ..calibrate import (PEAK_FLOOR, Calibration, ColourStats, Reference, colour_transform, fold_colour,
                         fold_threshold, recalibrated_threshold, share_reaching)
from .config import AdaptConfig
from .mining import _peaks_of_tiles, _sampled_tiles, tile_seed


def _slide_colour_of(path: Path, run_cfg: RunConfig, colours: DomainColours) -> SlideColour | None:
    """A slide's colour transform exactly as `detect` computes it in a run."""
    slide = open_slide(path, run_cfg.mpp)
    try:
        return slide_colour(SlideSampler.for_slide(slide, run_cfg.model_mpp), colours)
    finally:
        slide.close()


def measure_reference(domains: dict[str, tuple[list[Path], float]], predictor: Predictor, run_cfg: RunConfig,
                      tiles_per_image: int = 64, seed: int = 0) -> Reference:
    """A model's `Reference` from its training domains ({name: (image paths, µm/px)}): what calibration aims at."""
    colour, shares, per_domain = ColourStats(), {}, {}
    for name, (paths, mpp) in domains.items():
        cfg = dataclasses.replace(run_cfg, mpp=mpp)
        peaks, own = [], ColourStats()
        for i, path in enumerate(paths):
            peaks.append(_peaks_of_tiles(path, cfg, predictor, tiles_per_image, seed + i, own)[0])
        shares[name] = round(share_reaching(np.concatenate(peaks)), 4)
        per_domain[name] = {"mean_rgb": own.mean.round(6).tolist(), "cov_rgb": own.cov.round(8).tolist()}
        colour = colour.merged(own)
    return Reference(colour.mean.round(6).tolist(), colour.cov.round(8).tolist(), shares, str(predictor.model_path),
                     per_domain)


def calibrate_cohort(inputs: list[Path], run_cfg: RunConfig, predictor: Predictor, reference: Reference, cfg: AdaptConfig,
                     work_dir: Path, echo: Callable[[str], None] = print) -> tuple[Calibration, Path] | None:
    """Confidence re-calibration (and, with `colour`, colour alignment) of the base model for this cohort.

    `calibration_tiles` random tissue tiles per slide: their colour moments guard against a cohort without tissue
    and (with `cfg.colour`) give the colour transform; the (aligned) model's candidate peaks on them give the
    threshold (`wsiproc.learn.calibrate`). One read of the tiles, two with colour alignment. A cohort whose share
    falls below the training range gets per-slide colours (`cfg.slide_colours`, a reference with domain colours): each
    slide's transform measured as a run will (`detection.colour.slide_colour`), the tiles read again and aligned,
    the threshold judged on them, and `aligned.colours.json` beside the model. The result is
    `work_dir/aligned.keras` and `calibration.json` (reused on a rerun); None, with a line saying why, when the
    sampled tiles hold too little tissue to judge colours by.
    """
    record, aligned = work_dir / "calibration.json", work_dir / "aligned.keras"
    if record.is_file() and aligned.is_file():
        echo(f"{aligned}: cohort calibration already done; reused")
        return Calibration(**json.loads(record.read_text())), aligned
    geometry = predictor.geometry
    seeds = [tile_seed(cfg, i) for i in range(len(inputs))]
    # Without colour alignment one read of the sampled tiles gives both the colour guard and the peaks; with it,
    # the peaks must come from the aligned model, so the colours are read first.
    colour, readable, per_slide = ColourStats(), [], []
    for path, seed in zip(inputs, seeds):
        try:
            if cfg.colour:
                for _, _, img in _sampled_tiles(path, run_cfg, geometry, cfg.calibration_tiles, seed):
                    colour.add(img)
            else:
                per_slide.append(_peaks_of_tiles(path, run_cfg, predictor, cfg.calibration_tiles, seed, colour))
            readable.append((path, seed))
        except Exception as exc:  # one bad slide must not stop the cohort; mining will name it again
            echo(one_line(exc, path))
    if colour.n < MIN_TISSUE_PIXELS:
        echo(f"cohort calibration skipped: {colour.n} tissue pixels in the sampled tiles (fewer than {MIN_TISSUE_PIXELS})")
        return None
    a, c = colour_transform(colour, reference) if cfg.colour else (np.eye(3), np.zeros(3))
    model = load_model(predictor.model_path)
    if cfg.colour:
        fold_colour(model, a, c)
        save_model(model, work_dir / "aligned_colour.keras")
        aligned_colour = Predictor(work_dir / "aligned_colour.keras", precision=run_cfg.precision, engine=run_cfg.engine)
        per_slide = [_peaks_of_tiles(path, run_cfg, aligned_colour, cfg.calibration_tiles, seed) for path, seed in readable]
    peaks = np.concatenate([p for p, _ in per_slide] or [np.zeros(0)])
    n_tiles = sum(n for _, n in per_slide)
    threshold, share = recalibrated_threshold(peaks, reference)
    colours_file, slide_colours = DomainColours.beside(aligned), {}
    colours_file.unlink(missing_ok=True)
    if share < reference.share_range[0] and cfg.slide_colours and not cfg.colour and reference.domain_colours:
        # Confidences that sink below every training domain's: the symptom of colours the model never learnt, so each
        # slide is aligned to its nearest training domain and the confidences judged again. A cohort *more* confident
        # than training only gets the threshold: its colours are not what is off (measured on MoNuSeg left out,
        # aligning its slides cost 0.057 F1).
        echo(f"cohort judged foreign ({share:.0%} of candidate peaks reach 0.5): each slide's colours are aligned "
             f"to the nearest of the model's training domains ({', '.join(reference.domain_colours)})")
        colours = DomainColours(reference.domain_colours, cfg.calibration_tiles, cfg.seed, reference.source)
        per_slide = []
        for path, seed in readable:
            slide_colours[str(path)] = sc = _slide_colour_of(path, run_cfg, colours)
            per_slide.append(_peaks_of_tiles(path, run_cfg, predictor, cfg.calibration_tiles, seed, aligned=sc))
        peaks = np.concatenate([p for p, _ in per_slide] or [np.zeros(0)])
        threshold, share = recalibrated_threshold(peaks, reference)
        slide_colours = {k: v.to_dict() if v is not None else None for k, v in slide_colours.items()}
    fold_threshold(model, threshold)
    save_model(model, aligned)
    if slide_colours:
        colours.save(colours_file)
    calibration = Calibration(a.tolist(), c.tolist(), colour.mean.tolist(), colour.n, round(threshold, 4),
                              round(share, 4), reference.share_range, n_tiles, int((peaks >= PEAK_FLOOR).sum()),
                              slide_colours)
    atomic_write_text(record, json.dumps(asdict(calibration), indent=1))
    colour_note = ("colours aligned to the model's training images" if cfg.colour else
                   "each slide's colours aligned to its nearest training domain" if slide_colours else "colours as they are")
    echo(f"cohort calibration ({colour_note}; {colour.n} tissue pixels from {n_tiles} tiles): "
         f"{share:.0%} of candidate peaks reach 0.5 (training domains: {reference.share_range[0]:.0%}–{reference.share_range[1]:.0%}) "
         f"-> threshold {threshold:.2f} folded into the model")
    return calibration, aligned
