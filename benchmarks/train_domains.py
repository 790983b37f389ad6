"""Train a detector on the four annotated domains (the shipped model's recipe), on the CPU or a GPU.

    # 1. pack every domain's training part at 0.5 µm/px into one file (lossless WebP, JPEG sources as JPEG 95)
    python benchmarks/train_domains.py pack --data ../shared/data --out runs/pack.npz
    # 2. train; resumes from runs/NAME/last.keras when it exists; stops after --minutes or --steps
    python benchmarks/train_domains.py train --pack runs/pack.npz --arch unet --out runs/unet --minutes 60
    python benchmarks/train_domains.py train --pack runs/pack.npz --arch paper --init-vgg16 \
        ../shared/data/vgg16-imagenet/vgg16_block1_2.npz --lr 3e-4 --out runs/paper
    # 3. continue the committed model
    python benchmarks/train_domains.py train --pack runs/pack.npz --init-model wsiproc/models/default.keras ...

Recipe: equal sampling of the domains (`training.DomainSampler`), 128² crops, disk targets of radius 4 px,
flips, turns, HED stain jitter, brightness/contrast, blur and resolution jitter (0.45–0.55 µm/px), Adam,
binary cross-entropy, the learning rate divided by 10 for the last 30 % of the budget. Batches are made in
worker processes (spawned before the backend starts), seeded by step so a resumed run sees the same data.
Runs with any Keras 3 backend: `KERAS_BACKEND=jax` trains on a GPU machine that has no TensorFlow.
Writes `last.keras` (with optimiser state) and `state.json` every `--checkpoint-s` seconds, and `model.keras`
(weights only, float32) at the end.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_SAMPLER = None


def pack(data: Path, out: Path) -> None:
    from PIL import Image

    from wsiproc.learn import datasets
    from wsiproc.learn.training import TrainingImage

    arrays: dict[str, np.ndarray] = {}
    for name in datasets.DOMAINS:
        for i, a in enumerate(datasets.domain(name, data, "train")):
            im = TrainingImage.from_level0(a.name, a.read_rgb(), a.points_xy, a.mpp)
            buf = io.BytesIO()
            if a.path.suffix.lower() in (".jpg", ".jpeg"):
                # Already JPEG (brca-m2c, quality 95, 4:4:4): lossless WebP would inflate it 3×; JPEG 95 4:4:4 adds little.
                Image.fromarray(im.rgb).save(buf, format="JPEG", quality=95, subsampling=0)
            else:
                Image.fromarray(im.rgb).save(buf, format="WEBP", lossless=True, quality=50)
            arrays[f"{name}/{i:03d}/image"] = np.frombuffer(buf.getvalue(), np.uint8)
            arrays[f"{name}/{i:03d}/points_xy"] = im.points_xy.astype(np.float32)
        print(f"{name}: {i + 1} images", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")


def load_pack(path: Path, domains: list[str] | None = None) -> dict:
    from PIL import Image

    from wsiproc.learn.training import TrainingImage

    out: dict[str, list] = {}
    with np.load(path) as data:
        for key in sorted(k for k in data.files if k.endswith("/image")):
            name, i, _ = key.split("/")
            if domains and name not in domains:
                continue
            rgb = np.asarray(Image.open(io.BytesIO(data[key].tobytes())).convert("RGB"))
            out.setdefault(name, []).append(TrainingImage(f"{name}/{i}", rgb, data[f"{name}/{i}/points_xy"].astype(np.float64)))
    return out


def _init_worker(pack_path: str, domains: list[str] | None, crop: int, batch: int, radius: float, flips_only: bool, seed: int) -> None:
    global _SAMPLER
    from wsiproc.learn.training import AugmentConfig, DomainSampler

    aug = AugmentConfig.flips_only() if flips_only else AugmentConfig()
    _SAMPLER = DomainSampler(load_pack(Path(pack_path), domains), crop, batch, radius, aug, seed)


def _make_batch(step: int):
    return _SAMPLER.batch(0, step)


def train(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file, last = out / "state.json", out / "last.keras"
    state = json.loads(state_file.read_text()) if state_file.is_file() and last.is_file() else {"step": 0, "seconds": 0.0, "history": []}
    domains = args.domains.split(",") if args.domains else None
    ctx = mp.get_context("spawn")
    pool = ctx.Pool(args.workers, _init_worker, (args.pack, domains, args.crop, args.batch, args.radius, args.flips_only, args.seed))

    import keras

    from wsiproc.detection import architectures

    keras.utils.set_random_seed(args.seed)
    if last.is_file() and state["step"] > 0:
        model = keras.models.load_model(last, compile=True, safe_mode=True)
        print(f"resumed {last} at step {state['step']}", flush=True)
    else:
        if args.init_model:
            model = keras.models.load_model(args.init_model, compile=False, safe_mode=True)
        else:
            model = architectures.build(args.arch)
            if args.init_vgg16:
                architectures.load_vgg16_npz(model, args.init_vgg16, freeze=args.freeze_vgg)
        model.compile(optimizer=keras.optimizers.Adam(args.lr), loss="binary_crossentropy")
    print(f"{model.name}: {model.count_params()} parameters, backend {keras.backend.backend()}", flush=True)

    budget_s = args.minutes * 60 if args.minutes else None
    t_start = time.perf_counter()
    seconds_before = state["seconds"]
    total_steps = args.steps

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - t_start

    def progress() -> float:
        if total_steps:
            return state["step"] / total_steps
        return elapsed() / budget_s if budget_s else 0.0

    def save_checkpoint(model) -> None:
        tmp = last.with_name(".last.partial.keras")
        model.save(tmp)
        os.replace(tmp, last)
        state["seconds"] = elapsed()
        tmp_state = state_file.with_suffix(".partial")
        tmp_state.write_text(json.dumps(state, indent=1))
        os.replace(tmp_state, state_file)

    class Control(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.t_ckpt = time.perf_counter()
            self.losses: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            state["step"] += 1
            self.losses.append(float(logs["loss"]))
            lr = args.lr * (0.1 if progress() >= 0.7 else 1.0)
            if abs(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)) - lr) > 1e-12:
                self.model.optimizer.learning_rate.assign(lr)
            if state["step"] % 100 == 0:
                state["history"].append({"step": state["step"], "seconds": round(elapsed(), 1),
                                         "loss": float(np.mean(self.losses[-100:])), "lr": lr})
                print(json.dumps(state["history"][-1]), flush=True)
            if time.perf_counter() - self.t_ckpt > args.checkpoint_s:
                save_checkpoint(self.model)
                self.t_ckpt = time.perf_counter()
            if progress() >= 1.0:
                self.model.stop_training = True

    def batches():
        # At most 2 batches per worker wait: `imap` over an endless range has no back-pressure, and where the
        # model is slower than the workers (a CPU), its queue grows until the process runs out of memory.
        pending: deque = deque()
        step = state["step"]
        while True:
            while len(pending) < 2 * args.workers:
                pending.append(pool.apply_async(_make_batch, (step,)))
                step += 1
            yield pending.popleft().get()

    model.fit(batches(), steps_per_epoch=10**6, epochs=1, callbacks=[Control()], verbose=0)
    pool.terminate()
    save_checkpoint(model)
    final = keras.Model.from_config(model.get_config())  # uncompiled: no optimiser state in the shipped file
    final.set_weights(model.get_weights())
    tmp = out / ".model.partial.keras"
    final.save(tmp)
    os.replace(tmp, out / "model.keras")
    print(f"done: {state['step']} steps in {elapsed():.0f} s -> {out / 'model.keras'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--data", type=Path, default=Path("../shared/data"))
    p.add_argument("--out", type=Path, default=Path("runs/pack.npz"))
    t = sub.add_parser("train")
    t.add_argument("--pack", default="runs/pack.npz")
    t.add_argument("--arch", default="unet")
    t.add_argument("--out", required=True)
    t.add_argument("--domains", default=None, help="comma-separated subset (leave-one-out bases for adaptation)")
    t.add_argument("--init-vgg16", default=None, help="the shared ImageNet VGG-16 block 1–2 .npz")
    t.add_argument("--freeze-vgg", action="store_true", help="keep the VGG stem fixed (the paper)")
    t.add_argument("--init-model", default=None, help="start from this .keras model's weights")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--crop", type=int, default=128)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--radius", type=float, default=4.0)
    t.add_argument("--flips-only", action="store_true", help="no augmentation but flips and turns (ablation)")
    t.add_argument("--minutes", type=float, default=None)
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    t.add_argument("--checkpoint-s", type=float, default=180)
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(args.data, args.out)
    else:
        if not (args.minutes or args.steps):
            ap.error("give --minutes or --steps")
        train(args)


if __name__ == "__main__":
    main()
