"""cnncodes's own Keras layers: backbone preprocessing (saved models take raw RGB pixels), resizing, GeM pooling.

Putting `preprocess_input` inside the model means an extractor or a fine-tuned model
cannot be fed differently prepared pixels by mistake, and the ONNX export carries it too.
"""

from __future__ import annotations

import keras
import numpy as np

from cnncodes.nets.backbones import get_backbone

# `--pooling gem`'s exponent (Radenović et al.'s fixed p) and the floor of the maps it pools.
GEM_P = 3.0
GEM_EPSILON = 1e-6


@keras.saving.register_keras_serializable(package="cnncodes")
class Preprocess(keras.layers.Layer):
    """Cast uint8 pixels to float and apply the named backbone's `preprocess_input`."""

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone

    def call(self, pixels):
        return get_backbone(self.backbone).preprocess_input(keras.ops.cast(pixels, "float32"))

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


@keras.saving.register_keras_serializable(package="cnncodes")
class SquareResize(keras.layers.Layer):
    """Resize square images from `size` to `scale` px with an antialiased bilinear (triangle) filter.

    Written as two products with constant matrices rather than `keras.layers.Resizing`:
    tf2onnx's export of that layer, followed by a backbone, gives ONNX outputs far from
    Keras's (MobileNetV2: off by the size of the codes themselves), while matrix products
    export exactly, run as fast, and filter like Pillow's BILINEAR when shrinking.
    """

    def __init__(self, size: int, scale: int, **kwargs):
        super().__init__(**kwargs)
        self.size = size
        self.scale = scale
        self.weights_matrix = _triangle_weights(size, scale)

    def call(self, images):
        m = keras.ops.convert_to_tensor(self.weights_matrix)
        rows = keras.ops.einsum("ih,nhwc->niwc", m, images)
        return keras.ops.einsum("jw,niwc->nijc", m, rows)

    def get_config(self) -> dict:
        return {**super().get_config(), "size": self.size, "scale": self.scale}


@keras.saving.register_keras_serializable(package="cnncodes")
class GeneralizedMeanPooling(keras.layers.Layer):
    """Generalised-mean (GeM) pooling of (batch, rows, columns, channels) maps: (mean of max(x, ε)^p)^(1/p).

    Between average (p = 1) and max pooling (p → ∞): p = 3 (Radenović et al. 2018) lets a
    channel's strongest cells count more than its mean does, without one cell deciding alone as
    the maximum does. Meant for post-ReLU maps; ε keeps the root's gradient finite at zero.
    Built from `keras.ops`, so the ONNX export carries it.
    """

    def __init__(self, p: float = GEM_P, epsilon: float = GEM_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.p = p
        self.epsilon = epsilon

    def call(self, maps):
        clipped = keras.ops.maximum(maps, self.epsilon)
        return keras.ops.power(keras.ops.mean(keras.ops.power(clipped, self.p), axis=(1, 2)), 1.0 / self.p)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "p": self.p, "epsilon": self.epsilon}


def _triangle_weights(size: int, scale: int) -> np.ndarray:
    """Row i: the weights of the `size` input pixels in output pixel i (the filter widens when shrinking)."""
    ratio = size / scale
    support = max(ratio, 1.0)
    centres = (np.arange(scale) + 0.5) * ratio
    weights = np.clip(1 - np.abs(np.arange(size) + 0.5 - centres[:, None]) / support, 0, None)
    return (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
