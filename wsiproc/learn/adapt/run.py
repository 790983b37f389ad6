"""Unsupervised domain adaptation over a whole cohort: calibrate the model to it, optionally fine-tune on pseudo-labels.

Three recipes share the lazy tiling, tissue mask and resume of `run`:

- ``calibrate``: confidence re-calibration to the cohort (and, with `colour`, colour alignment), folded into
  the weights (`wsiproc.learn.calibrate`); no fine-tuning. A cohort whose confidences look like a training
  domain's leaves the model unchanged; a lab where they sink gets a lower threshold (and per-slide colours).
  Minutes where consistency takes hours; it lifts only cohorts whose confidences sank (benchmarks/results/adaptation/).
- ``consistency`` (default; +0.039 and +0.036 on the leave-one-out targets, +0.005 on a training domain):
  calibrate, then mine pseudo-labelled blocks and fine-tune on them. Every tile is predicted under four views
  (as is, flipped left–right, flipped up–down, turned half way) and the views' maps are averaged. A candidate nucleus (a peak of the averaged map, found with the run's post-processing) becomes a
  pseudo-nucleus only when its averaged confidence reaches `low` *and* every view finds it; blocks are centred
  on pseudo-nuclei reaching `high`, plus a share at random tissue positions, so the new domain's background
  (stroma, debris, pigment) is learnt too. Unsure candidates (averaged confidence between `ignore_below` and
  `low`, or missed by a view) are neither taught as nucleus nor as background: their disk weighs 0 in the loss.
  With `student_augment="strong"` (a noisy student) the blocks are shown to the student under strong stain,
  contrast, blur and noise changes, while their pseudo-labels came from the tiles as scanned; afterwards the
  threshold that gives the student its teacher's nucleus count on the cohort's sampled tiles is folded in
  (`drift.match_density`) when calibration judged the cohort familiar, so there fine-tuning changes which nuclei
  are found, not how many; a foreign cohort's student keeps its own count.
- ``paper`` (the paper's §UDA, kept for reproduction): components above the high threshold (0.8) are hard
  positives; around each, a 64 × 64 block at 0.5 µm/px whose target is every low-threshold (0.5) component
  drawn as a disk. Everything else in the block is taught as background. No calibration.

Mined blocks are sampled fairly (a reservoir per slide and kind, so a cap takes blocks from all over the slide,
not its first tiles) and appended slide by slide to a zarr store; the store's attributes say which slides are
finished, so a rerun continues where it stopped and memory holds at most one slide's reservoir.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from ...config import RunConfig
from ...detection.colour import DomainColours
from ...detection.inference import Predictor
from ...detection.model import load_model, save_model
from ...detection.model_files import ModelFiles
from ...io.files import atomic_write_text, file_sha256
from ..calibrate import Calibration, Reference
from ..trainer import train
from ..training import TrainConfig
from .calibration import calibrate_cohort
from .config import AdaptConfig
from .drift import match_density
from .mining import _mine_cohort
from .store import StoreSampler


def adapt(inputs: list[Path], out_path: Path, work_dir: Path, run_cfg: RunConfig, cfg: AdaptConfig,
          predictor: Predictor, echo: Callable[[str], None] = print, client=None, reference: Reference | None = None) -> dict:
    """Calibrate to the cohort; then (consistency, paper) mine it, resuming, and fine-tune; save with provenance.

    `reference`: the base model's training statistics; by default `<model>.reference.json` beside it. Without
    one the calibration is skipped, with a line saying so (and `calibrate` has nothing to do: an error).
    `epochs=0` stops after the calibration whatever the recipe.
    """
    cfg.validate()
    if getattr(predictor, "colours", None) is not None:
        raise ValueError(f"{predictor.model_path}: this model aligns each slide's colours ({predictor.colours_path.name}); "
                         "adapt the model it was adapted from instead")
    work_dir.mkdir(parents=True, exist_ok=True)
    base, calibration, t_cal = predictor, None, time.perf_counter()
    if cfg.aligns:
        if reference is None and Reference.beside(base.model_path).is_file():
            reference = Reference.load(Reference.beside(base.model_path))
        if reference is None:
            echo(f"{base.model_path}: no {Reference.beside(base.model_path).name} beside the model: colours and "
                 "confidences are not calibrated to the cohort")
        else:
            calibrated = calibrate_cohort(inputs, run_cfg, base, reference, cfg, work_dir, echo)
            if calibrated is not None:
                calibration, aligned = calibrated
                predictor = Predictor(aligned, precision=run_cfg.precision, engine=run_cfg.engine)
    calibration_s = time.perf_counter() - t_cal
    if not cfg.fine_tunes:
        if calibration is None:
            raise ValueError("nothing to adapt: calibration needs the base model's reference statistics "
                             f"({Reference.beside(base.model_path).name}, or --reference) and a cohort with tissue")
        save_model(load_model(predictor.model_path), out_path)
        _place_colours(predictor, out_path)
        cohort = [{"path": str(p), "sha256": file_sha256(p)} for p in inputs]
        return _write_provenance(out_path, base, cfg, run_cfg, calibration, calibration_s, cohort)
    store, mining_s = _mine_cohort(inputs, run_cfg, cfg, predictor, work_dir, echo, client)
    if len(store) == 0:
        raise ValueError("no confident nuclei were found in any slide of the cohort: nothing to adapt on "
                         "(is the cohort H&E? is the base model right for it?)")
    train_cfg = TrainConfig(block_px=cfg.block_px, batch_size=cfg.batch_size, epochs=cfg.epochs,
                            steps_per_epoch=cfg.steps_per_epoch, learning_rate=cfg.learning_rate, seed=cfg.seed,
                            disk_radius_px=cfg.disk_radius_px)
    t1 = time.perf_counter()
    state = train(StoreSampler(store, train_cfg, cfg.student_augmentation), out_path, train_cfg, checkpoint_dir=work_dir / "checkpoints",
                  init_model=predictor.model_path, verbose=2)
    _place_colours(predictor, out_path)  # the blocks were mined aligned: the fine-tuned model aligns the same way
    density = None
    if cfg.matches_density(calibration):
        density = match_density(inputs, run_cfg, predictor, out_path, cfg, echo)
    elif cfg.recipe == "consistency" and cfg.match_density == "familiar":
        echo("cohort judged foreign: the fine-tuned model keeps its own nucleus count (its teacher's may be what was wrong)")
    cohort = [{k: s[k] for k in ("path", "sha256", "hard_positives", "blocks", "tissue_mm2", "warnings")} for s in store.slides]
    return _write_provenance(out_path, base, cfg, run_cfg, calibration, calibration_s, cohort, {
        "blocks": len(store),
        "density_check": asdict(density) if density else None,
        "training": {"epochs": state["epoch"], "history": state["history"], "seconds": round(state["seconds"], 1)},
        "mining_s": round(mining_s, 1),
        "fine_tune_s": round(time.perf_counter() - t1, 1),
    })


def _place_colours(predictor: Predictor, out_path: Path) -> None:
    """The adapted model's `<out>.colours.json` when calibration asked for per-slide alignment; a stale one from an
    earlier adapt to the same path is removed, so that a run never aligns for a model that did not ask for it."""
    target = DomainColours.beside(out_path)
    if predictor.colours is not None:
        predictor.colours.save(target)
    else:
        target.unlink(missing_ok=True)


def _write_provenance(out_path: Path, base: Predictor, cfg: AdaptConfig, run_cfg: RunConfig, calibration: Calibration | None,
                      calibration_s: float, cohort: list[dict], fine_tuning: dict | None = None) -> dict:
    """`<out>.json` beside the adapted model: base, cohort, recipe and every parameter, what calibration did."""
    provenance = {
        "base_model": {"path": str(base.model_path), "sha256": base.sha256},
        "adapted_model_sha256": file_sha256(out_path),
        "colour_alignment": (str(DomainColours.beside(out_path)) if DomainColours.beside(out_path).is_file() else None),
        "cohort": cohort,
        "recipe": cfg.recipe,
        "thresholds": {"high": cfg.high, "low": cfg.low},
        "calibration": asdict(calibration) if calibration else None,
        "calibration_s": round(calibration_s, 1),
        "adapt_config": asdict(cfg),
        "run_config": run_cfg.to_dict(),
        "blocks": 0, "density_check": None, "training": None, "mining_s": 0.0, "fine_tune_s": 0.0,
        **(fine_tuning or {}),
    }
    atomic_write_text(ModelFiles.of(out_path).provenance, json.dumps(provenance, indent=2, sort_keys=True))
    return provenance
