"""Train the shipped default model on the 16 MoNuSeg training images (split fixed in wsiproc.learn.datasets).

    python benchmarks/train_default.py --data ../shared/data/monuseg-train --out wsiproc/models/default.keras \
        --work runs/default [--epochs N --steps-per-epoch N --lr …]

Resumable: rerun the same command after an interruption and it continues from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time

from wsiproc.learn import datasets
from wsiproc.learn.trainer import train
from wsiproc.learn.training import TrainConfig, TrainingImage


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/monuseg-train")
    ap.add_argument("--out", default="wsiproc/models/default.keras")
    ap.add_argument("--work", default="runs/default")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--block-px", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--background-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = TrainConfig(
        block_px=args.block_px, batch_size=args.batch_size, epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch, learning_rate=args.lr,
        background_fraction=args.background_fraction, seed=args.seed,
    )
    images = [TrainingImage.from_level0(a.name, a.read_rgb(), a.points_xy, a.mpp) for a in datasets.monuseg(args.data, "train")]
    print(f"{len(images)} training images, {sum(len(i.points_xy) for i in images)} nuclei", flush=True)
    t0 = time.time()
    state = train(images, args.out, cfg, checkpoint_dir=args.work, verbose=2)
    print(json.dumps({"epochs": state["epoch"], "seconds_this_call": round(time.time() - t0),
                      "last_loss": state["history"][-1]["loss"] if state["history"] else None}))


if __name__ == "__main__":
    main()
