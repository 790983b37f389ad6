"""The one training loop: every recipe (the shipped four-domain one, fine-tuning, the paper's) runs through `fit`.

A recipe (`Recipe`) says what is trained and how: crop size, batch, disk radius, learning rate and its decay,
the budget (steps or minutes) and which layers learn. A batch source says on what: any object with
`batch(epoch, index)` (images, targets and optionally per-pixel weights) and `default_steps_per_epoch()`:
`sampling.DomainSampler` (annotated domains, the shipped recipe), `sampling.BlockSampler` (the paper's blocks)
and the pseudo-labelled blocks of `wsiproc adapt`.

Why step-based and checkpointed by time: a CPU step of the paper network takes seconds, so a run is minutes to
hours; `last.keras` (with the optimiser's state) and `state.json` are written every `checkpoint_s` seconds and
at the end, and calling `fit` again with the same work folder continues from the last checkpoint with the same
batches (they are seeded by step), so an interrupted run loses at most `checkpoint_s` of work.

Why bfloat16: on CPUs with AVX512-BF16 or AMX, Keras' `mixed_bfloat16` policy (bfloat16 compute, float32
variables, the float32 output layer kept) makes a training step of the paper network about 2× (AVX512-BF16,
measured 5.3 → 2.6 s for 16 × 128² on an AMD EPYC) to 3× (AMX) faster. Elsewhere, and on GPUs, training is float32.
The saved model is always float32 and uncompiled, like the shipped ones.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .augment import AugmentConfig
from .sampling import BlockSampler, BlockSource
from .training import TrainConfig, TrainingImage
from ..detection.model import build_model, load_model, save_model, with_dtype, with_policy
from ..detection.architectures import has_class_head, without_class_head
from .class_head import with_trained_head
from tqdm import tqdm
import multiprocessing as mp

#: Layer groups a recipe can train: everything, or everything after the VGG stem (blocks 1–2 kept fixed; networks
#: without one train everything).
TRAINABLE = ("all", "after-stem")
PRECISIONS = ("auto", "bfloat16", "float32")


@dataclass(frozen=True)
class Recipe:
    """How a network is trained; recorded in the checkpoint's state and the model's provenance."""

    name: str
    crop_px: int = 128
    batch_size: int = 32
    disk_radius_px: float = 4.0
    learning_rate: float = 1e-4
    steps: int | None = None  # the budget: steps, or minutes (wall time), whichever is given; both: the first reached
    minutes: float | None = None
    decay_at: float = 0.7  # the learning rate is divided by 10 once this share of the budget is spent
    trainable: str = "all"
    shipped_share: float = 0.0  # fine-tuning: share of each batch taken from the shipped domains' data (with --data)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None and self.minutes is None:
            raise ValueError(f"recipe {self.name!r}: give a budget (steps or minutes)")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"recipe {self.name!r}: steps must be at least 1 (got {self.steps})")
        if self.minutes is not None and self.minutes <= 0:
            raise ValueError(f"recipe {self.name!r}: minutes must be positive (got {self.minutes})")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"recipe {self.name!r}: trainable must be one of {', '.join(TRAINABLE)} (got {self.trainable!r})")
        if self.crop_px % 8 or self.crop_px < 16:
            raise ValueError(f"crops must be a multiple of 8 px and at least 16 (got {self.crop_px})")
        if not 0.0 <= self.shipped_share < 1.0:
            raise ValueError(f"shipped_share must be in [0, 1) (got {self.shipped_share})")
        if not 0.0 < self.decay_at <= 1.0:
            raise ValueError(f"decay_at must be in (0, 1] (got {self.decay_at})")

    def replace(self, **changes) -> "Recipe":
        """The recipe with some fields changed (None values are ignored: options the user did not give)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


#: Named recipes. `shipped` is how `wsiproc/models/default.keras` was trained (4 980 steps of 32 crops, ImageNet
#: VGG-16 start, lr 1e-4); `fine-tune` is the own-lab default, chosen by `benchmarks/fine_tune.py`; `paper` is
#: Valkonen et al.'s single-domain recipe (64² blocks, hue shift and noise in thirds), kept for reproduction.
RECIPES: dict[str, Recipe] = {
    "shipped": Recipe("shipped", crop_px=128, batch_size=32, learning_rate=1e-4, steps=4980),
    "fine-tune": Recipe("fine-tune", crop_px=128, batch_size=16, learning_rate=1e-4, steps=100, trainable="after-stem"),
    "paper": Recipe("paper", crop_px=64, batch_size=16, learning_rate=1e-4, steps=1500, decay_at=1.0),
}


