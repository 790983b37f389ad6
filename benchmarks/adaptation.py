"""Does adaptation pay off on a domain the model never saw? Base F1 → adapted F1 per recipe, plus drift elsewhere.

    # leave-one-out bases (trained without the target; see benchmarks/train_domains.py --domains)
    python benchmarks/adaptation.py --target crc  --base runs/loo/colorectal/model.keras --recipes paper,consistency
    python benchmarks/adaptation.py --target brca --base runs/loo/breast/model.keras --recipes paper,consistency
    # "just in case": adapting the shipped model on one of its own training domains must not hurt it
    python benchmarks/adaptation.py --target crc --base default --recipes consistency
    # an annotated cohort outside the built-in domains (adapted on, labels unused, then scored on itself)
    python benchmarks/adaptation.py --cohort '../shared/data/slides/monusac/*.svs' --mpp 0.1945 \
        --truth ../shared/data/slides/monusac/centroids_from_xml.csv --label monusac --base default --recipes calibrate

Protocol (issue 13): the cohort is the target domain's training part (`wsiproc.datasets`, labels unused), adapted
with `wsiproc.learn.adapt.adapt` exactly as `wsiproc adapt` does; every domain's held-out part is then scored with the
run defaults (peaks, threshold 0.5; 5 µm one-to-one matching, micro-average), for the base and each adapted model.
The other domains' rows are the drift. Per-image tables go to `--out`, with a markdown summary.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import evaluate_model, score_cell, score_domain  # noqa: E402

from wsiproc.config import RunConfig  # noqa: E402
from wsiproc.detection.images import detections_of_images  # noqa: E402
from wsiproc.evaluate.scoring import Score  # noqa: E402
from wsiproc.learn import datasets  # noqa: E402
from wsiproc.learn.adapt import AdaptConfig, adapt  # noqa: E402
from wsiproc.learn.annotated import Annotations, LabImage, lab_images  # noqa: E402

#: Recipes and the variants measured for issue 13: name → AdaptConfig fields.
VARIANTS = {
    "paper": {"recipe": "paper"},
    "consistency": {"recipe": "consistency", "student_augment": "paper"},  # as measured for issue 13
    "calibrate": {"recipe": "calibrate"},  # confidence re-calibration (and, for a foreign cohort, per-slide colours)
    "calibrate-noslides": {"recipe": "calibrate", "slide_colours": False},  # confidence re-calibration only
    "calibrate-colour": {"recipe": "calibrate", "colour": True},  # and colour alignment
    "consistency-random": {"recipe": "consistency", "random_fraction": 1.0, "colour": True},  # random blocks only
    "consistency-noalign": {"recipe": "consistency", "align": False},
    # issue 26: the student under strong colour and blur views of the teacher's pseudo-labels (noisy student), and
    # without the folded threshold that keeps the teacher's nucleus count on the cohort (adapt.drift)
    "consistency-strong": {"recipe": "consistency", "student_augment": "strong"},
    "consistency-strong-0.1": {"recipe": "consistency", "student_augment": "strong", "stain_sigma": 0.1},
    "consistency-nomatch": {"recipe": "consistency", "student_augment": "paper", "match_density": "never"},
    "consistency-strong-nomatch": {"recipe": "consistency", "student_augment": "strong", "match_density": "never"},
    "consistency-strong-always": {"recipe": "consistency", "student_augment": "strong", "match_density": "always"},
}


def cohort_of(target: str, data: Path) -> tuple[list[Path], float]:
    """The target domain's training images (their annotations stay unused) and their common pixel size."""
    images = datasets.domain(target, data, "train")
    mpps = {im.mpp for im in images}
    if len(mpps) != 1:
        raise SystemExit(f"{target}: images of several pixel sizes {sorted(mpps)}; adapt takes one --mpp")
    return [im.path for im in images], mpps.pop()


def annotated_cohort(pattern: str, truth: str, mpp: float) -> list[LabImage]:
    """The slides `pattern` names, each paired with its annotated centres and checked as `wsiproc train` checks
    a lab's images (`--truth`: any format `wsiproc evaluate` reads)."""
    paths = sorted(Path(p) for p in glob.glob(pattern))
    if not paths:
        raise SystemExit(f"{pattern}: no slides")
    return lab_images(paths, Annotations.read(truth), mpp)


