"""Reduced precision against float32 on every held-out domain: the rule `--precision auto` follows, measured.

    python benchmarks/precision.py [--model wsiproc/models/default.keras] [--int8 X.int8.xml] [--data ../shared/data]
                                   [--domains monuseg,crc,brca,consep] [--record]

For each held-out domain (splits fixed in wsiproc.learn.datasets): F1 (5 µm, one-to-one, micro-averaged, through
`detect` as a run does) of OpenVINO float32, bfloat16 (where the CPU has it) and int8, and each one's loss
against float32. auto may use a precision only if its loss is <= 0.005 on every domain (`model_files.F1_TOLERANCE`).
The int8 model is the one beside `--model`, else `--int8`, else quantized here with the default recipe (training
splits only). `--record` writes the int8 result into the int8 model's sidecar, which is what lets
`--precision auto` pick it (the same as `wsiproc quantize --validate`).
Speed is `benchmarks/throughput.py`'s job.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from wsiproc.learn import datasets
from wsiproc.detection.engines import cpu_info, int8_path_for, openvino_version
from wsiproc.detection.model_files import F1_TOLERANCE
from wsiproc.detection.inference import Predictor
from wsiproc.detection.model import DEFAULT_MODEL_PATH
from wsiproc.learn.quantize import domain_crops, domain_f1, quantize_model, record_validation


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH)
    ap.add_argument("--int8", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--domains", default=",".join(datasets.DOMAINS))
    ap.add_argument("--record", action="store_true", help="record the int8 validation in its sidecar")
    args = ap.parse_args()
    cpu = cpu_info()
    print(f"machine: {cpu.name}, {os.cpu_count()} cores; OpenVINO {openvino_version()} sees {', '.join(cpu.openvino_capabilities)}")
    with tempfile.TemporaryDirectory() as tmp:
        int8 = args.int8 or (int8_path_for(args.model) if int8_path_for(args.model).is_file() else None)
        if int8 is None:
            t0 = time.perf_counter()
            int8 = quantize_model(args.model, domain_crops(args.data), Path(tmp) / f"{args.model.stem}.int8.xml",
                                  calibration={"domains": str(args.data)})
            print(f"int8 quantized here in {time.perf_counter() - t0:.0f} s (default recipe; not recordable)")
        predictors = {"float32": Predictor(args.model, "float32", "openvino")}
        if cpu.bf16:
            predictors["bfloat16"] = Predictor(args.model, "bfloat16", "openvino")
        predictors["int8"] = Predictor(int8, engine="openvino")
        print(f"model {args.model}; int8 {int8}\n")
        print(f"{'domain':<10} {'images':>6}" + "".join(f" {'F1 ' + k:>13}" for k in predictors) +
              "".join(f" {'loss ' + k:>13}" for k in predictors if k != "float32"))
        losses: dict[str, dict[str, float]] = {k: {} for k in predictors if k != "float32"}
        validation: dict = {"data": str(args.data.resolve()), "tolerance": F1_TOLERANCE, "domains": {}}
        for name in [d.strip() for d in args.domains.split(",") if d.strip()]:
            images = datasets.domain(name, args.data, "held_out")
            f1 = {k: domain_f1(p, images)[2] for k, p in predictors.items()}
            for k in losses:
                losses[k][name] = f1["float32"] - f1[k]
            validation["domains"][name] = {"images": len(images), "f1_float32": round(f1["float32"], 5),
                                           "f1_int8": round(f1["int8"], 5), "f1_loss": round(losses["int8"][name], 5)}
            print(f"{name:<10} {len(images):>6}" + "".join(f" {v:>13.4f}" for v in f1.values()) +
                  "".join(f" {losses[k][name]:>+13.4f}" for k in losses))
        print()
        for k, per_domain in losses.items():
            worst = max(per_domain.values())
            print(f"{k}: worst F1 loss {worst:+.4f} -> auto {'may' if worst <= F1_TOLERANCE else 'may NOT'} use it "
                  f"(tolerance {F1_TOLERANCE}, {len(per_domain)} domain(s))")
        if args.record:
            if Path(tmp) in Path(int8).parents:
                print("--record: the int8 model was made here in a temporary folder; nothing recorded")
            else:
                validation["passed"] = max(losses["int8"].values()) <= F1_TOLERANCE
                record_validation(int8, validation)
                print(f"recorded in {int8}.json")


if __name__ == "__main__":
    main()
