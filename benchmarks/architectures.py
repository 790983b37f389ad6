"""The networks side by side: cost, CPU speed per engine, training time and held-out accuracy, from one run here.

    python benchmarks/architectures.py                                    # the shipped models
    python benchmarks/architectures.py --models paper=runs/gpu2/paper/model.keras,vgg-lean=runs/gpu2/vgglean/model.keras \
        --histories runs/gpu2                                             # equal-budget training runs

Per model: multiply-adds per input pixel (convolutions, from the layers), CPU MP/s of tile cores for each engine
and precision (TensorFlow and OpenVINO float32: the same arithmetic, so their ratio is the network's; OpenVINO
bfloat16 and int8: what a run uses where the CPU has them; the int8 model is the one beside the `.keras`, else
quantized here with `wsiproc quantize`'s default recipe), the ratio to the paper's network on the same engine and
precision, the fastest path of each network and its ratio to the paper's fastest, the training time to reach
the paper network's final loss (from the runs' `state.json`, when `--histories DIR` holds
`DIR/<label>/state.json`), and per-domain held-out F1 through the product's pipeline (`benchmarks/accuracy.py`). Speed: 4 tiles of 512² cores with each model's own halo, cut
from real MoNuSeg H&E, best of 3 after a warm-up, nothing else running.

Other CPUs: oneDNN, under both engines, takes a cap on the instructions it may use, so one machine can show
what a CPU without AMX (`ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI`) or without VNNI (`AVX512_CORE`) would do; the
header names the cap. Under a cap bfloat16 is emulated (slow) and never the fastest; `AVX2` fails in OpenVINO's
pooling, so an AVX2-only CPU cannot be shown this way.

    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI python benchmarks/architectures.py --no-accuracy
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import evaluate_model  # noqa: E402
from throughput import int8_model  # noqa: E402

from wsiproc.learn import datasets  # noqa: E402
from wsiproc.config import RunConfig  # noqa: E402


def cpu_name() -> str:
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
        have = set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in have)
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"{model} ({flags}; {len(os.sched_getaffinity(0))} cores)" + (f", oneDNN capped at {cap}" if cap else "")


def tiles_for(halo_px: int, data: Path, n: int = 4, core_px: int = 512) -> np.ndarray:
    from wsiproc.io.resample import rescale_rgb

    side = core_px + 2 * halo_px
    ims = datasets.domain("monuseg", data, "held_out")[:n]
    out = []
    for im in ims:
        rgb = rescale_rgb(im.read_rgb(), im.mpp, 0.5)
        rgb = np.pad(rgb, ((0, max(0, side - rgb.shape[0])), (0, max(0, side - rgb.shape[1])), (0, 0)), mode="reflect")
        out.append(rgb[:side, :side])
    return np.stack(out)


def speed_mp_s(predictor, tiles: np.ndarray, core_px: int = 512, repeats: int = 3) -> float:
    predictor(tiles)  # warm-up: compile, allocate
    best = min(_timed(predictor, tiles) for _ in range(repeats))
    return len(tiles) * core_px**2 / 1e6 / best


def _timed(predictor, tiles) -> float:
    t0 = time.perf_counter()
    predictor(tiles)
    return time.perf_counter() - t0


def _fastest_cell(speeds: dict[tuple[str, str], float], label: str, ref_label: str) -> str:
    """The fastest engine/precision measured for `label`, and its speed over the reference network's fastest."""
    def fastest(lab: str) -> tuple[str, float] | None:
        mine = {p: v for (m, p), v in speeds.items() if m == lab}
        return max(mine.items(), key=lambda kv: kv[1]) if mine else None

    best, ref = fastest(label), fastest(ref_label)
    return f"{best[0]} {best[1]:.3f} (× {best[1] / ref[1]:.1f})" if best and ref else "–"


def time_to_loss(history_file: Path, target: float) -> str:
    if not history_file.is_file():
        return "–"
    hist = json.loads(history_file.read_text())["history"]
    hit = next((h for h in hist if h["loss"] <= target), None)
    return f"{hit['seconds']:.0f} s ({hit['step']} steps)" if hit else f"not in {hist[-1]['seconds']:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="paper=default,vgg-lean=lean,unet=unet", help="label=name-or-path, comma-separated; the first is the reference")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--engines", default="tensorflow/float32,openvino/float32,openvino/bfloat16,openvino/int8",
                    help="engine/precision, comma-separated; the first also scores the accuracy")
    ap.add_argument("--histories", type=Path, default=None, help="folder with <label>/state.json of equal-budget training runs")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    import keras

    from wsiproc.detection.architectures import geometry, multiply_adds_per_pixel
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import load_model, resolve_model_path

    models = [(lab, resolve_model_path(p)) for lab, p in (item.split("=", 1) for item in args.models.split(","))]
    engines = args.engines.split(",")
    work = Path(tempfile.mkdtemp(prefix="architectures-"))
    print(f"CPU: {cpu_name()}; Keras {keras.__version__}\n", flush=True)
    rows, speeds, ref_loss = [], {}, None
    if args.histories:
        ref = args.histories / models[0][0] / "state.json"
        ref_loss = json.loads(ref.read_text())["history"][-1]["loss"] if ref.is_file() else None
    for label, path in models:
        net = load_model(path)
        geo = geometry(net)
        cfg = RunConfig()
        halo = cfg.halo_for({"size_multiple_px": geo.size_multiple_px, "receptive_radius_px": geo.receptive_radius_px})
        tiles = tiles_for(halo, args.data)
        row = {"label": label, "arch": net.name, "params": net.count_params(), "macs": multiply_adds_per_pixel(net), "halo": halo}
        for path_name in engines:
            engine, precision = path_name.split("/")
            try:
                if precision == "int8":  # the IR runs as stored
                    predictor = Predictor(int8_model(Path(path), None, args.data, work), engine=engine)
                else:
                    predictor = Predictor(path, engine=engine, precision=precision)
                speeds[(label, path_name)] = speed_mp_s(predictor, tiles)
            except Exception as exc:  # an engine or precision missing here is reported, not fatal
                print(f"{label} {path_name}: not measured ({exc})")
        row["train"] = time_to_loss(args.histories / label / "state.json", ref_loss) if ref_loss else "–"
        if not args.no_accuracy:
            engine, precision = engines[0].split("/")
            predictor = Predictor(path, engine=engine, precision=precision)
            row["acc"] = evaluate_model(label, predictor, RunConfig(tissue_mask=False), args.data, list(datasets.DOMAINS), 5.0, None, False)
        rows.append(row)
        print(f"{label}: done", flush=True)
    ref_label = models[0][0]
    head = ["model", "network", "parameters", "multiply-adds / px", "halo px"]
    head += [f"{e} MP/s (× {ref_label})" for e in engines] + [f"fastest here (× {ref_label}'s fastest)"]
    head += ["time to paper's final loss"]
    if not args.no_accuracy:
        head += [f"{d} F1 (P/R)" for d in datasets.DOMAINS]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["label"], r["arch"], f"{r['params'] / 1e6:.2f} M", f"{r['macs'] / 1e3:.0f} k", str(r["halo"])]
        for e in engines:
            s, base = speeds.get((r["label"], e)), speeds.get((ref_label, e))
            cells.append(f"{s:.3f} (× {s / base:.1f})" if s and base else "–")
        cells.append(_fastest_cell(speeds, r["label"], ref_label))
        cells.append(r["train"])
        if "acc" in r:
            cells += [f"**{s.f1:.3f}** ({s.precision:.2f}/{s.recall:.2f})" for s in r["acc"].values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