def summary(target: str, base_label: str, results: dict[str, dict[str, Score]]) -> str:
    """Markdown: one row per domain, base then each recipe with its F1 change."""
    labels = list(results)
    lines = [f"| domain ({target} is the target) | " + " | ".join(f"{label} P / R / F1" for label in labels) + " |",
             "|" + "---|" * (len(labels) + 1)]
    for dom in results[base_label]:
        base_f1 = results[base_label][dom].f1
        cells = []
        for label in labels:
            s = results[label][dom]
            cells.append(score_cell(s) + ("" if label == base_label else f" ({s.f1 - base_f1:+.3f})"))
        lines.append(f"| {dom}{' (target)' if dom == target else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=list(datasets.DOMAINS), help="a built-in domain: its training part is the cohort")
    ap.add_argument("--cohort", help="instead of --target: a glob of annotated slides, adapted on and scored on")
    ap.add_argument("--truth", help="with --cohort: their annotations")
    ap.add_argument("--mpp", type=float, help="with --cohort: their pixel size")
    ap.add_argument("--base", required=True, help="a shipped model name or a .keras path (trained without the target)")
    ap.add_argument("--recipes", default="paper,consistency", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--domains", default=",".join(datasets.DOMAINS), help="domains scored (the target and the drift)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="AdaptConfig field for every recipe (repeatable), e.g. --set steps_per_epoch=300")
    ap.add_argument("--engine", default="tensorflow")
    ap.add_argument("--precision", default="float32")
    ap.add_argument("--work", type=Path, default=Path("runs/adaptation"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptation"))
    ap.add_argument("--label", default=None, help="name of this experiment in the output files (default: target_base)")
    args = ap.parse_args()
    from wsiproc.detection.inference import Predictor
    from wsiproc.detection.model import resolve_model_path

    base_path = resolve_model_path(args.base)
    if (args.target is None) == (args.cohort is None) or (args.cohort and not (args.truth and args.mpp)):
        raise SystemExit("give --target, or --cohort with --truth and --mpp")
    target = args.target or (args.label or "cohort")
    label = args.label or f"{args.target}_{Path(args.base).parent.name if args.base.endswith('.keras') else args.base}"
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        overrides[key] = json.loads(value)
    cohort = annotated_cohort(args.cohort, args.truth, args.mpp) if args.cohort else None
    paths, mpp = ([im.path for im in cohort], args.mpp) if cohort else cohort_of(args.target, args.data)
    domains = args.domains.split(",") if args.domains else []
    csv_dir = args.out / label
    csv_dir.mkdir(parents=True, exist_ok=True)
    score_cfg = RunConfig(tissue_mask=False)  # annotated crops are tissue throughout

    def score(name: str, model: Path) -> dict[str, Score]:
        t0 = time.perf_counter()
        predictor = Predictor(model, engine=args.engine, precision=args.precision)
        rows = evaluate_model(name, predictor, score_cfg, args.data, domains, 5.0, csv_dir, False)
        if cohort:
            found = detections_of_images(cohort, predictor, score_cfg)
            rows = {target: score_domain(cohort, {k: d.xy for k, d in found.items()}, 5.0)[1], **rows}
        print(f"{name}: " + ", ".join(f"{d} {s.f1:.3f}" for d, s in rows.items()) + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
        return rows

    results = {"base": score("base", base_path)}
    provenance = {}
    for recipe in args.recipes.split(","):
        cfg = AdaptConfig(**{**VARIANTS[recipe], **overrides}).validate()
        out_model = args.work / label / f"{recipe}.keras"
        out_model.parent.mkdir(parents=True, exist_ok=True)
        run_cfg = RunConfig(model_path=str(base_path), mpp=mpp, engine=args.engine, precision=args.precision).validate()
        t0 = time.perf_counter()
        prov = adapt(paths, out_model, args.work / label / f"{recipe}_work", run_cfg, cfg,
                     Predictor(base_path, engine=args.engine, precision=args.precision), echo=lambda line: None)
        print(f"{recipe}: {prov['blocks']} blocks from {len(paths)} images, mined in {prov['mining_s']} s, "
              f"fine-tuned in {prov['fine_tune_s']} s ({time.perf_counter() - t0:.0f} s)", flush=True)
        provenance[recipe] = {k: prov[k] for k in ("blocks", "mining_s", "fine_tune_s", "adapt_config", "recipe", "calibration")}
        if prov["calibration"]:
            print(f"{recipe}: calibration threshold {prov['calibration']['threshold']}, cohort share "
                  f"{prov['calibration']['cohort_confident_share']} vs {prov['calibration']['reference_share_range']}", flush=True)
        results[recipe] = score(recipe, out_model)

    table = summary(target, "base", results)
    text = (f"# Adaptation on {target}: base {base_path}\n\nCohort: {len(paths)} {target} {'slides' if cohort else 'training images'} at "
            f"{mpp} µm/px, labels unused. Scored: {'the cohort itself and ' if cohort else ''}held-out parts, run defaults, 5 µm, micro-average.\n"
            f"Engine {args.engine} {args.precision}. Overrides: {overrides or 'none'}.\n\n{table}\n")
    (args.out / f"{label}.md").write_text(text)
    (args.out / f"{label}.json").write_text(json.dumps({"base": str(base_path), "provenance": provenance, "f1": {
        name: {d: round(s.f1, 4) for d, s in rows.items()} for name, rows in results.items()}}, indent=1))
    print("\n" + text)


if __name__ == "__main__":
    main()
