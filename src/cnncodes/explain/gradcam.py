"""Grad-CAM for fine-tuned Keras models: where the network looked, from the gradients of a class's logit.

The recipe is the Keras example "Grad-CAM class activation visualization" (Selvaraju et al.
2017): weight each channel k of the last convolutional feature map A by the spatial mean of
the gradient of the class's score, α_k = mean(∂y_c/∂A_k), and keep the positive part of
Σ_k α_k A_k. The score is the LOGIT (the head's pre-activation), not the softmax probability,
whose gradient vanishes where the network is sure and mixes in every other class.

A model `build_classifier` makes nests its backbone as one layer, and Keras 3 cannot cut a
model at a layer inside a nested one ("graph disconnected"). So the model is not cut: its
layers run one after the other under `tf.GradientTape` (trunk → watched feature map → top),
the same layer objects with the same weights, in inference mode (dropout off, batch
normalisation on its moving statistics), and the head's Dense layer gives the logits. That
runs as one TensorFlow graph, traced once per model: layer by layer in eager mode is about
four times slower.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from cnncodes.core.errors import CnnCodesError


@dataclass(frozen=True)
class GradCam:
    """Grad-CAM maps of a batch of images and the scores they explain.

    With a frozen backbone and the pooled dense head of `build_classifier`, `maps` is the
    class activation map (CAM) over the number of cells: its positive part, in logit units.

    Attributes:
        maps: (n, h, w) float32, ReLU(Σ_k α_k A_k) at the watched feature map's resolution.
        logits: (n, classes) the head's pre-activations.
        probabilities: (n, classes) the model's softmax output.
        classes: (n,) the class each map explains.
        layer: the watched feature map, "backbone/layer" for a nested backbone.
    """

    maps: np.ndarray
    logits: np.ndarray
    probabilities: np.ndarray
    classes: np.ndarray
    layer: str

    @property
    def logit(self) -> np.ndarray:
        """(n,) the explained class's logit."""
        return self.logits[np.arange(len(self.classes)), self.classes]

    @property
    def probability(self) -> np.ndarray:
        """(n,) the explained class's probability."""
        return self.probabilities[np.arange(len(self.classes)), self.classes]


@dataclass(frozen=True)
class _Chain:
    """A model as a chain of layers: up to the watched feature map, from there to the head, the head."""

    trunk: list[Any]
    top: list[Any]
    head: Any
    layer: str


# Each model's chain and compiled Grad-CAM, kept while the model lives.
_COMPILED: weakref.WeakKeyDictionary[keras.Model, tuple[_Chain, Callable[[np.ndarray, np.ndarray], Any]]] = (
    weakref.WeakKeyDictionary()
)


def grad_cam(model: keras.Model, pixels: np.ndarray, classes: np.ndarray, *, batch_size: int = 32) -> GradCam:
    """Grad-CAM of each image for its class, on the last convolutional feature map, explaining logits.

    Args:
        model: a classifier as cnncodes builds it, loaded or in memory: uint8 pixels through a chain of
            layers to a softmax Dense head, with a nested backbone (`build_classifier`: its output is
            watched) or convolutions only (`small_cnn`: its last Conv2D is watched).
        pixels: (n, H, W, 3) uint8, as the model takes them.
        classes: (n,) the class index to explain for each image.
        batch_size: images per forward and backward pass, which bounds memory.

    Returns:
        The maps, with each image's logits, probabilities and the watched layer's name.

    Raises:
        CnnCodesError: the model is no such chain, or the pixels or classes do not fit it.
    """
    chain, compiled = _compiled(model)
    pixels = np.asarray(pixels)
    classes = np.asarray(classes).astype(np.int64)
    _check_inputs(model, pixels, classes, chain.head.units)
    parts = [
        compiled(pixels[i : i + batch_size], classes[i : i + batch_size]) for i in range(0, len(pixels), batch_size)
    ]
    maps, logits = (np.concatenate([np.asarray(part[j]) for part in parts]) for j in range(2))
    probabilities = keras.ops.convert_to_numpy(keras.ops.softmax(logits, axis=-1))
    return GradCam(maps=maps, logits=logits, probabilities=probabilities, classes=classes, layer=chain.layer)


def _compiled(model: keras.Model) -> tuple[_Chain, Callable[[np.ndarray, np.ndarray], Any]]:
    """The model's chain and its `_batch` as a graph taking any batch size, made once per model."""
    import tensorflow as tf

    if model not in _COMPILED:
        chain = _chain(model)
        signature = [
            tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.uint8),
            tf.TensorSpec((None,), tf.int64),
        ]
        batch = functools.partial(_batch, chain)
        _COMPILED[model] = chain, tf.function(batch, input_signature=signature, autograph=False)
    return _COMPILED[model]


def _batch(chain: _Chain, pixels: Any, classes: Any) -> tuple[Any, Any]:
    """One batch's maps and logits: the chain run forward under the tape, then the logit's gradient."""
    import tensorflow as tf

    x = pixels
    with tf.GradientTape() as tape:
        for layer in chain.trunk:
            x = layer(x, training=False)
        watched = x
        for layer in chain.top:
            x = layer(x, training=False)
        logits = keras.ops.matmul(x, chain.head.kernel)
        if chain.head.use_bias:
            logits = logits + chain.head.bias
        explained = tf.gather(logits, classes, batch_dims=1)
    # Images are independent in inference mode: the gradient of the sum is each image's own.
    gradients = tape.gradient(explained, watched)
    weights = tf.reduce_mean(gradients, axis=(1, 2))
    return tf.nn.relu(tf.einsum("nhwk,nk->nhw", watched, weights)), logits


def _chain(model: keras.Model) -> _Chain:
    """Split the model's layers at its last nested model or Conv2D, or say why it has no Grad-CAM."""
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    head = layers[-1] if layers else None
    if not isinstance(head, keras.layers.Dense) or getattr(head.activation, "__name__", "") != "softmax":
        raise CnnCodesError(
            f"model {model.name} does not end in a softmax Dense layer: Grad-CAM explains the logits before "
            "it, so give a model that `cnncodes finetune` saved"
        )
    spatial = [i for i, layer in enumerate(layers[:-1]) if isinstance(layer, keras.Model | keras.layers.Conv2D)]
    if not spatial:
        raise CnnCodesError(
            f"model {model.name} has no convolutional layer or nested backbone: Grad-CAM needs a feature map"
        )
    watched = layers[spatial[-1]]
    name = f"{watched.name}/{watched.layers[-1].name}" if isinstance(watched, keras.Model) else watched.name
    return _Chain(trunk=layers[: spatial[-1] + 1], top=layers[spatial[-1] + 1 : -1], head=head, layer=name)


def _check_inputs(model: keras.Model, pixels: np.ndarray, classes: np.ndarray, n_classes: int) -> None:
    expected = tuple(model.inputs[0].shape[1:])
    fits = pixels.ndim == 4 and all(e in (None, got) for e, got in zip(expected, pixels.shape[1:]))
    if not fits or pixels.dtype != np.uint8:
        raise CnnCodesError(
            f"pixels of shape {pixels.shape} and type {pixels.dtype}: model {model.name} takes uint8 images "
            f"of shape (n, {', '.join(map(str, expected))})"
        )
    if classes.shape != (len(pixels),):
        raise CnnCodesError(f"{len(classes)} classes for {len(pixels)} images: give one class per image")
    wrong = classes[(classes < 0) | (classes >= n_classes)]
    if len(wrong):
        raise CnnCodesError(f"class index {wrong[0]} out of range: model {model.name} has classes 0–{n_classes - 1}")
