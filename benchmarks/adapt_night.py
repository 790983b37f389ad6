"""Does `wsiproc adapt` fit a 100-slide cohort in a night on an 8-core CPU? One timed run on a scaled-down cohort, extrapolated.

    python benchmarks/make_benchmark_slide.py --out runs/bench/sample-5x4.tiff
    python benchmarks/adapt_night.py runs/bench/sample-5x4.tiff --mine-tiles 8 --steps 40 [-- more adapt options, e.g. --model unet]

The run is the command a user types (`wsiproc adapt SLIDES --recipe consistency --out … --mine-tiles K
--steps-per-epoch S/2`), in this process, with timers around its four stages: calibration (8 sampled tissue tiles per
slide, one view), mining (K tissue tiles per slide under four views), fine-tuning (S steps of 16 blocks) and the
density check (the calibration tiles through teacher and student). Each stage's rate, seconds per megapixel of tiles
through the network (reading, views, labels and all) and seconds per training step after the first epoch (graph
building excluded), then prices a cohort of `--slides-in-night` slides with at least 64 tissue tiles each (a 1 cm² slide has
~400; the default `--mine-tiles 64` reads 64 of them) and the full fine-tuning budget
(`max_blocks` 20 000 blocks × 2 epochs / 16 = 2 500 steps).

On 8 cores: calibration, mining and the density check are per slide, so `--scheduler local` with four 2-core dask
workers does four slides at once (×4, stated, not measured here: this machine has 2 cores); fine-tuning is one
TensorFlow process (×2 for four times the cores, a conservative guess). Both factors are printed beside the figures.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_slide import Timers, _cpu_line  # noqa: E402

#: The stages of `wsiproc.learn.adapt.run.adapt`, where it looks them up.
STAGES = {"calibrate_cohort": "calibration", "_mine_cohort": "mining", "train": "fine-tuning", "match_density": "density check"}


class Pixels:
    """Megapixels of tiles through the network, per stage (a view counts once per view)."""

    def __init__(self, timers: Timers) -> None:
        self.mp: dict[str, float] = {stage: 0.0 for stage in STAGES.values()}
        self.timers = timers
        self.largest_tile_px = 0
        self.fixed_s = 0.0  # building the student's engine in the density check: once per cohort

    def stage(self) -> str:
        active = getattr(self.timers._active, "stages", set())
        return next((s for s in STAGES.values() if s in active), "other")

    def add(self, tiles, views: int = 1) -> None:
        self.mp[self.stage()] = self.mp.get(self.stage(), 0.0) + tiles.shape[0] * tiles.shape[1] * tiles.shape[2] * views / 1e6
        self.largest_tile_px = max(self.largest_tile_px, tiles.shape[1])

    def count(self, fn):
        def counted(predictor, tiles, *rest, **kw):
            out = fn(predictor, tiles, *rest, **kw)
            views = rest[0] if rest else kw.get("views", 1)
            self.add(tiles, views)
            return out
        return counted


def _install(timers: Timers, pixels: Pixels) -> None:
    """Timers on the four stages; pixel counters where tiles meet the network (views while mining, the sampled tiles'
    single view in calibration and the density check)."""
    from wsiproc.detection.inference import Predictor
    from wsiproc.learn.adapt import mining, run

    for name, stage in STAGES.items():
        setattr(run, name, timers.wrap(stage, getattr(run, name)))
    mining.predict_views = pixels.count(mining.predict_views)
    call = Predictor.__call__

    def predictor_call(self, tiles, *rest, **kw):
        if pixels.stage() in ("calibration", "density check"):
            pixels.add(tiles)
        return call(self, tiles, *rest, **kw)

    Predictor.__call__ = predictor_call
    init = Predictor.__init__

    def predictor_init(self, *a, **kw):  # the density check builds the student's engine once per cohort, not per slide
        t0 = time.perf_counter()
        init(self, *a, **kw)
        if pixels.stage() == "density check":
            pixels.fixed_s += time.perf_counter() - t0

    Predictor.__init__ = predictor_init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("slides", nargs="+", type=Path)
    ap.add_argument("--mine-tiles", type=int, default=8, help="tiles mined per slide in the timed run")
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps in the timed run (two epochs of half)")
    ap.add_argument("--slides-in-night", dest="night_slides", type=int, default=100)
    ap.add_argument("--mine-tiles-night", type=int, default=64, help="tiles per slide in the priced cohort (adapt's default)")
    ap.add_argument("--steps-night", type=int, default=2500, help="fine-tuning steps of the priced cohort (20 000 blocks, 2 epochs)")
    ap.add_argument("--mining-speedup", type=float, default=4.0, help="8 cores against 2: four 2-core dask workers")
    ap.add_argument("--training-speedup", type=float, default=2.0, help="8 cores against 2 for one TensorFlow process")
    ap.add_argument("--json", type=Path, default=None)
    args, extra = ap.parse_known_args()
    extra = [o for o in extra if o != "--"]

    from wsiproc import _tensorflow
    from wsiproc.cli import main as cli

    _tensorflow.install()
    timers = Timers()
    pixels = Pixels(timers)
    _install(timers, pixels)
    work = Path(tempfile.mkdtemp(prefix="wsiproc-adapt-night-"))
    out = work / "adapted.keras"
    options = ["adapt", *map(str, args.slides), "--recipe", "consistency", "--out", str(out), "--work", str(work / "work"),
               "--mine-tiles", str(args.mine_tiles), "--epochs", "2", "--steps-per-epoch", str(args.steps // 2), *extra]
    t0 = time.perf_counter()
    try:
        cli.main(options, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
    wall = time.perf_counter() - t0
    prov = json.loads(out.with_suffix(".json").read_text())
    history = prov["training"]["history"]
    step_s = (history[-1]["seconds"] - history[0]["seconds"]) / max(1, history[-1]["step"] - history[0]["step"])
    tile_mp = pixels.largest_tile_px ** 2 / 1e6  # a full tile with its halo (border quarters are smaller)
    mined = [Path(c["path"]).name for c in prov["cohort"]]  # a slide named as unreadable is left out, as in a run
    n = len(mined)
    print(f"machine: {_cpu_line()}")
    print(f"cohort: {n} slides ({', '.join(mined)}), {prov['blocks']} blocks; "
          f"engine {prov['run_config'].get('engine')} {prov['run_config'].get('precision')}; model {prov['base_model']['path']}\n")
    print("| stage | seconds | MP through the network | s/MP | s per slide (this cohort) |")
    print("|---|---|---|---|---|")
    rates = {}
    for stage in STAGES.values():
        s, mp = timers.wall.get(stage, 0.0), pixels.mp.get(stage, 0.0)
        per_mp = s - (pixels.fixed_s if stage == "density check" else 0.0)
        rates[stage] = per_mp / mp if mp else 0.0
        print(f"| {stage} | {s:.1f} | {mp:.1f} | {rates[stage]:.3f} | {s / n:.1f} |" if mp else f"| {stage} | {s:.1f} | – | – | – |")
    print(f"| of which the student's engine, built once | {pixels.fixed_s:.1f} | | | |")
    print(f"| fine-tuning step (after the first epoch) | {step_s:.3f} s | | | |")
    print(f"| **whole command** | **{wall:.1f}** | | | |\n")

    # The priced cohort: each slide has >= mine-tiles-night full tiles; calibration reads 8 of them, once for the teacher's
    # statistics and twice more (teacher and student) in the density check; mining reads mine-tiles-night under 4 views.
    per_slide = {
        "calibration": 8 * tile_mp * rates["calibration"],
        "mining": args.mine_tiles_night * tile_mp * 4 * rates["mining"],
        "density check": 2 * 8 * tile_mp * rates["density check"],  # teacher and student
    }
    slides_s = args.night_slides * sum(per_slide.values())
    train_s = args.steps_night * step_s
    two = slides_s + train_s + pixels.fixed_s
    eight = slides_s / args.mining_speedup + (train_s + pixels.fixed_s) / args.training_speedup
    print(f"priced: {args.night_slides} slides × ({args.mine_tiles_night} mined tiles × 4 views + 8 calibration tiles + "
          f"2 × 8 density-check tiles) of {tile_mp:.3f} MP each, and {args.steps_night} fine-tuning steps\n")
    print("| | per slide | cohort, 2 cores | cohort, 8 cores |")
    print("|---|---|---|---|")
    for stage, s in per_slide.items():
        print(f"| {stage} | {s:.0f} s | {args.night_slides * s / 3600:.2f} h | {args.night_slides * s / args.mining_speedup / 3600:.2f} h (×{args.mining_speedup:g}) |")
    print(f"| fine-tuning | – | {train_s / 3600:.2f} h | {train_s / args.training_speedup / 3600:.2f} h (×{args.training_speedup:g}) |")
    print(f"| the student's engine, once | – | {pixels.fixed_s / 3600:.2f} h | {pixels.fixed_s / args.training_speedup / 3600:.2f} h |")
    print(f"| **total** | | **{two / 3600:.1f} h** | **{eight / 3600:.1f} h** |")
    if args.json:
        args.json.write_text(json.dumps({"machine": _cpu_line(), "slides": [str(p) for p in args.slides], "wall_s": round(wall, 1),
                                         "stage_s": {k: round(v, 1) for k, v in timers.wall.items()}, "mp": pixels.mp,
                                         "step_s": step_s, "tile_mp": tile_mp, "per_slide_s": per_slide,
                                         "cohort_h_2cores": two / 3600, "cohort_h_8cores": eight / 3600}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
