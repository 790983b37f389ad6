"""The `.keras` network as one traced TensorFlow function: what the TensorFlow engine runs and what
`engines.convert_keras` hands to OpenVINO's converter, so the two engines run the same graph.

Two rewrites, both with the same output as the network as saved (tested): the paper network's head runs as a
sub-pixel convolution (`model.subpixel_head`), and, for OpenVINO, nearest upsamplings run as channel copies +
depth-to-space, which OpenVINO runs natively. TensorFlow and Keras are imported inside the functions: only the
TensorFlow engine and conversion need them, and importing them costs seconds.
"""
from __future__ import annotations

from .model import class_branch, subpixel_head


def _mixed_precision_copy(model):
    """The same layers and weights with float16 compute (Keras' mixed_float16 policy: variables stay float32)."""
    import keras  # lazy: loads TensorFlow (seconds); only the TensorFlow engine and conversion trace the network

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": "mixed_float16"})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def _nearest_upsampling_layer():
    """A Keras layer doing what UpSampling2D(nearest) does, as f² copies of the channels and a depth-to-space.

    Keras 3's UpSampling2D repeats rows and columns (Tile, Reshape and Transpose ops on shapes known only at
    run time), which OpenVINO runs in reference kernels with layout transposes around them: vgg-lean ran at
    half its bfloat16 speed. Concat + DepthToSpace are native, in any layout and precision (2× faster), and
    unlike a resize (OpenVINO's Interpolate) NNCF quantises around them correctly: it put per-channel int8
    ranges on the wrong axis after an NHWC Interpolate. The output is identical (tested).
    """
    import keras  # lazy: loads TensorFlow (seconds); see the module docstring
    import tensorflow as tf  # lazy: as keras

    class NearestUpsampling(keras.layers.Layer):
        def __init__(self, factor: int = 2, **kwargs):
            super().__init__(**kwargs)
            self.factor = int(factor)

        def call(self, x):
            return tf.nn.depth_to_space(tf.concat([x] * self.factor**2, axis=-1), self.factor)

        def get_config(self):
            return {**super().get_config(), "factor": self.factor}

    return NearestUpsampling


def _inference_graph(model):
    """The model with every square nearest UpSampling2D run as `_nearest_upsampling_layer` (same weights, same output)."""
    import keras  # lazy: loads TensorFlow (seconds); see the module docstring

    ups = [layer for layer in model.layers if isinstance(layer, keras.layers.UpSampling2D)
           and layer.interpolation == "nearest" and layer.size[0] == layer.size[1]]
    if not ups:
        return model
    NearestUpsampling = _nearest_upsampling_layer()

    def clone(layer):
        if layer in ups:
            return NearestUpsampling(layer.size[0], name=layer.name, dtype=layer.dtype_policy)
        return layer  # the same layer object: its weights are shared, not copied

    return keras.models.clone_model(model, clone_function=clone)


def keras_forward(model, mixed_float16: bool = False, for_openvino: bool = False):
    """One traced function (B, H, W, 3) uint8 → (B, H, W) float32: what TensorFlow runs, and what OpenVINO converts.

    A network ending in nearest upsampling + 3 × 3 sigmoid convolution (the paper's) runs its head as a
    sub-pixel convolution (`model.subpixel_head`): the same output without materialising the upsampled
    features, the largest tensor of the whole network. Any other architecture runs as it is; `for_openvino`
    (the graph `engines.convert_keras` converts) runs its nearest upsamplings as `_inference_graph` does, which
    OpenVINO runs 2× faster and TensorFlow 10 % slower.
    """
    import tensorflow as tf  # lazy: seconds to import; see the module docstring

    head = subpixel_head(model)
    classes = class_branch(model)
    if head is not None and classes is not None and classes[1] != _producer_name(head[0]):
        head = None  # the class head reads other features than the sub-pixel head: run the graph as it is
    if head is None:
        net = _inference_graph(model) if for_openvino else model
        net = _mixed_precision_copy(net) if mixed_float16 else net
        with_classes = classes is not None

        @tf.function(reduce_retracing=True)
        def forward(x):
            out = tf.cast(net(tf.cast(x, tf.float32) / 255.0, training=False), tf.float32)
            return out if with_classes else out[..., 0]

        return forward
    trunk, kernel, bias, factor = head
    trunk = _mixed_precision_copy(trunk) if mixed_float16 else trunk
    kernel, bias = tf.constant(kernel), tf.constant(bias)
    branch = classes[0] if classes is not None else None
    class_factor = classes[2] if classes is not None else 1

    @tf.function(reduce_retracing=True)
    def forward(x):
        features = tf.cast(trunk(tf.cast(x, tf.float32) / 255.0, training=False), tf.float32)
        logits = tf.nn.conv2d(features, kernel, 1, "SAME") + bias  # one channel per sub-pixel position
        confidence = tf.sigmoid(tf.nn.depth_to_space(logits, factor))
        if branch is None:
            return confidence[..., 0]
        probs = tf.cast(branch(features, training=False), tf.float32)
        if class_factor > 1:  # nearest upsampling as copies + depth-to-space: native in OpenVINO (see above)
            probs = tf.nn.depth_to_space(tf.concat([probs] * class_factor**2, axis=-1), class_factor)
        return tf.concat([confidence, probs], axis=-1)

    return forward


def _producer_name(trunk) -> str:
    """The name of the layer whose output a sub-model (`subpixel_head`'s trunk) returns."""
    return trunk.outputs[0]._keras_history[0].name
