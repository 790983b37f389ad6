"""Fine-tuning the shipped model on a lab's own points: held-out F1 and time against the number of annotated images.

    python benchmarks/fine_tune.py                       # 1, 2, 3, 4, 8 and all 40 crc-dev training images
    python benchmarks/fine_tune.py --images 3 --steps 100 --lr 3e-4 --out benchmarks/results/fine_tune_3.md

crc-dev plays the lab: its annotators mark nuclei differently from the other three labs, and the shipped model
over-detects there (precision about 0.68). For each count n, n training images spread evenly over crc-dev's 40
training images (indices round(linspace(0, 39, n)): fixed by position, never by score) fine-tune the shipped model
with `wsiproc train`'s defaults (`RECIPES["fine-tune"]`, through the same `train_on_domains`); the result is
scored on crc-dev's 10 held-out images (every fifth), and on the other three domains' held-out images: what a
lab-specific model loses elsewhere is information, not a failure. Models run as `wsiproc run` runs them (the
shipped model as its validated int8 IR, a fine-tuned one as OpenVINO picks for it). The CPU is named in the output.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from architectures import cpu_name  # noqa: E402  (benchmarks/architectures.py)

from wsiproc.detection.model import DEFAULT_MODEL_PATH  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.annotated import Domain, builtin_domain  # noqa: E402
from wsiproc.learn.check import check  # noqa: E402
from wsiproc.learn.trainer import RECIPES, Start, cpu_has_bfloat16  # noqa: E402
from wsiproc.learn.train_domains import train_on_domains  # noqa: E402


def spread(images: list, n: int) -> list:
    return [images[i] for i in np.unique(np.linspace(0, len(images) - 1, n).round().astype(int))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--images", default="1,2,3,4,8,40", help="numbers of crc-dev training images, comma-separated")
    ap.add_argument("--steps", type=int, default=None, help="default: the fine-tune recipe's")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--trainable", default=None)
    ap.add_argument("--shipped-share", type=float, default=None,
                    help="mix the other three domains' training images into each batch (crc-dev's own are left out)")
    ap.add_argument("--others", default="monuseg,brca,consep", help="other domains to score ('' for none)")
    ap.add_argument("--work", type=Path, default=Path("runs/fine_tune"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fine_tune.md"))
    args = ap.parse_args()

    recipe = RECIPES["fine-tune"].replace(steps=args.steps, learning_rate=args.lr, trainable=args.trainable,
                                          shipped_share=args.shipped_share)
    crc_train = datasets.domain("crc", args.data, "train")
    crc_held = tuple(datasets.domain("crc", args.data, "held_out"))
    others = [Domain(n, (), tuple(datasets.domain(n, args.data, "held_out")), builtin=True)
              for n in args.others.split(",") if n]
    header = [f"CPU: {cpu_name()}; bfloat16 training: {cpu_has_bfloat16()}",
              f"recipe: {recipe.to_dict()}", ""]
    print("\n".join(header), flush=True)
    t0 = time.perf_counter()
    base_other = {c.domain: c.scores["after"] for c in check(others, {"after": DEFAULT_MODEL_PATH})}
    print(f"shipped model on the other domains: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for n in [int(v) for v in args.images.split(",")]:
        chosen = spread(crc_train, n)
        lab = Domain("crc", tuple(chosen), crc_held)
        out = args.work / f"crc_{n}.keras"
        t = time.perf_counter()
        mix = [builtin_domain(n, args.data) for n in ("monuseg", "brca", "consep")] if recipe.shipped_share else []
        result = train_on_domains([lab, *mix], out, recipe, Start(init_model=DEFAULT_MODEL_PATH), work_dir=args.work / f"crc_{n}_work",
                                  check_domains=[lab], echo=lambda line: print(line, flush=True))
        wall = time.perf_counter() - t
        crc = result.checks[0].scores
        other = {c.domain: c.scores["after"] for c in check(others, {"after": out})}
        rows.append((n, sum(len(im.points_xy) for im in chosen), result.provenance["training"]["seconds"], wall, crc, other))
        print(f"n={n}: crc-dev F1 {crc['before'].f1:.3f} -> {crc['after'].f1:.3f}, train {rows[-1][2]:.0f} s, "
              f"wall {wall:.0f} s; " + ", ".join(f"{k} {v.f1:.3f}" for k, v in other.items()), flush=True)

    def cell(s) -> str:
        return f"{s.precision:.3f} / {s.recall:.3f} / **{s.f1:.3f}**"

    lines = [*header, "| training images | nuclei | training (s) | whole command (s) | crc-dev held-out P / R / F1 | F1 change | "
             + " | ".join(f"{d.name} F1 (change)" for d in others) + " |",
             "|" + "---|" * (6 + len(others))]
    if rows:
        before = rows[0][4]["before"]
        lines.append(f"| 0 (shipped model) | 0 | – | – | {cell(before)} | – | "
                     + " | ".join(f"{base_other[d.name].f1:.3f}" for d in others) + " |")
    for n, pts, train_s, wall, crc, other in rows:
        lines.append(f"| {n} | {pts} | {train_s:.0f} | {wall:.0f} | {cell(crc['after'])} | {crc['after'].f1 - crc['before'].f1:+.3f} | "
                     + " | ".join(f"{other[d.name].f1:.3f} ({other[d.name].f1 - base_other[d.name].f1:+.3f})" for d in others) + " |")
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
