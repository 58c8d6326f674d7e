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

    With several layers ("a,b"), each layer's pooled code is L2-normalised, so a shallow tap of
    few channels weighs as much as a deep one of many, and the codes are concatenated in the
    order given. With `scales`, the code is the mean of the codes of the `size`-px image
    resized to each scale: one network whose weights every scale shares, so the whole thing is
    still one model to convert, quantize, cache and ship. With `views` too, the model gives
    every scale's code side by side instead (`runtime.MeanOfViews` averages them): training on
    each view teaches a classifier that scale is not a feature.

    Args:
        entry: the backbone's registry entry.
        size: the square input size, in pixels.
        layer: the layer whose output becomes the code, or several joined by commas (`split_layers`).
        pooling: `avg`, `max`, `gem` or `flatten` (a vector layer is not pooled).
        weights: the resolved weights.
        scales: sizes to resize the input to, each giving a code of the shared network.
        views: with `scales`, each scale's code side by side rather than their mean.

    Returns:
        The extractor.

    Raises:
        CnnCodesError: the network has no layer of that name.
    """
    import keras

    names = split_layers(layer)
    # Several layers hold none of the classifier top's (`check_layers`): the first says how to build the network.
    network = entry.build_network(None if scales else size, names[0], weights)
    tapped = trunk(entry, network, names)
    pixels, preprocessed = pixel_input(entry, size)
    code = _code_of(tapped, names, pooling)
    if not scales:
        return keras.Model(pixels, code(preprocessed), name=f"{entry.name}_codes")
    codes = [code(resized(preprocessed, scale, size)) for scale in scales]
    layers = keras.layers
    joined = layers.Concatenate(name="codes_per_scale") if views else layers.Average(name="mean_over_scales")
    return keras.Model(pixels, joined(codes), name=f"{entry.name}_codes")


def _code_of(tapped: keras.Model, names: list[str], pooling: str) -> Callable[[Any], Any]:
    """The function from preprocessed pixels to the code: `tapped`'s outputs pooled, and joined when several.

    Its layers are made once, so every scale shares them.
    """
    import keras

    if len(names) == 1:
        pool = pooling_layer(tapped.output, pooling, name=f"{pooling}_codes")
        return lambda x: pool(tapped(x))
    pools = [pooling_layer(out, pooling, name=f"{pooling}_{name}") for out, name in zip(tapped.outputs, names)]
    units = [keras.layers.UnitNormalization(name=f"unit_{name}") for name in names]
    join = keras.layers.Concatenate(name="codes_of_layers")
    return lambda x: join([unit(pool(out)) for unit, pool, out in zip(units, pools, tapped(x))])


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
    tapped = trunk(entry, network, [layer])
    if len(tapped.output.shape) != 4:
        raise CnnCodesError(f"{entry.name}'s layer {layer} gives a vector, not a map: it has no heat map")
    pixels, preprocessed = pixel_input(entry, size)
    return keras.Model(pixels, tapped(resized(preprocessed, scale, size)), name=f"{entry.name}_maps_{scale}")


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
    pixels, preprocessed = pixel_input(entry, size)
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


def split_layers(layer: str) -> list[str]:
    """The layer names of `--layer`: one name, or several joined by commas ("block3_pool,block5_pool").

    Args:
        layer: the layer as `ExtractorSpec.layer` records it.

    Returns:
        The names in the order given, spaces around each removed.
    """
    return [name.strip() for name in layer.split(",")]


def check_layers(entry: Backbone, names: Sequence[str], pooling: str) -> None:
    """Refuse layers that cannot make one code, before any image is read or network converted.

    The registry's taps are known good; any other name is looked up in the network's
    architecture, built without weights (this loads TensorFlow).

    Args:
        entry: the backbone's registry entry.
        names: the layers (`split_layers`).
        pooling: how each layer's output is pooled.

    Raises:
        CnnCodesError: an empty or unknown name (`tap`'s message); or, with several layers, a repeated
            one, one of the classifier top (its vector is a code of its own), or flattened maps (each
            one's length depends on the size).
    """
    given = ",".join(names)
    if not all(names):
        raise CnnCodesError(f"--layer takes names joined by commas, e.g. block3_pool,block5_pool (got {given!r})")
    unnamed = [name for name in names if name not in entry.taps + entry.top_taps]
    if unnamed:
        import keras

        network = getattr(keras.applications, entry.constructor)(
            include_top=False, weights=None, input_shape=(None, None, 3)
        )
        for name in unnamed:
            tap(entry, network, name)
    if len(names) == 1:
        return
    repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
    if repeated:
        raise CnnCodesError(f"--layer {given} names {repeated[0]} more than once: give each layer once")
    top = [name for name in names if entry.needs_top(name)]
    if top:
        raise CnnCodesError(
            f"{entry.name}'s {top[0]} is a layer of the classifier top, whose vector is a code on its own: "
            f"give --layer {top[0]} alone, or join convolutional layers only"
        )
    if pooling == "flatten":
        raise CnnCodesError(f"--layer {given} joins pooled codes: use --pooling avg, max or gem, not flatten")


def trunk(entry: Backbone, network: keras.Model, layers: Sequence[str]) -> keras.Model:
    """`network` cut at `layers`: preprocessed pixels in, each layer's output out (a list when several).

    Args:
        entry: the backbone's registry entry, whose usual layers an unknown name's message lists.
        network: the backbone network.
        layers: layer names, each once.

    Returns:
        The model.

    Raises:
        CnnCodesError: the network has no layer of one of the names.
    """
    import keras

    outputs = [tap(entry, network, name).output for name in layers]
    cut = outputs[0] if len(outputs) == 1 else outputs
    return keras.Model(network.inputs, cut, name=f"{entry.name}_to_{'_'.join(layers)}")


def pixel_input(entry: Backbone, size: int) -> tuple[Any, Any]:
    """The model input of `size`-px uint8 RGB pixels, and those pixels preprocessed as `entry` expects.

    Args:
        entry: the backbone's registry entry.
        size: the square input size, in pixels.

    Returns:
        The `keras.Input` and the preprocessed tensor.
    """
    import keras

    from cnncodes.nets.preprocessing import Preprocess

    pixels = keras.Input((size, size, 3), dtype="uint8", name="pixels")
    return pixels, Preprocess(entry.name)(pixels)


def pooling_layer(x: Any, pooling: str, *, name: str) -> Callable[[Any], Any]:
    """The layer that turns the tapped output `x` into a vector: one layer, so every scale shares it.

    Args:
        x: the tapped output (a map, or a vector that is left as it is).
        pooling: `avg`, `max`, `gem` or `flatten`.
        name: the layer's name, unique in its model (several layers each have their own).

    Returns:
        The layer, or the identity for a vector.
    """
    import keras

    from cnncodes.nets.preprocessing import GeneralizedMeanPooling

    if len(x.shape) == 2:  # already a vector (fc1, fc2): nothing to pool
        return lambda vector: vector
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(name=name)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(name=name)
    if pooling == "gem":
        return GeneralizedMeanPooling(name=name)
    return keras.layers.Flatten(name=name)


def resized(x: Any, scale: int, size: int) -> Any:
    """`x`, a batch of `size`-px squares, at `scale` px (itself when the sizes are equal).

    Args:
        x: (batch, size, size, channels) tensor.
        scale: the size wanted, in pixels.
        size: the size of `x`, in pixels.

    Returns:
        The resized tensor.
    """
    from cnncodes.nets.preprocessing import SquareResize

    return x if scale == size else SquareResize(size, scale, name=f"resize_{scale}")(x)
