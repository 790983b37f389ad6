"""Why did the network call this a nucleus? Layer-wise Relevance Propagation (LRP) on 64×64 blocks.

The paper checked its detector with LRP heat maps (iNNvestigate) on 64×64 blocks around detections and
found the relevant pixels on nuclear edges and nucleoli. iNNvestigate does not support Keras 3, so LRP is
implemented here for the layer types of `wsiproc.detection.model`'s network, with TensorFlow gradients:

Every layer is treated as a linear map `z = f(a)` of its input `a` (a convolution without its activation,
a max pooling, an upsampling; dropout is the identity at inference, ReLU passes relevance through
unchanged). Relevance `R` arriving at the layer's output goes back to the input as

    R_in = a ⊙ ∇_a( f(a) · s ),   s = R / stabilised(z)

the "gradient × input" form of LRP. For a convolution this is LRP-ε (s = R / (z + ε·sign z)) or LRP-αβ (the
positive and negative weights split, s± = R / z±, R_in = a ⊙ (α ∇(z+·s+) − β ∇(z−·s−)), biases left out so
α − β = 1 conserves relevance). For max pooling the gradient is winner-take-all: each output's relevance
goes to the input that won the max. For nearest-neighbour upsampling it sums the relevance of the copies.

The explained quantity is the pre-sigmoid logit of the confidence map at one pixel (the nucleus centre):
positive relevance marks pixels that raised the network's belief in a nucleus there, negative relevance
pixels that lowered it. Relevance on the input is summed over R, G, B into one 64×64 map.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import RunConfig
from ..detection.architectures import without_class_head
from ..detection.colour import slide_colour
from ..detection.inference import Predictor
from ..detection.loop import detect, detect_region
from ..detection.model import MODEL_MPP, size_multiple
from ..detection.tiling import SlideSampler
from ..detection.tissue import tissue_mask
from ..errors import ModelNotFoundError
from ..io.files import atomic_path
from ..io.resample import map_coords
from ..io.slide import open_slide

__all__ = ["BLOCK_PX", "RULES", "ExplainedBlock", "lrp_relevance", "lrp_relevance_batch", "explain_slide"]

#: Block side at 0.5 µm/px, as in the paper's training and its LRP figures.
BLOCK_PX = 64
#: Rule name → (α, β) for the αβ rules; "epsilon" is LRP-ε.
RULES = {"epsilon": None, "alphabeta": (2.0, 1.0), "alpha2beta1": (2.0, 1.0), "alpha1beta0": (1.0, 0.0)}
#: Default side (0.5 µm/px) of the random tissue region `explain_slide` detects nuclei in: a whole slide on
#: two CPU cores takes minutes, and a sample of nuclei needs only one tile's worth of them.
REGION_PX = 512
#: The relevance colours of a block saturate at this percentile of its |R|.
RELEVANCE_CLIP_PERCENTILE = 99.0


def lrp_relevance(model, block_rgb01: np.ndarray, target_yx: tuple[int, int], rule: str = "epsilon",
                  epsilon: float = 1e-6) -> np.ndarray:
    """LRP relevance (64, 64) float32 of one RGB block in [0, 1] for the logit at `target_yx`.

    `rule` is a key of `RULES`. What the map sums to: with the ε rule, the logit minus the share the biases
    absorb on the way (exactly the logit for a network without biases); the αβ rules leave biases out and
    pass the whole logit down (exactly when α − β = 1 and every neuron has inputs of both signs).
    """
    block = np.asarray(block_rgb01, dtype=np.float32)
    if block.ndim != 3 or block.shape[2] != 3:
        raise ValueError(f"expected one (height, width, 3) RGB block, got shape {block.shape}")
    return lrp_relevance_batch(model, block[None], [target_yx], rule, epsilon)[0]


def lrp_relevance_batch(model, blocks_rgb01: np.ndarray, targets_yx: list[tuple[int, int]], rule: str = "epsilon",
                        epsilon: float = 1e-6) -> np.ndarray:
    """`lrp_relevance` for a batch (B, H, W, 3) of blocks, one target pixel each → (B, H, W)."""
    import tensorflow as tf  # lazy: loads TensorFlow (seconds); only LRP needs it

    if rule not in RULES:
        raise ValueError(f"unknown LRP rule {rule!r}; known: {', '.join(RULES)}")
    x = np.asarray(blocks_rgb01, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected (batch, height, width, 3) RGB blocks, got shape {x.shape}")
    if len(targets_yx) != len(x):
        raise ValueError(f"{len(x)} blocks but {len(targets_yx)} targets")
    b, h, w, _ = x.shape
    for y, xx in targets_yx:
        if not (0 <= y < h and 0 <= xx < w):
            raise ValueError(f"target pixel {(y, xx)} lies outside the {h}×{w} block")

    steps = _linear_steps(without_class_head(model))  # what is explained is the confidence, not the class head
    hidden, output = steps[:-1], steps[-1]
    # Forward, on one persistent tape: the input `a` and linear output `z` of every hidden step (ReLU applied
    # after a step, so every input is >= 0); the ε rule then needs one backward step per layer and no second
    # forward. stop_gradient cuts the tape between steps, so a gradient never runs on into the layers below,
    # and weights are not watched, so no weight gradients are computed.
    inputs, outputs = [], []
    with tf.GradientTape(persistent=True, watch_accessed_variables=False) as tape:
        a = tf.constant(x)
        for step in hidden:
            a = tf.stop_gradient(a)
            tape.watch(a)
            z = step.forward(a)
            inputs.append(a)
            outputs.append(z)
            a = tf.nn.relu(z) if step.relu else z
    alpha_beta = RULES[rule]
    relevance = _output_relevance(output, a, targets_yx, alpha_beta, epsilon)
    for step, a, z in zip(reversed(hidden), reversed(inputs), reversed(outputs)):
        if step.kind == "conv" and alpha_beta is not None:
            relevance = _alpha_beta(step, a, relevance, *alpha_beta)
        else:  # LRP-ε; for pooling and upsampling the same formula is winner-take-all and sum, respectively
            s = tf.stop_gradient(relevance / _stabilise(z, epsilon))
            relevance = a * tape.gradient(z, a, output_gradients=s)
    del tape
    return np.asarray(tf.reduce_sum(relevance, axis=-1), dtype=np.float32)


def _output_relevance(step: "_Step", a, targets_yx: list[tuple[int, int]], alpha_beta: tuple[float, float] | None,
                      epsilon: float):
    """Relevance on the output convolution's input when the logit at each target pixel is explained.

    Only the kernel-sized window of `a` around a target reaches its logit, so the layer runs on those
    windows alone ('valid' padding on the zero-padded input: the same numbers as 'same' padding). That is
    the same LRP step as for any other convolution, minus the full-size backward pass of a 512 → 1 channel
    convolution, which is slow on CPUs and would be zero everywhere but the windows.
    """
    import tensorflow as tf  # lazy: loads TensorFlow (seconds); only LRP needs it

    kh, kw = step.layer.kernel_size
    if step.layer.padding != "same" or kh % 2 == 0 or kw % 2 == 0 or tuple(step.layer.dilation_rate) != (1, 1):
        raise ValueError(f"LRP: output layer {step.layer.name} must be an odd-sized, undilated 'same' convolution")
    ph, pw = kh // 2, kw // 2
    padded = tf.pad(a, [[0, 0], [ph, ph], [pw, pw], [0, 0]])
    windows = tf.stack([padded[i, y : y + kh, x : x + kw, :] for i, (y, x) in enumerate(targets_yx)])
    logits = step.forward(windows, padding="VALID")  # (B, 1, 1, 1): the pre-sigmoid output at each target
    if alpha_beta is not None:
        r_windows = _alpha_beta(step, windows, logits, *alpha_beta, padding="VALID")
    else:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(windows)
            z = step.forward(windows, padding="VALID")
        r_windows = windows * tape.gradient(z, windows, output_gradients=tf.stop_gradient(logits / _stabilise(z, epsilon)))
    relevance = np.zeros(padded.shape, np.float32)
    for i, (y, x) in enumerate(targets_yx):
        relevance[i, y : y + kh, x : x + kw, :] = r_windows[i]
    return tf.constant(relevance[:, ph : ph + a.shape[1], pw : pw + a.shape[2], :])


@dataclass(frozen=True)
class _Step:
    """One layer as a linear map (conv without activation, pooling, upsampling) and whether ReLU follows."""

    kind: str  # "conv", "maxpool" or "upsample"
    layer: object
    relu: bool

    def forward(self, a, kernel=None, bias: bool = True, padding: str | None = None):
        import tensorflow as tf  # lazy: loads TensorFlow (seconds); only LRP needs it

        layer = self.layer
        if self.kind == "conv":
            k = tf.cast(layer.kernel if kernel is None else kernel, tf.float32)
            z = tf.nn.conv2d(a, k, strides=list(layer.strides), padding=padding or layer.padding.upper(),
                             dilations=list(layer.dilation_rate))
            if bias and layer.use_bias:
                z = z + tf.cast(layer.bias, tf.float32)
            return z
        return tf.cast(layer(a), tf.float32)  # pooling / upsampling: the layer itself is the linear(ish) map


def _linear_steps(model) -> list[_Step]:
    """The model's layers as `_Step`s, refusing layer types this LRP does not know."""
    from keras import activations, layers  # lazy: loads TensorFlow (seconds); only LRP needs it

    steps = []
    for layer in model.layers:
        if isinstance(layer, (layers.InputLayer, layers.Dropout)):
            continue
        if isinstance(layer, layers.Conv2D):
            act = layer.activation
            if act in (activations.relu, activations.sigmoid, activations.linear) and tuple(layer.strides) == (1, 1):
                steps.append(_Step("conv", layer, act is activations.relu))
                continue
            raise ValueError(f"LRP: unsupported Conv2D configuration in layer {layer.name}")
        if isinstance(layer, layers.MaxPooling2D):
            steps.append(_Step("maxpool", layer, False))
        elif isinstance(layer, layers.UpSampling2D) and layer.interpolation == "nearest":
            steps.append(_Step("upsample", layer, False))
        else:
            raise ValueError(f"LRP: unsupported layer {layer.name} ({type(layer).__name__})")
    if not steps or steps[-1].kind != "conv" or steps[-1].relu:
        raise ValueError("LRP: the model must end in a convolution with a sigmoid (or linear) output")
    return steps


