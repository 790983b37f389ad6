"""`wsiproc train`: a detector from annotated images: a lab's fine-tuning, the shipped recipe, or the paper's."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import UsageError


@click.command()
@click.option("--images", "images_spec", help="A lab's images: folder, file or glob (with --points and --mpp).")
@click.option("--points", "points_spec", help="Their annotations: file, folder or glob (CSV, QuPath GeoJSON points "
              "and regions, CellCounter XML, ImageScope XML, label maps).")
@click.option("--mpp", type=float, help="Pixel size of the images in µm/px.")
@click.option("--held-out", "held_out_spec", help="Images kept for the final check (folder, file or glob; annotated in "
              "--points). Default: every fifth image by name (the last one where there are 2–4).")
@click.option("--domains", "domains_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML file of domains (a lab's images, or built-in data sets; see configs/domains.yaml).")
@click.option("--data", "data_root", type=click.Path(file_okay=False, path_type=Path),
              help="Root of the built-in annotated data sets (../shared/data), for --domains entries and --shipped-share.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--init-model", help="Start from this model: a shipped name (default, lean, unet) or a .keras file.")
@click.option("--recipe", type=click.Choice(["fine-tune", "shipped", "paper"]), default=None,
              help="Default: fine-tune with --init-model, else shipped (the four-domain recipe of the shipped model).")
@click.option("--arch", type=click.Choice(["paper", "vgg-lean", "unet", "unet32"]), default="paper", show_default=True,
              help="Network to train from scratch (see the model card); ignored with --init-model.")
@click.option("--init-vgg16", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ImageNet VGG-16 block 1–2 weights (.npz, torchvision's, as in ../shared/data/vgg16-imagenet); paper and vgg-lean.")
@click.option("--freeze-vgg", is_flag=True, help="Keep the VGG-16 layers fixed (as in the paper, with --init-vgg16).")
@click.option("--steps", type=int, help="Training steps (the recipe's budget unless --minutes is given).")
@click.option("--minutes", type=float, help="Wall-time budget instead of (or besides) --steps.")
@click.option("--lr", type=float, help="Learning rate (divided by 10 for the last 30 % of the budget).")
@click.option("--batch-size", type=int)
@click.option("--crop-px", type=int, help="Crop side at 0.5 µm/px (a multiple of 8).")
@click.option("--trainable", type=click.Choice(["all", "after-stem"]), help="Layers that learn (after-stem: VGG blocks 1–2 kept).")
@click.option("--shipped-share", type=float, help="Share of each batch from the built-in data sets (needs --data).")
@click.option("--precision", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True,
              help="auto: bfloat16 on CPUs with AMX or AVX512-BF16, else float32.")
@click.option("--workers", type=int, default=0, show_default=True, help="Processes making batches (0: a thread; more on many-core machines).")
@click.option("--checkpoint-s", type=float, default=180.0, show_default=True, help="Seconds between checkpoints.")
@click.option("--seed", type=int)
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), help="Checkpoint folder (default: <out>_checkpoints); rerun to resume.")
@click.option("--task", type=click.Choice(["auto", "detection", "classes", "both"]), default="auto", show_default=True,
              help="What to teach: the detector, the nucleus-type head (on the frozen trunk of --init-model), or both in "
              "turn; auto: both where the labels name classes (epithelial, inflammatory, stromal), else the detector.")
@click.option("--class-map", "class_map_spec", help="Your label names → classes, e.g. 'Tumor cells=epithelial,TILs=inflammatory,"
              "Unsure=ignore' (names the data sets and QuPath use are known already).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(images_spec: str | None, points_spec: str | None, mpp: float | None, held_out_spec: str | None, domains_file: Path | None,
          data_root: Path | None, out_path: Path, init_model: str | None, recipe: str | None, arch: str, init_vgg16: Path | None,
          freeze_vgg: bool, steps: int | None, minutes: float | None, lr: float | None, batch_size: int | None,
          crop_px: int | None, trainable: str | None, shipped_share: float | None, precision: str, workers: int,
          checkpoint_s: float, seed: int | None, work: Path | None, task: str, class_map_spec: str | None, quiet: bool) -> None:
    """Train a detector on annotated images, then check it on held-out images against the model it started from.

    \b
    Fine-tune the shipped model on a lab's own points (minutes on a CPU):
      wsiproc train --images lab/ --points lab.geojson --mpp 0.5 --init-model default --out lab.keras
    Teach the shipped model your lab's nucleus types (points with classes; the detector stays as it is):
      wsiproc train --images lab/ --points lab.geojson --mpp 0.5 --init-model default --task classes --out lab.keras
    Retrain the shipped default from scratch (configs/domains.yaml: the four built-in data sets):
      wsiproc train --domains configs/domains.yaml --init-vgg16 vgg16_block1_2.npz --task detection --out default.keras
    Rerunning the same command resumes from the last checkpoint.
    """
    from ..detection.classes import ClassMap
    from ..detection.model import resolve_model_path
    from ..learn.annotated import builtin_domain, lab_domain, load_domains
    from ..learn.datasets import DOMAINS
    from ..learn.trainer import RECIPES, Start, step_progress
    from ..learn.train_domains import provenance_path, train_on_domains

    lab_given = [v is not None for v in (images_spec, points_spec, mpp)]
    if any(lab_given) and not all(lab_given):
        raise UsageError("--images, --points and --mpp go together")
    if not any(lab_given) and domains_file is None:
        raise UsageError("give a lab's images (--images, --points, --mpp) or --domains FILE")
    if init_vgg16 is not None and arch not in ("paper", "vgg-lean"):
        raise UsageError(f"--init-vgg16 needs a network with a VGG stem (paper, vgg-lean), not {arch}")
    if freeze_vgg and init_vgg16 is None:
        raise UsageError("--freeze-vgg needs --init-vgg16: frozen random layers learn nothing")
    start_path = None
    if init_model is not None:
        try:
            start_path = resolve_model_path(init_model)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        if not start_path.is_file():
            raise UsageError(f"{start_path}: model file not found")
    name = recipe or ("fine-tune" if start_path is not None else "shipped")
    try:
        chosen = RECIPES[name].replace(steps=steps, minutes=minutes, learning_rate=lr, batch_size=batch_size,
                                       crop_px=crop_px, trainable=trainable, shipped_share=shipped_share, seed=seed)
        if minutes is not None and steps is None:
            chosen = chosen.replace(steps=10**9)  # --minutes alone: the time budget decides
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    domains = load_domains(domains_file, data_root) if domains_file is not None else []
    if all(lab_given):
        domains.append(lab_domain("lab", images_spec, points_spec, mpp, held_out_spec))  # type: ignore[arg-type]
    elif held_out_spec:
        raise UsageError("--held-out goes with --images (in a domains file, use held_out or held_out_images)")
    check_domains = list(domains)
    if chosen.shipped_share > 0:
        if data_root is None:
            raise UsageError("--shipped-share needs --data: the built-in data sets' root")
        present = {d.name for d in domains}
        domains += [builtin_domain(n, data_root) for n in DOMAINS if n not in present]
    if name == "paper" and len(domains) > 1:
        raise UsageError("the paper's recipe trains on one domain; give one")

    try:
        class_map = ClassMap.parse(class_map_spec)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    start = Start(init_model=start_path, arch=arch, vgg16_weights=init_vgg16, freeze_vgg=freeze_vgg)
    update, close = step_progress(out_path.name) if not quiet else (None, lambda: None)
    try:
        result = train_on_domains(domains, out_path, chosen, start, work_dir=work, precision=precision, workers=workers,
                                  checkpoint_s=checkpoint_s, check_domains=check_domains, progress=update,
                                  echo=lambda line: click.echo(line, err=True), task=task, class_map=class_map)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    finally:
        close()
    t = result.provenance.get("training")
    if t is not None:
        history = t["history"]
        click.echo(f"saved {out_path}: {t['steps']} steps in {t['seconds'] / 60:.1f} min ({result.provenance['precision']})"
                   + (f", loss {history[0]['loss']:.4f} → {history[-1]['loss']:.4f}" if history else ""))
    head = result.provenance.get("class_head") or {}
    if head.get("retrained", True) and "examples_per_class" in head:
        per_class = ", ".join(f"{c} {n}" for c, n in head["examples_per_class"].items())
        click.echo(f"saved {out_path}: class head on {head['images']} images ({per_class} labelled examples, all views)")
    click.echo(result.table())
    click.echo(f"record: {provenance_path(out_path)}")
