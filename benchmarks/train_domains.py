"""Train a detector on the built-in annotated domains with the shipped recipe: a thin caller of `wsiproc train`'s code.

    # the shipped default (paper network, ImageNet VGG-16 start, 4 980 steps of 32 crops, lr 1e-4)
    python benchmarks/train_domains.py --arch paper --init-vgg16 ../shared/data/vgg16-imagenet/vgg16_block1_2.npz \
        --out runs/paper
    # a leave-one-out base for adaptation (three domains), a U-Net, one hour
    python benchmarks/train_domains.py --arch unet --domains monuseg,brca,consep --lr 1e-3 --minutes 60 --out runs/loo/crc
    # continue a model
    python benchmarks/train_domains.py --init-model wsiproc/models/default.keras --steps 1000 --out runs/more

The same as `wsiproc train --domains configs/domains.yaml …` (`wsiproc.learn.train_domains.train_on_domains` with
`RECIPES["shipped"]`): equal sampling of the domains, 128² crops, disk targets of radius 4 px, the augmentations,
Adam with the rate divided by 10 for the last 30 % of the budget, bfloat16 on CPUs that have it. Runs with any
Keras 3 backend (`KERAS_BACKEND=jax` on a GPU machine without TensorFlow); `--workers` processes make batches.
Writes `last.keras` and `state.json` into `--out` every `--checkpoint-s` seconds (rerun to resume), and
`model.keras` (float32) with its record `model.json` (recipe, domains, history, held-out check) at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.annotated import builtin_domain  # noqa: E402
from wsiproc.learn.trainer import RECIPES, Start, step_progress  # noqa: E402
from wsiproc.learn.train_domains import train_on_domains  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--domains", default=",".join(datasets.DOMAINS), help="comma-separated subset (leave-one-out bases)")
    ap.add_argument("--arch", default="paper")
    ap.add_argument("--init-vgg16", type=Path, default=None)
    ap.add_argument("--freeze-vgg", action="store_true")
    ap.add_argument("--init-model", type=Path, default=None)
    ap.add_argument("--out", type=Path, required=True, help="folder: checkpoints, model.keras and model.json")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--crop", type=int, default=None)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--checkpoint-s", type=float, default=180)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args()
    recipe = RECIPES["shipped"].replace(steps=args.steps, minutes=args.minutes, learning_rate=args.lr,
                                        batch_size=args.batch, crop_px=args.crop, seed=args.seed)
    if args.minutes is not None and args.steps is None:
        recipe = recipe.replace(steps=10**9)
    domains = [builtin_domain(name, args.data) for name in args.domains.split(",")]
    update, close = step_progress(args.out.name)
    try:
        result = train_on_domains(domains, args.out / "model.keras", recipe,
                                  Start(args.init_model, args.arch, args.init_vgg16, args.freeze_vgg),
                                  work_dir=args.out, precision=args.precision, workers=args.workers,
                                  checkpoint_s=args.checkpoint_s, progress=update)
    finally:
        close()
    print(result.table())


if __name__ == "__main__":
    main()