def cpu_has_bfloat16() -> bool:
    """True where the CPU computes bfloat16 natively (AMX or AVX512-BF16): there `mixed_bfloat16` pays."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def training_policy(precision: str = "auto") -> str:
    """The Keras dtype policy to train with: `mixed_bfloat16` on CPUs with bfloat16 hardware, else float32.

    `auto` never picks bfloat16 on a GPU (a GPU trains float32 here: the shipped recipe's figures are float32)
    nor outside TensorFlow on the CPU, where XLA's bfloat16 CPU kernels are emulated and slower."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown training precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if precision == "float32":
        return "float32"
    if precision == "bfloat16":
        return "mixed_bfloat16"
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    if keras.backend.backend() != "tensorflow" or not cpu_has_bfloat16():
        return "float32"
    import tensorflow as tf  # lazy: seconds to import; the OpenVINO path never needs it

    return "float32" if tf.config.list_physical_devices("GPU") else "mixed_bfloat16"


@dataclass(frozen=True)
class Start:
    """Where the weights start: a model file (fine-tuning, continuing), or a new network by name."""

    init_model: Path | None = None
    arch: str = "paper"
    vgg16_weights: Path | None = None
    freeze_vgg: bool = False
    dropout: float = 0.5

    def describe(self) -> dict:
        return {"init_model": str(self.init_model) if self.init_model else None, "arch": self.arch,
                "vgg16_weights": str(self.vgg16_weights) if self.vgg16_weights else None, "freeze_vgg": self.freeze_vgg}


def _initial_model(start: Start, policy: str):
    if start.init_model is not None:
        # The detector alone: its loss is on the confidence map; a class head is trained (or carried over) after
        # the trunk, by `train_domains` (`class_head`).
        model = without_class_head(load_model(start.init_model))
        for layer in model.layers:  # layers an earlier run kept fixed are stored so; this run's recipe decides anew
            layer.trainable = True
    else:
        model = build_model(dropout=start.dropout, vgg16_weights=start.vgg16_weights, freeze_vgg=start.freeze_vgg, arch=start.arch)
    return with_policy(model, policy)


def _set_trainable(model, trainable: str) -> str:
    """`after-stem`: the VGG-16 blocks 1–2 stay as they are (generic edge and colour filters); the rest learns.
    A network without a VGG stem (the U-Net) trains all its layers. Returns what was applied."""
    stem = [layer for layer in model.layers if layer.name.startswith(("block1_", "block2_"))]
    if trainable == "all" or not stem:
        return "all"
    for layer in stem:
        layer.trainable = False
    return "after-stem"


def _compile(model, learning_rate: float) -> None:
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    model.compile(optimizer=keras.optimizers.Adam(learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-8),
                  loss="binary_crossentropy")


class _Prefetch:
    """Batches made ahead of the network: in a thread (NumPy and Pillow release the GIL), or in worker processes
    where there are cores to spare (a GPU machine). At most `depth` batches wait, so memory stays bounded."""

    def __init__(self, source: BlockSource, first_step: int, steps_per_epoch: int, workers: int, depth: int = 2):
        self.source, self.spe = source, steps_per_epoch
        self.pool = None
        self.step = first_step
        if workers > 0:
            self.pool = mp.get_context("spawn").Pool(workers, _init_worker, (source,))
            self.pending: list = []
            self.depth = max(depth, 2 * workers)
        else:
            self.q: queue.Queue = queue.Queue(maxsize=depth)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._fill, daemon=True)
            self.thread.start()

    def _fill(self) -> None:
        step = self.step
        while not self.stop.is_set():
            try:
                item = self.source.batch(step // self.spe, step % self.spe)
            except BaseException as exc:  # handed to the training loop, which raises it there
                item = exc
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            step += 1

    def __next__(self):
        if self.pool is not None:
            while len(self.pending) < self.depth:
                s = self.step + len(self.pending)
                self.pending.append(self.pool.apply_async(_worker_batch, (s // self.spe, s % self.spe)))
            self.step += 1
            return self.pending.pop(0).get()
        item = self.q.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
        else:
            self.stop.set()


_WORKER_SOURCE: BlockSource | None = None


def _init_worker(source: BlockSource) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _worker_batch(epoch: int, index: int):
    return _WORKER_SOURCE.batch(epoch, index)  # type: ignore[union-attr]


ProgressFn = Callable[[int, int | None, float, float, float | None], None]


def fit(source: BlockSource, out_path: str | Path, recipe: Recipe, work_dir: str | Path, start: Start = Start(),
        precision: str = "auto", workers: int = 0, checkpoint_s: float = 180.0, steps_per_epoch: int | None = None,
        progress: ProgressFn | None = None) -> dict:
    """Train (or resume) with `recipe` on `source`; save the float32 model to `out_path`; return the state.

    `work_dir` holds `last.keras` and `state.json`; when both exist the run continues from them (a larger budget
    continues a finished run). `steps_per_epoch` only groups steps for seeding and the loss history (default:
    the source's own for seeding, every 50 steps for the history). `progress(step, total_steps, loss, elapsed_s, remaining_s)` hears of every step.
    Returns `{"step", "seconds", "history": [{"step", "loss", "learning_rate", "seconds"}], "recipe", ...}`.
    """
    import keras  # lazy: loads TensorFlow (seconds); the OpenVINO path never needs it

    out_path, work_dir = Path(out_path), Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    state_file, last = work_dir / "state.json", work_dir / "last.keras"
    spe = int(steps_per_epoch or source.default_steps_per_epoch())
    every = int(steps_per_epoch or 50)  # loss history: per epoch where epochs are given, else every 50 steps
    policy = training_policy(precision)
    keras.utils.set_random_seed(recipe.seed)
    if state_file.is_file() and last.is_file():
        state = json.loads(state_file.read_text())
        model = keras.models.load_model(last, compile=True, safe_mode=True)
        policy = state.get("policy", policy)  # the run keeps the precision it started with
    else:
        state = {"step": 0, "seconds": 0.0, "history": []}
        model = _initial_model(start, policy)
        state["trainable"] = _set_trainable(model, recipe.trainable)
        _compile(model, recipe.learning_rate)
    state.update({"recipe": recipe.to_dict(), "start": start.describe(), "policy": policy, "steps_per_epoch": spe,
                  "backend": keras.backend.backend()})

    seconds_before, t0 = float(state["seconds"]), time.perf_counter()

    def elapsed() -> float:
        return seconds_before + time.perf_counter() - t0

    def spent() -> float:
        """Share of the budget spent: the larger of steps and minutes where both are given."""
        shares = []
        if recipe.steps:
            shares.append(state["step"] / recipe.steps)
        if recipe.minutes:
            shares.append(elapsed() / (60 * recipe.minutes))
        return max(shares)

    def save_checkpoint() -> None:
        tmp = last.with_name(".last.partial.keras")
        model.save(tmp)
        os.replace(tmp, last)
        state["seconds"] = round(elapsed(), 2)
        tmp_state = state_file.with_name(".state.partial.json")
        tmp_state.write_text(json.dumps(state, indent=1))
        os.replace(tmp_state, state_file)

    losses: list[float] = []
    t_ckpt = time.perf_counter()
    batches: _Prefetch | None = None
    try:
        if spent() < 1.0:
            batches = _Prefetch(source, state["step"], spe, workers)
        while spent() < 1.0:
            lr = recipe.learning_rate * (0.1 if spent() >= recipe.decay_at else 1.0)
            if abs(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) - lr) > 1e-12:
                model.optimizer.learning_rate.assign(lr)
            batch = next(batches)  # type: ignore[arg-type]
            x, y = batch[0], batch[1]
            w = batch[2] if len(batch) > 2 else None
            loss = model.train_on_batch(x, y, sample_weight=w)
            loss = float(loss[0] if isinstance(loss, (list, tuple)) else loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} at step {state['step'] + 1}: "
                                         "lower the learning rate (--lr)")
            state["step"] += 1
            losses.append(loss)
            if state["step"] % every == 0 or spent() >= 1.0:
                state["history"].append({"step": state["step"], "loss": round(float(np.mean(losses[-every:])), 6),
                                         "learning_rate": lr, "seconds": round(elapsed(), 1)})
            if progress is not None:
                done = spent()
                remaining = elapsed() * (1 - done) / done if done > 0 else None
                total = recipe.steps if recipe.steps and not recipe.minutes else None
                progress(state["step"], total, float(np.mean(losses[-20:])), elapsed(), remaining)
            if time.perf_counter() - t_ckpt > checkpoint_s:
                save_checkpoint()
                t_ckpt = time.perf_counter()
    finally:
        if batches is not None:
            batches.close()
    save_checkpoint()
    final = with_dtype(model, "float32")  # float32 compute and no optimiser: what a run loads
    save_model(carry_class_head(start.init_model, final), out_path)
    return state


def carry_class_head(init_model: Path | None, model):
    """`model` (a detector) with the class head of `init_model` put back unchanged, where it has one: training the
    detector (own-lab fine-tuning, adaptation) must not silently drop the nucleus types a run reports."""
    if init_model is None:
        return model

    source = load_model(init_model)
    return with_trained_head(model, source) if has_class_head(source) else model


def step_progress(label: str, stream=sys.stderr) -> tuple[ProgressFn, Callable[[], None]]:
    """A progress bar (step, loss, time left) on a terminal, a line every 30 s otherwise; and its closer."""
    interactive = stream.isatty()
    holder: dict = {"bar": None, "last": 0.0}

    def update(step: int, total: int | None, loss: float, elapsed_s: float, remaining_s: float | None) -> None:
        left = f"{remaining_s / 60:.1f} min" if remaining_s is not None else "?"
        if interactive:
            if holder["bar"] is None:
                holder["bar"] = tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, file=stream, initial=step - 1)
            bar = holder["bar"]
            bar.set_postfix(loss=f"{loss:.4f}", left=left, refresh=False)
            bar.update(step - bar.n)
        elif time.monotonic() - holder["last"] > 30 or (total and step == total):
            holder["last"] = time.monotonic()
            print(f"{label}: step {step}{f'/{total}' if total else ''}, loss {loss:.4f}, "
                  f"{elapsed_s / 60:.1f} min, {left} left", file=stream, flush=True)

    def close() -> None:
        if holder["bar"] is not None:
            holder["bar"].close()

    return update, close


def train(
    images: "Sequence[TrainingImage] | BlockSource",
    out_path: str | Path,
    cfg: TrainConfig = TrainConfig(),
    checkpoint_dir: str | Path | None = None,
    vgg16_weights: str | Path | None = None,
    init_model: str | Path | None = None,
    verbose: int = 1,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> dict:
    """The paper's epoch-counted recipe (and `wsiproc adapt`'s fine-tuning) through the one loop, `trainer.fit`.

    A checkpoint (`last.keras` with the optimiser state, plus `state.json`) is written after every epoch
    into `checkpoint_dir`; calling again with the same folder continues from the last finished epoch (a larger
    `epochs` continues a finished run). `init_model` starts from an existing model's weights.
    Returns the state with `epoch` (epochs done) and per-epoch `history` entries.
    """
    out_path = Path(out_path)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else out_path.with_name(out_path.stem + "_checkpoints")
    sampler = images if hasattr(images, "batch") else BlockSampler(images, cfg)  # type: ignore[arg-type]
    spe = cfg.steps_per_epoch or sampler.default_steps_per_epoch()
    recipe = Recipe("paper", crop_px=cfg.block_px, batch_size=cfg.batch_size, disk_radius_px=cfg.disk_radius_px,
                    learning_rate=cfg.learning_rate, steps=cfg.epochs * spe, decay_at=1.0, seed=cfg.seed,
                    trainable="all", augment=AugmentConfig.flips_only())
    start = Start(init_model=Path(init_model) if init_model else None, arch=cfg.arch,
                  vgg16_weights=Path(vgg16_weights) if vgg16_weights else None, freeze_vgg=cfg.freeze_vgg, dropout=cfg.dropout)
    update, close = step_progress(out_path.name) if verbose else (None, lambda: None)
    done_epochs = [0]

    def progress(step: int, *rest) -> None:
        if update is not None:
            update(step, *rest)
        if on_epoch is not None and step % spe == 0 and step // spe > done_epochs[0]:
            done_epochs[0] = step // spe
            on_epoch(done_epochs[0], {})

    try:
        state = fit(sampler, out_path, recipe, ckpt_dir, start=start, checkpoint_s=180.0,
                    steps_per_epoch=spe, progress=progress)
    finally:
        close()
    state["epoch"] = state["step"] // spe
    state["config"] = dataclasses.asdict(cfg)
    for entry in state["history"]:
        entry["epoch"] = entry["step"] // spe
    return state
