"""Engines and precisions on this machine: model throughput, the ratio to TensorFlow float32, held-out F1; and
the pipeline's efficiency with the default choice.

    python benchmarks/throughput.py [--model wsiproc/models/default.keras] [--int8 X.int8.xml] [--data ../shared/data]
                                    [--domains monuseg] [--tile-px 512] [--batch-size 4] [--rounds 3] [--no-f1] [--no-pipeline]

In one run on one machine:
- every engine × precision available here (TensorFlow float32, the baseline; TensorFlow mixed float16 on a GPU;
  OpenVINO float32, bfloat16 where the CPU has it, int8): MP/s of tile cores at 0.5 µm/px on real tissue tiles
  of the sample slide (tile + halo as the pipeline sends them, one batch), rounds interleaved (a b c a b c …)
  so that background load hits every path alike; the median round is reported;
- the held-out F1 of each on `--domains` (5 µm, one-to-one, micro-averaged, through `detect` as a run does), and
  whether `--precision auto` may offer it: only if its F1 loss against TensorFlow float32 is <= 0.005 on each;
- what `--engine auto --precision auto` resolves to here, and its speed-up over TensorFlow float32;
- pipeline efficiency: `detect()` on the slide (tissue mask, reads in threads, post-processing, stitching) with
  the default choice, over the bare model on the same tiles, timed before and after the run.
The int8 model is the one beside `--model` (`X.int8.xml`), else `--int8`, else quantized here with the default
recipe (64 crops of 128 px from the training split of every domain; never the held-out images scored).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from wsiproc.learn import datasets
from wsiproc.config import RunConfig
from wsiproc.detection.engines import cpu_info, int8_path_for, openvino_version, tensorflow_gpus
from wsiproc.detection.model_files import F1_TOLERANCE
from wsiproc.detection.inference import Predictor
from wsiproc.detection.model import DEFAULT_MODEL_PATH
from wsiproc.detection.loop import detect, plan_tiles
from wsiproc.learn.quantize import domain_crops, domain_f1, quantize_model
from wsiproc.io.slide import open_slide
from wsiproc.detection.tiling import SlideSampler, halo_tiles

SAMPLE_SLIDE = Path(__file__).resolve().parents[1] / "wsiproc" / "sample" / "CMU-1-Small-Region.svs"
BASELINE = "tensorflow float32"


def tissue_batch(slide_path: Path, cfg: RunConfig) -> tuple[np.ndarray, float]:
    """One batch of real tissue tiles with their halo, as the pipeline sends them, and its megapixels of tile cores."""
    slide = open_slide(slide_path)
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    grid, tiles, _, _ = plan_tiles(sampler, cfg)
    blocks = halo_tiles(sampler, grid)
    middle = tiles[len(tiles) // 2 - cfg.batch_size // 2 :][: cfg.batch_size]  # central tiles: tissue throughout
    batch = np.stack([blocks.blocks[r, c].compute() for r, c in middle])
    slide.close()
    return batch, len(batch) * grid.tile_px**2 / 1e6


def interleaved_mps(predictors: dict[str, Predictor], batch: np.ndarray, core_mp: float, rounds: int) -> dict[str, float]:
    """Median MP/s per predictor over `rounds`; each round runs every predictor once on the batch, one after the other."""
    for p in predictors.values():
        p(batch)  # warm-up: tracing, first-shape kernel selection
    seconds: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(rounds):
        for name, p in predictors.items():
            t0 = time.perf_counter()
            p(batch)
            seconds[name].append(time.perf_counter() - t0)
    return {name: core_mp / statistics.median(s) for name, s in seconds.items()}


def int8_model(model: Path, given: Path | None, data: Path, work: Path) -> Path | None:
    beside = int8_path_for(model)
    if given is not None:
        return given
    if beside.is_file():
        print(f"int8 model: {beside} (beside the model)")
        return beside
    t0 = time.perf_counter()
    crops = domain_crops(data)
    path = quantize_model(model, crops, work / f"{model.stem}.int8.xml", calibration={"domains": str(data)})
    print(f"int8 model: quantized here on {len(crops)} crops of {crops[0].shape[0]} px from the training domains "
          f"in {time.perf_counter() - t0:.0f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="the .keras model")
    ap.add_argument("--int8", type=Path, default=None, help="its int8 .xml (default: beside the model, else quantized here)")
    ap.add_argument("--slide", type=Path, default=SAMPLE_SLIDE)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--domains", default="monuseg", help="held-out domains scored, comma-separated (all: monuseg,crc,brca,consep)")
    ap.add_argument("--tile-px", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-f1", action="store_true", help="throughput only")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the pipeline efficiency run")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"machine: {cpu.name} ({platform.machine()}), {os.cpu_count()} cores, flags {' '.join(cpu.flags) or 'n/a'}; "
          f"OpenVINO {openvino_version()} sees {', '.join(cpu.openvino_capabilities)}; TensorFlow GPUs: {tensorflow_gpus()}; "
          f"load average {os.getloadavg()[0]:.2f} at start")
    cfg = RunConfig(tile_px=args.tile_px, batch_size=args.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        predictors: dict[str, Predictor] = {BASELINE: Predictor(args.model, "float32", "tensorflow")}
        if tensorflow_gpus():
            predictors["tensorflow mixed_float16"] = Predictor(args.model, "mixed_float16", "tensorflow")
        if openvino_version() is not None:
            predictors["openvino float32"] = Predictor(args.model, "float32", "openvino")
            if cpu.bf16:
                predictors["openvino bfloat16"] = Predictor(args.model, "bfloat16", "openvino")
            int8 = int8_model(args.model, args.int8, args.data, Path(tmp))
            predictors["openvino int8"] = Predictor(int8, engine="openvino")
        default = Predictor(args.model)
        default_name = f"{default.engine} {default.precision}" if default else None
        batch, core_mp = tissue_batch(args.slide, cfg)
        print(f"\nmodel {args.model} ({predictors[BASELINE].geometry.get('architecture')}); batch of {len(batch)} tissue tiles "
              f"of {batch.shape[1]} × {batch.shape[2]} px (core {args.tile_px} + halo) from {args.slide.name}; "
              f"{args.rounds} interleaved rounds, median")
        mps = interleaved_mps(predictors, batch, core_mp, args.rounds)
        f1: dict[str, dict[str, float]] = {}
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        if not args.no_f1:
            for name in domains:
                images = datasets.domain(name, args.data, "held_out")
                for key, p in predictors.items():
                    f1.setdefault(key, {})[name] = domain_f1(p, images)[2]
        header = f"{'engine precision':<26} {'MP/s':>8} {'× TF f32':>9}" + "".join(f" {'F1 ' + d:>12}" for d in f1.get(BASELINE, {}))
        print(header + ("  auto may offer it" if f1 else ""))
        for key in predictors:
            row = f"{key:<26} {mps[key]:>8.4f} {mps[key] / mps[BASELINE]:>8.2f}×" + "".join(f" {v:>12.4f}" for v in f1.get(key, {}).values())
            if f1:
                worst = max(f1[BASELINE][d] - f1[key][d] for d in f1[key])
                row += f"  {'yes' if worst <= F1_TOLERANCE else 'NO'} (F1 loss {worst:+.4f})"
            print(row)
        if default is not None:
            print(f"\ndefault (--engine auto --precision auto) here: {default_name} — {default.choice.reason}")
            match = next((k for k in predictors if k == default_name), None)
            if match:
                print(f"default speed-up over TensorFlow float32: {mps[match] / mps[BASELINE]:.2f}×")
        if not args.no_pipeline and default is not None:
            pipeline_efficiency(args.slide, cfg, default, batch, core_mp)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


def pipeline_efficiency(slide_path: Path, cfg: RunConfig, predictor: Predictor, batch: np.ndarray, core_mp: float) -> None:
    def bare() -> float:
        predictor(batch)
        t0 = time.perf_counter()
        for _ in range(2):
            predictor(batch)
        return 2 * core_mp / (time.perf_counter() - t0)

    before = bare()
    slide = open_slide(slide_path)
    t0 = time.perf_counter()
    result = detect(slide, cfg, predictor)
    dt = time.perf_counter() - t0
    slide.close()
    after = bare()
    stats = result.stats
    pipe = stats["tiles_computed"] * stats["tile_px"] ** 2 / 1e6 / dt
    print(f"\npipeline with the default ({predictor.engine} {predictor.precision}, {predictor.describe().get('threads', '?')} "
          f"engine threads, {cfg.io_workers} reader threads): {stats['tiles_computed']}/{stats['tiles_total']} tiles, "
          f"{len(result.detections)} nuclei, {dt:.1f} s")
    print(f"  bare model {((before + after) / 2):.4f} MP/s ({before:.4f} before, {after:.4f} after); pipeline {pipe:.4f} MP/s; "
          f"efficiency {pipe / ((before + after) / 2):.3f}")
    print(f"  time split: predict {stats['predict_s']:.1f} s, tissue mask {stats['tile_mask_s']:.1f} s, rest "
          f"{dt - stats['predict_s'] - stats['tile_mask_s']:.1f} s (reads the model waited for, post-processing of the last batch)")


if __name__ == "__main__":
    main()
