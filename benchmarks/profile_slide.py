"""Where one slide's run goes: a table per stage from one `wsiproc run`, with s/mm² of tissue, nuclei/s, peak memory.

The run is the command a user types (`wsiproc run SLIDE --out DIR [options]`), in this process, with timers
wrapped around the functions of each stage; nothing in the package changes. A stage that runs in the reader
pool (reading + resampling, post-processing) is summed over its calls, so its seconds can exceed the wall
time it overlaps with; its CPU seconds (thread time) say what it takes from the cores the network needs.

    python benchmarks/make_benchmark_slide.py --out runs/bench/sample-5x4.tiff
    python benchmarks/profile_slide.py runs/bench/sample-5x4.tiff [--model lean] [--threads 2] [-- more run options]

`--threads N` sets the engine's threads (WSIPROC_THREADS); the CPU and its flags are printed
first, as every figure of this project names the machine it came from.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

#: (module, attribute, stage): the functions timed, where the callers look them up.
STAGES = [
    ("wsiproc.detection.tiles", "tissue_mask", "tissue mask"),
    ("wsiproc.detection.tiling.SlideSampler", "read", "read + resample (pool)"),
    ("wsiproc.detection.loop", "_predict", "network"),
    ("wsiproc.detection.loop", "_nuclei_of_tiles", "post-processing (pool)"),
    ("wsiproc.detection.loop", "_stitch", "stitch + seam merge"),
    ("wsiproc.outputs.formats", "write_csv", "write CSV"),
    ("wsiproc.outputs.formats", "write_geojson", "write GeoJSON"),
    ("wsiproc.outputs.formats", "density_map", "density maps"),
    ("wsiproc.outputs.formats", "class_density_maps", "density maps"),
    ("wsiproc.outputs.formats", "write_density_tiff", "write density TIFF/PNG"),
    ("wsiproc.outputs.formats", "write_density_png", "write density TIFF/PNG"),
    ("wsiproc.outputs.formats", "write_qc_png", "QC picture"),
]


class Timers:
    """Wall and thread-CPU seconds per stage, summed over calls from any thread (calls nested in a timed
    call of the same stage count once)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self._active = threading.local()

    def wrap(self, stage: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            active = getattr(self._active, "stages", set())
            if stage in active:
                return fn(*args, **kwargs)
            self._active.stages = active | {stage}
            w0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                w, c = time.perf_counter() - w0, time.thread_time() - c0
                self._active.stages = active
                with self._lock:
                    self.wall[stage] += w
                    self.cpu[stage] += c
                    self.calls[stage] += 1
        return timed


def _install(timers: Timers) -> None:
    import importlib

    for where, name, stage in STAGES:
        module_name, _, cls = where.partition(".SlideSampler")
        owner = importlib.import_module(module_name)
        if cls or where.endswith("SlideSampler"):
            owner = owner.SlideSampler
        setattr(owner, name, timers.wrap(stage, getattr(owner, name)))


def _cpu_line() -> str:
    from wsiproc.detection.engines import cpu_info

    cpu = cpu_info()
    flags = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "VNNI", "avx512_bf16": "BF16", "amx_tile": "AMX"}
    have = [label for flag, label in flags.items() if flag in cpu.flags]
    return f"{cpu.name}, {os.cpu_count()} CPUs ({', '.join(have) or 'no AVX2'}; AMX {'yes' if 'amx_tile' in cpu.flags else 'no'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("slide", type=Path)
    parser.add_argument("--model", default=None, help="default, lean, unet or a model file")
    parser.add_argument("--threads", type=int, default=None, help="engine threads and reader pool (default: every CPU)")
    parser.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON")
    args, run_options = parser.parse_known_args()  # the rest: more `wsiproc run` options (after --)
    run_options = [o for o in run_options if o != "--"]
    if args.threads:
        os.environ["WSIPROC_THREADS"] = str(args.threads)

    from wsiproc import _tensorflow
    from wsiproc.cli import main as cli
    from wsiproc.outputs.record import tissue_mm2 as tissue_of

    _tensorflow.install()
    timers = Timers()
    _install(timers)
    out = args.out or Path(tempfile.mkdtemp(prefix="wsiproc-profile-"))
    options = ["run", str(args.slide), "--out", str(out), "--quiet", *run_options]
    if args.model:
        options += ["--model", args.model]
    t0 = time.perf_counter()
    try:
        cli.main(options, standalone_mode=False)
    except SystemExit as exc:  # the command's exit status: 0 when the slide was done
        if exc.code:
            raise
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    record = json.loads((out / f"{args.slide.stem}.json").read_text())
    tissue_mm2 = tissue_of(record)
    nuclei = record["nuclei"]
    print(f"machine: {_cpu_line()}; engine {record['engine']['engine']} {record['engine']['precision']}, "
          f"{record['engine'].get('threads')} threads")
    print(f"slide: {args.slide.name}, {record['input']['level0_width_px']} × {record['input']['level0_height_px']} px at "
          f"{record['input']['mpp']} µm/px, {tissue_mm2:.2f} mm² of tissue; model {record['model']['path']}")
    print(f"tiles: {record['tiles'].get('tiles_computed')} of {record['tiles'].get('tiles_total')} computed, "
          f"{record['stats'].get('megapixels_computed')} MP of tile cores\n")
    print(f"| stage | calls | seconds | CPU seconds | share of wall |")
    print(f"|---|---|---|---|---|")
    rows = []
    for stage in dict.fromkeys(s for _, _, s in STAGES):
        if timers.calls.get(stage):
            rows.append({"stage": stage, "calls": timers.calls[stage], "seconds": round(timers.wall[stage], 2),
                         "cpu_seconds": round(timers.cpu[stage], 2)})
            print(f"| {stage} | {timers.calls[stage]} | {timers.wall[stage]:.2f} | {timers.cpu[stage]:.2f} | "
                  f"{timers.wall[stage] / wall:.0%} |")
    print(f"| **whole command** (model load included) | 1 | **{wall:.2f}** | {time.process_time():.2f} | 100% |\n")
    mp_s = record["stats"].get("megapixels_computed", 0) / max(timers.wall.get("network", 1e-9), 1e-9)
    summary = {"seconds": round(wall, 2), "s_per_mm2": round(wall / tissue_mm2, 3), "nuclei": nuclei,
               "nuclei_per_s": round(nuclei / wall), "peak_rss_gib": round(peak_gib, 2), "network_mp_per_s": round(mp_s, 2),
               "tissue_mm2": round(tissue_mm2, 2), "machine": _cpu_line(), "stages": rows}
    print(f"{wall:.1f} s for {tissue_mm2:.2f} mm² of tissue: **{wall / tissue_mm2:.2f} s/mm²**, {nuclei} nuclei "
          f"({nuclei / wall:.0f} nuclei/s), peak memory {peak_gib:.2f} GiB, network {mp_s:.2f} MP/s of tile cores")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
