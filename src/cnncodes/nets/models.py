"""The Keras models cnncodes builds from the registry: the extractor and the fine-tuning classifier.

Both take raw uint8 RGB pixels: the backbone's preprocessing is a layer inside the model,
so a saved model cannot be fed differently prepared pixels. This module depends on the
registry (`backbones`) and on the preprocessing layer, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from cnncodes.core.errors import CnnCodesError
from cnncodes.nets.backbones import Backbone
from cnncodes.nets.weights import Weights

if TYPE_CHECKING:
    import keras

# The layers `build_classifier` puts on the backbone, in order: fine-tuning re-applies them to cached activations.
HEAD_LAYERS = ("head_pool", "head_dropout", "head")


def build_extractor(
    entry: Backbone,
    size: int,
    layer: str,
    pooling: str,
    weights: Weights,
    scales: Sequence[int] = (),
    views: bool = False,
) -> keras.Model:
    """uint8 RGB pixels in, one CNN code per image out: preprocessing, network cut at `layer`, pooling.

    With `scales`, the code is the mean of the codes of the `size`-px image resized to each
    scale: one network whose weights every scale shares, so the whole thing is still one
    model to convert, quantize, cache and ship. With `views` too, the model gives every
    scale's code side by side instead (`runtime.MeanOfViews` averages them): training on
    each view teaches a classifier that scale is not a feature.

    Args:
        entry: the backbone's registry entry.
        size: the square input size, in pixels.
        layer: the layer whose output becomes the code.
        pooling: `avg`, `max` or `flatten` (a vector layer is not pooled).
        weights: the resolved weights.
        scales: sizes to resize the input to, each giving a code of the shared network.
        views: with `scales`, each scale's code side by side rather than their mean.

    Returns:
        The extractor.

    Raises:
        CnnCodesError: the network has no layer `layer`.
    """
    import keras

    network = entry.build_network(None if scales else size, layer, weights)
    trunk = keras.Model(network.inputs, tap(entry, network, layer).output, name=f"{entry.name}_to_{layer}")
    pixels, preprocessed = _pixel_input(entry, size)
    pool = _pooling(trunk.output, pooling)
    if not scales:
        return keras.Model(pixels, pool(trunk(preprocessed)), name=f"{entry.name}_codes")
    codes = [pool(trunk(_resized(preprocessed, scale, size))) for scale in scales]
    layers = keras.layers
    joined = layers.Concatenate(name="codes_per_scale") if views else layers.Average(name="mean_over_scales")
    return keras.Model(pixels, joined(codes), name=f"{entry.name}_codes")


def build_feature_maps(
    entry: Backbone, size: int, layer: str, weights: Weights, scale: int, any_size: bool = False
) -> keras.Model:
    """uint8 RGB pixels in, the tapped layer's unpooled maps out, for the image seen at `scale` px.

    The extractor's code at that scale is these maps' spatial mean (or maximum): what a heat
    map explains. One model per scale, so each is one output whose grid its shape gives.

    Args:
        entry: the backbone's registry entry.
        size: the square input size, in pixels (the extractor's `image_size`).
        layer: the tapped layer, which must give a spatial map.
        weights: the resolved weights.
        scale: the size the input is resized to before the network (`size` for one-size codes).
        any_size: build the network for any input size, as `build_extractor` does for several scales.

    Returns:
        The model: (batch, size, size, 3) uint8 in, (batch, rows, columns, channels) out.

    Raises:
        CnnCodesError: the network has no layer `layer`, or it is not a spatial map.
    """
    import keras

    network = entry.build_network(None if any_size else size, layer, weights)
    trunk = keras.Model(network.inputs, tap(entry, network, layer).output, name=f"{entry.name}_to_{layer}")
    if len(trunk.output.shape) != 4:
        raise CnnCodesError(f"{entry.name}'s layer {layer} gives a vector, not a map: it has no heat map")
    pixels, preprocessed = _pixel_input(entry, size)
    return keras.Model(pixels, trunk(_resized(preprocessed, scale, size)), name=f"{entry.name}_maps_{scale}")


def build_classifier(
    entry: Backbone, size: int, n_classes: int, weights: Weights, dropout: float
) -> tuple[keras.Model, keras.Model]:
    """The fine-tuning model (backbone in inference mode, pooled, dropout, softmax head) and its backbone.

    The backbone is returned too, because fine-tuning freezes and unfreezes its layers.

    Args:
        entry: the backbone's registry entry.
        size: the square input size, in pixels.
        n_classes: outputs of the softmax head.
        weights: the backbone's resolved weights.
        dropout: the rate before the head.

    Returns:
        The whole model (its head's layers named as `HEAD_LAYERS`) and the backbone inside it.
    """
    import keras

    network = entry.build_network(size, entry.default_layer, weights)
    pixels, preprocessed = _pixel_input(entry, size)
    pool, drop, head = HEAD_LAYERS
    x = keras.layers.GlobalAveragePooling2D(name=pool)(network(preprocessed, training=False))
    x = keras.layers.Dropout(dropout, name=drop)(x)
    probabilities = keras.layers.Dense(n_classes, activation="softmax", name=head)(x)
    return keras.Model(pixels, probabilities, name=f"{entry.name}_finetune"), network


def small_cnn(size: int, n_classes: int) -> keras.Model:
    """The Keras MNIST example's ConvNet on uint8 RGB pixels: what transfer learning is measured against.

    Args:
        size: the square input size, in pixels.
        n_classes: outputs of the softmax head.

    Returns:
        The untrained model.
    """
    import keras

    layers = keras.layers
    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    x = layers.Rescaling(1 / 255, name="scale")(pixels)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool")(x)
    x = layers.Dropout(0.25, name="pool_dropout")(x)
    x = layers.Dense(128, activation="relu", name="dense")(layers.Flatten(name="flatten")(x))
    x = layers.Dropout(0.5, name="dense_dropout")(x)
    return keras.Model(pixels, layers.Dense(n_classes, activation="softmax", name="head")(x), name="smallcnn")


def tap(entry: Backbone, network: keras.Model, layer: str) -> Any:
    """The layer of `network` whose output becomes the code, or a message listing the good ones.

    Args:
        entry: the backbone's registry entry, whose usual layers the message lists.
        network: the backbone network.
        layer: a layer name.

    Returns:
        The layer.

    Raises:
        CnnCodesError: the network has no such layer.
    """
    try:
        return network.get_layer(layer)
    except ValueError:
        raise CnnCodesError(
            f"{entry.name} has no layer {layer!r}: try one of {', '.join(entry.taps + entry.top_taps)}, "
            f"or any name that `cnncodes layers {entry.name}` lists"
        ) from None


def _pixel_input(entry: Backbone, size: int) -> tuple[Any, Any]:
    import keras

    from cnncodes.nets.preprocessing import Preprocess

    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    return pixels, Preprocess(entry.name)(pixels)


def _pooling(x: Any, pooling: str) -> Callable[[Any], Any]:
    """The layer that turns the tapped output `x` into a vector (one layer, so scales share it)."""
    import keras

    if len(x.shape) == 2:  # already a vector (fc1, fc2): nothing to pool
        return lambda vector: vector
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name="avg_pool_codes")
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name="max_pool_codes")
    return keras.layers.Flatten(name="flatten_codes")


def _resized(x: Any, scale: int, size: int) -> Any:
    """`x`, a `size`-px square, at `scale` px."""
    from cnncodes.nets.preprocessing import SquareResize

    return x if scale == size else SquareResize(size, scale, name=f"resize_{scale}")(x)
