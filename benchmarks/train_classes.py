"""The shipped class head: trained on the frozen trunk of the shipped detector, from BRCA-M2C and CoNSeP labels.

    python benchmarks/train_classes.py --out runs/classes/default.keras           # tune on BRCA val, then train
    python benchmarks/train_classes.py --out X.keras --no-tune --epochs 20

Training labels: BRCA-M2C train (80 images), CoNSeP train without its fixed held-out images (21); BRCA-M2C's
validation split (10 images, the authors') chooses the recipe (patch accuracy of the as-is view), then the head
is trained again on train + validation. The test split and CoNSeP's held-out images are never seen here:
`benchmarks/classes.py` scores them. Trunk features are cached under `--work` (one .npz per image), so a rerun
only trains. The same library calls are what `wsiproc train --task classes` runs on a lab's labels.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.architectures import cpu_name  # noqa: E402
from wsiproc.detection.architectures import without_class_head  # noqa: E402
from wsiproc.detection.classes import CLASSES, ClassMap  # noqa: E402
from wsiproc.detection.model import DEFAULT_MODEL_PATH, load_model, save_model  # noqa: E402
from wsiproc.io.files import file_sha256  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.class_head import (Examples, HeadRecipe, LabelledImage, collect_examples, train_head,  # noqa: E402
                                      with_trained_head, write_provenance)

CANDIDATES = [dict(), dict(width=128), dict(balanced=True), dict(feature_dropout=0.5)]


def labelled(images) -> list[LabelledImage]:
    cmap = ClassMap()
    return [LabelledImage.from_level0(im.name, im.read_rgb(), im.points_xy, cmap.indices(im.labels, im.name), im.mpp)
            for im in images]


def first_view(ex: Examples, views: int) -> Examples:
    """The examples of the as-is view only (each image's examples are its views one after the other)."""
    keep = np.zeros(len(ex), bool)
    for i in np.unique(ex.image):
        rows = np.flatnonzero(ex.image == i)
        keep[rows[: len(rows) // views]] = True
    return Examples(ex.features[keep], ex.labels[keep], ex.image[keep], ex.names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL_PATH, help="the detector whose trunk the head reads")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--work", type=Path, default=Path("runs/classes/features"))
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    print(f"machine: {cpu_name()}")
    base = without_class_head(load_model(args.model))
    recipe = HeadRecipe(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr)
    with open(args.data / "brca-m2c" / "split.csv", newline="") as fh:
        official = {r["image"]: r["split"] for r in csv.DictReader(fh)}
    brca = datasets.domain("brca", args.data, "train")
    groups = {"brca_train": [im for im in brca if official[im.name] == "train"],
              "brca_val": [im for im in brca if official[im.name] == "val"],
              "consep_train": datasets.domain("consep", args.data, "train")}
    t0 = time.perf_counter()
    examples = {g: collect_examples(base, labelled(ims), recipe, cache_dir=args.work / g) for g, ims in groups.items()}
    print(f"features: {', '.join(f'{g} {len(e)}' for g, e in examples.items())} examples in {time.perf_counter() - t0:.0f} s")
    train = Examples.concat([examples["brca_train"], examples["consep_train"]])
    val = first_view(examples["brca_val"], recipe.views)
    tuning = []
    if not args.no_tune:
        majority = np.bincount(val.labels, minlength=len(CLASSES)).max() / len(val)
        print(f"\n| recipe change | BRCA val accuracy |\n|---|---|\n| majority class | {majority:.3f} |")
        for change in CANDIDATES:
            _, res = train_head(train, recipe.replace(**change), val)
            tuning.append({"change": change, "val_accuracy": round(res.val_accuracy, 4), "seconds": res.seconds})
            print(f"| {json.dumps(change) if change else 'as above'} | {res.val_accuracy:.3f} |", flush=True)
        best = max(tuning, key=lambda t: t["val_accuracy"])
        recipe = recipe.replace(**best["change"])
        print(f"\nchosen: {best['change'] or 'as above'}")
    final = Examples.concat([examples["brca_train"], examples["brca_val"], examples["consep_train"]])
    head, result = train_head(final, recipe, echo=print)
    model = with_trained_head(base, head)
    save_model(model, args.out, float16=True)
    write_provenance(args.out, {"command": "benchmarks/train_classes.py", "trunk": str(args.model),
                                "trunk_sha256": file_sha256(args.model), "model_sha256": file_sha256(args.out),
                                "recipe": recipe.__dict__, "tuning_on_brca_val": tuning,
                                "training_images": {g: [im.name for im in ims] for g, ims in groups.items()},
                                **result.to_dict()})
    print(f"saved {args.out} (float16) and {args.out.with_suffix('.classes.json')}")


if __name__ == "__main__":
    main()
