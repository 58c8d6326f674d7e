"""Network surgery for fine-tuning: which layers train, where the frozen trunk is cut, what is saved.

The phases freeze and unfreeze the backbone's layers in place; `--cache-trunk` trains the
same layer objects above the cut on activations computed once, so training the top trains
the whole model that is saved.
"""

from __future__ import annotations

import keras

from cnncodes.core.errors import CnnCodesError
from cnncodes.nets.models import HEAD_LAYERS


def cached_top(model: keras.Model, network: keras.Model, cut: str) -> keras.Model:
    """The part of `model` above `cut`, taking the activations there: same layers, so training it trains `model`.

    Args:
        model: the fine-tuning model (`build_classifier`).
        network: its backbone.
        cut: the backbone's last frozen layer (`cut_layer`).

    Returns:
        A model from the activations at `cut` to the class probabilities.

    Raises:
        CnnCodesError: layers above the cut also read earlier outputs, so the cut is no boundary.
    """
    try:
        top = keras.Model(network.get_layer(cut).output, network.output, name=f"{network.name}_after_{cut}")
    except ValueError:  # Keras: the output is not connected to that input alone
        raise CnnCodesError(
            f"--cache-trunk cannot cut {network.name} after {cut!r}: layers above it also read earlier "
            "outputs (a residual connection); give --unfreeze the last layer of a block"
        ) from None
    codes = keras.Input(top.input_shape[1:], name="trunk_codes")
    x = top(codes, training=False)
    for name in HEAD_LAYERS:
        x = model.get_layer(name)(x)
    return keras.Model(codes, x, name=f"{model.name}_on_cached_trunk")


def set_trainable(network: keras.Model, start: int | None) -> None:
    """Freeze the backbone, or unfreeze its layers from index `start` on; BatchNormalization stays frozen either way.

    Args:
        network: the backbone.
        start: the first layer to train (`first_unfrozen`), or None to freeze them all.
    """
    network.trainable = start is not None
    if start is None:
        return
    for i, layer in enumerate(network.layers):
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)


def cut_layer(network: keras.Model, start: int) -> str:
    """The last frozen layer when layers from `start` on train: where `--cache-trunk` cuts the network.

    Args:
        network: the backbone.
        start: the first layer phase 2 trains.

    Returns:
        The name of the layer before `start`.

    Raises:
        CnnCodesError: no layer but the input would stay frozen.
    """
    if start < 2:  # layer 0 is the input: nothing would be frozen, nothing to cache
        raise CnnCodesError(f"--unfreeze leaves no frozen layer of {network.name} to cache: drop --cache-trunk")
    return network.layers[start - 1].name


def first_unfrozen(network: keras.Model, unfreeze: str | int) -> int:
    """The index of the first layer phase 2 trains: after the named layer, or the last `unfreeze` layers.

    Args:
        network: the backbone.
        unfreeze: a layer name or a count of last layers (`parse_unfreeze`).

    Returns:
        An index into `network.layers`.

    Raises:
        CnnCodesError: no such layer, more layers than the network has, or its last layer.
    """
    names = [layer.name for layer in network.layers]
    if isinstance(unfreeze, int):
        if unfreeze > len(names):
            raise CnnCodesError(f"--unfreeze {unfreeze}: {network.name} has {len(names)} layers, give at most that")
        return len(names) - unfreeze
    if unfreeze in names[:-1]:
        return names.index(unfreeze) + 1
    if unfreeze == names[-1]:  # as --unfreeze 0 is refused
        raise CnnCodesError(
            f"--unfreeze {unfreeze} is {network.name}'s last layer: nothing after it would train; "
            "to train the head only, use --fine-epochs 0"
        )
    raise CnnCodesError(f"--unfreeze {unfreeze!r}: give a layer name of {network.name} or a number of last layers")


def for_inference(model: keras.Model) -> keras.Model:
    """The trained model without its optimizer, as it is saved.

    The optimizer's state (Adam's two slots per trained weight) would double or triple the
    file and make its size depend on how it was trained, and `predict` never uses it.

    Args:
        model: the trained model.

    Returns:
        A model of the same layers and weights, never compiled.
    """
    return keras.Model(model.inputs, model.outputs, name=model.name)