def _stabilise(z, epsilon: float):
    import tensorflow as tf  # lazy: loads TensorFlow (seconds); only LRP needs it

    return z + epsilon * tf.where(z >= 0, 1.0, -1.0)


def _alpha_beta(step: _Step, a, relevance, alpha: float, beta: float, padding: str | None = None):
    """LRP-αβ for a convolution whose input is non-negative (image in [0, 1] or a ReLU output)."""
    import tensorflow as tf  # lazy: loads TensorFlow (seconds); only LRP needs it

    kernel = tf.cast(step.layer.kernel, tf.float32)
    out = 0.0
    # R_in = α·a⊙W+ᵀ(R/z+) − β·a⊙W−ᵀ(R/z−): both fractions are >= 0, z+ >= 0 and z− <= 0.
    for weight, factor in ((tf.nn.relu(kernel), alpha), (-tf.nn.relu(-kernel), -beta)):
        if factor == 0:
            continue
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(a)
            z = step.forward(a, kernel=weight, bias=False, padding=padding)
        # Where z± is exactly 0 no input contributed to it, so nothing flows back through that part.
        nonzero = tf.not_equal(z, 0.0)
        s = tf.stop_gradient(tf.where(nonzero, relevance / tf.where(nonzero, z, 1.0), 0.0))
        out = out + factor * (a * tape.gradient(z, a, output_gradients=s))
    return out


# ------------------------------------------------------------------------------------------ slides


@dataclass(frozen=True)
class ExplainedBlock:
    """One detected nucleus: its 64×64 block at 0.5 µm/px, the network's confidence and the LRP map."""

    x_px: float  # level-0 pixel-index coordinates of the detection
    y_px: float
    rgb: np.ndarray  # (64, 64, 3) uint8
    confidence: np.ndarray  # (64, 64) float32, the model run on this block alone
    relevance: np.ndarray  # (64, 64) float32
    target_yx: tuple[int, int]


def explain_slide(path: str | os.PathLike[str], out_dir: str | os.PathLike[str], model_path: str | os.PathLike[str] | None = None,
                  n: int = 16, rule: str = "epsilon", seed: int = 0, mpp: float | None = None,
                  region_px: int | None = REGION_PX) -> Path:
    """Detect nuclei, explain `n` of them (drawn at random with `seed`) and write `<stem>_explain.png`.

    Detection uses the pipeline with default `RunConfig` parameters. With `region_px` set (the default,
    512) and the slide larger than that at 0.5 µm/px, only one random tissue region of `region_px` ×
    `region_px` (the same seed) is searched, which takes seconds instead of minutes; `region_px=None` runs
    the whole slide. Each chosen nucleus gets the 64×64 block centred on it; the panel shows per nucleus
    the block, the confidence map of the network on that block, and its LRP relevance (red: for a
    nucleus at the centre, blue: against), scaled per block symmetrically around 0.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1 (got {n})")
    if rule not in RULES:
        raise ValueError(f"unknown LRP rule {rule!r}; known: {', '.join(RULES)}")
    path = Path(path)
    if model_path is not None and not Path(model_path).is_file():
        raise ModelNotFoundError(f"{model_path}: model file not found")
    cfg = RunConfig(model_path=str(model_path) if model_path else None, mpp=mpp).validate()
    slide = open_slide(path, mpp)
    try:
        slide.require_mpp()
        predictor = Predictor(cfg.model_path)
        colour = _slide_colour(slide, cfg, predictor)
        det_x, det_y, region = _detect_sample_region(slide, cfg, predictor, region_px, seed, colour)
        if len(det_x) == 0:
            where = (f"in the {region[2]}×{region[2]} px region at x {region[1]}, y {region[0]} (0.5 µm/px; try another --seed)"
                     if region else "on the slide")
            raise ValueError(f"{path}: no nuclei detected {where}; nothing to explain")
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(det_x), size=min(n, len(det_x)), replace=False))
        blocks = _explain_blocks(slide, predictor.model, det_x[chosen], det_y[chosen], rule, colour)
    finally:
        slide.close()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / f"{path.stem}_explain.png"
    where = f" in a random {region[2]}×{region[2]} px region at 0.5 µm/px" if region else ""
    fig = _panel(blocks, f"{path.name}: LRP-{rule} relevance of the network's logit at the centre (+) of {len(blocks)} random "
                 f"detected nuclei{where}\nred: pixels that raised the nucleus confidence, blue: pixels that lowered it")
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return target


def _slide_colour(slide, cfg, predictor):
    """The slide's colour transform when the model asks for per-slide alignment (as a run computes it), else None:
    the network is explained on the pixels it sees in a run."""
    if getattr(predictor, "colours", None) is None:
        return None
    return slide_colour(SlideSampler.for_slide(slide, cfg.model_mpp), predictor.colours)


def _detect_sample_region(slide, cfg, predictor, region_px: int | None, seed: int, colour=None):
    """Detections (level-0 x, y) in one random tissue region, or on the whole slide when it is small; found by the
    detection loop of a run either way (`loop.detect_region`, `loop.detect`), so explain and a run never disagree
    on what was detected. Only the choice of the region is explain's."""
    sampler = SlideSampler.for_slide(slide, cfg.model_mpp)
    h, w = sampler.shape_hw()
    if region_px is None or max(h, w) <= region_px:
        det = detect(slide, cfg, predictor).detections
        return np.asarray(det.x_px), np.asarray(det.y_px), None
    multiple = size_multiple(predictor.geometry)
    side = max(BLOCK_PX, int(region_px) // multiple * multiple)
    mask = tissue_mask(sampler)
    ys, xs = np.nonzero(mask.mask)
    rng = np.random.default_rng(seed)
    if len(ys):
        i = int(rng.integers(len(ys)))
        cy, cx = (ys[i] + 0.5) * mask.mpp / cfg.model_mpp, (xs[i] + 0.5) * mask.mpp / cfg.model_mpp
    else:
        cy, cx = h / 2, w / 2
    y0 = int(np.clip(round(cy - side / 2), 0, max(0, h - side)))
    x0 = int(np.clip(round(cx - side / 2), 0, max(0, w - side)))
    det = detect_region(slide, cfg, predictor, (y0, x0, side, side), colour)
    return np.asarray(det.x_px), np.asarray(det.y_px), (y0, x0, side)


def _explain_blocks(slide, model, x_px: np.ndarray, y_px: np.ndarray, rule: str, colour=None) -> list[ExplainedBlock]:
    """Cut the 64×64 blocks (0.5 µm/px) centred on the detections (colour-aligned as in a run, when the model
    asks for it), run the model and LRP on them."""
    sampler = SlideSampler.for_slide(slide, MODEL_MPP)
    level0_mpp = slide.require_mpp()
    half = BLOCK_PX // 2
    rgb, targets = [], []
    for x, y in zip(x_px, y_px):
        v, u = int(round(float(map_coords(y, level0_mpp, MODEL_MPP)))), int(round(float(map_coords(x, level0_mpp, MODEL_MPP))))
        block = sampler.read(v - half, u - half, BLOCK_PX, BLOCK_PX)
        rgb.append(colour.apply(block) if colour is not None else block)
        targets.append((half, half))
    blocks01 = np.stack(rgb).astype(np.float32) / 255.0
    confidence = np.asarray(model(blocks01, training=False))[..., 0]
    relevance = lrp_relevance_batch(model, blocks01, targets, rule)
    return [ExplainedBlock(float(x), float(y), r, c, rel, t)
            for x, y, r, c, rel, t in zip(x_px, y_px, rgb, confidence, relevance, targets)]


def _panel(blocks: list[ExplainedBlock], title: str, max_cols: int = 8):
    """Rows image / confidence / relevance per group of up to `max_cols` nuclei."""
    from matplotlib.cm import ScalarMappable  # lazy: matplotlib is slow to import; only the panel needs it
    from matplotlib.figure import Figure  # lazy: as above

    n = len(blocks)
    cols = min(n, max_cols)
    groups = -(-n // cols)
    cell_in = 1.45
    fig = Figure(figsize=(cols * cell_in + 0.9, groups * 3 * cell_in + 0.5), dpi=100, layout="constrained")
    fig.suptitle(title, fontsize=9)
    axes = np.asarray(fig.subplots(groups * 3, cols, squeeze=False))
    row_names = ("block (0.5 µm/px)", "confidence", "LRP relevance")
    conf_image = rel_image = None
    for i in range(groups * cols):
        g, c = divmod(i, cols)
        trio = axes[3 * g : 3 * g + 3, c]
        for ax in trio:
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row_names[list(trio).index(ax)], fontsize=7)
        if i >= n:
            for ax in trio:
                ax.set_axis_off()
            continue
        b = blocks[i]
        ty, tx = b.target_yx
        trio[0].imshow(b.rgb, interpolation="nearest")
        trio[0].plot([tx], [ty], marker="+", color="#00e5ff", markersize=7, markeredgewidth=1.2)
        trio[0].set_title(f"x {b.x_px:.0f}, y {b.y_px:.0f}\nconfidence {b.confidence[ty, tx]:.2f}", fontsize=6.5)
        conf_image = trio[1].imshow(b.confidence, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        if b.confidence.max() > 0.5 > b.confidence.min():
            trio[1].contour(b.confidence, levels=[0.5], colors="white", linewidths=0.6)
        # Relevance over the faded block: opacity grows with |R|, so the tissue shows where R is ~0.
        # Relevance is heavy-tailed: colours saturate at a high percentile of |R| so more than a few pixels show.
        limit = float(np.percentile(np.abs(b.relevance), RELEVANCE_CLIP_PERCENTILE)) or float(np.abs(b.relevance).max()) or 1.0
        trio[2].imshow(b.rgb.astype(np.float32).mean(axis=2), cmap="gray", vmin=-200, vmax=255, interpolation="nearest")
        alpha = np.clip(np.abs(b.relevance) / limit * 1.5, 0.0, 1.0)
        rel_image = trio[2].imshow(b.relevance, cmap="bwr", vmin=-limit, vmax=limit, alpha=alpha, interpolation="nearest")
    if conf_image is not None and rel_image is not None:
        # Attached to the first group's rows only: one bar per row kind is enough and keeps them apart.
        fig.colorbar(conf_image, ax=list(axes[1, :]), shrink=0.9, aspect=12).set_label("confidence", fontsize=7)
        bar = fig.colorbar(ScalarMappable(rel_image.norm, rel_image.cmap), ax=list(axes[2, :]), shrink=0.9, aspect=12)
        bar.set_ticks([rel_image.norm.vmin, 0, rel_image.norm.vmax], labels=["−", "0", "+"])
        bar.set_label(f"relevance, per block\n(saturates at the {RELEVANCE_CLIP_PERCENTILE:g}th\npercentile of |R|)", fontsize=7)
    return fig
