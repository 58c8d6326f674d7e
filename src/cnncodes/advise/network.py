"""One forward pass for every candidate: the backbone tapped at its registry depths, each tap pooled three ways.

The model takes the extractor's pixels (the largest of the backbone's code sizes) and, for
each size, runs the shared network once, pools every tapped map by average, maximum and
generalised mean inside the graph, and concatenates the pooled vectors into one row: no
feature map ever leaves the model, so a row costs a few thousand numbers whatever the
depth. `TapLayout` says which columns of a row are which (size, layer, pooling); every
candidate's codes are columns of these rows (`candidates`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncodes.core import files as artifacts
from cnncodes.core.progress import warn
from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.weights import Weights
from cnncodes.runtime.child import in_child
from cnncodes.runtime.runners import Runner, cache_dir, make_runner

if TYPE_CHECKING:
    import keras

# The poolings every tap is measured with (generalised mean: p = 3, for post-ReLU maps).
POOLINGS: tuple[str, ...] = ("avg", "max", "gem")
# Bump when the tapped model is built differently, so no cached model of the old build is reused.
TAPS_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class TapLayout:
    """Which columns of a forward-pass row hold which pooled tap.

    A row is, for each size in `sizes`, for each layer in `layers`, for each pooling in
    `poolings`, that layer's pooled vector of `channels[layer]` numbers.

    Attributes:
        backbone: the registry name.
        layers: the tapped layers, shallow to deep.
        poolings: the poolings of every tap.
        sizes: the input sizes, each a forward pass of the shared network.
        channels: each layer's number of channels.
    """

    backbone: str
    layers: tuple[str, ...]
    poolings: tuple[str, ...]
    sizes: tuple[int, ...]
    channels: dict[str, int] = field(default_factory=dict)

    @property
    def width(self) -> int:
        """Numbers per row."""
        return len(self.sizes) * len(self.poolings) * sum(self.channels[layer] for layer in self.layers)

    def columns(self, *, size: int, layer: str, pooling: str) -> slice:
        """The columns of one pooled tap at one size.

        Args:
            size: one of `sizes`.
            layer: one of `layers`.
            pooling: one of `poolings`.

        Returns:
            The slice of a row.
        """
        start = 0
        for s, name, how in self._segments():
            width = self.channels[name]
            if (s, name, how) == (size, layer, pooling):
                return slice(start, start + width)
            start += width
        raise KeyError(f"no tap {layer}/{pooling} at {size} px in this layout")

    def _segments(self) -> Iterator[tuple[int, str, str]]:
        for size in self.sizes:
            for layer in self.layers:
                for pooling in self.poolings:
                    yield size, layer, pooling

    @property
    def key(self) -> str:
        """Equal keys mean equal models (weights aside: the caller adds their identity)."""
        return artifacts.sha256_json(
            ["advise-taps", TAPS_FORMAT, self.backbone, self.layers, self.poolings, self.sizes]
        )


def tap_channels(backbone: str, layers: Sequence[str]) -> dict[str, int]:
    """Each layer's channels: read once off an untrained network built in a child process, then kept in the cache.

    Args:
        backbone: the registry name.
        layers: layers of that backbone.

    Returns:
        The channels of each layer.
    """
    kept = cache_dir() / "taps" / f"{artifacts.sha256_json(['channels', backbone, list(layers)])[:32]}.json"
    try:
        channels = {str(k): int(v) for k, v in artifacts.read_object(kept).items()}
        if list(channels) == list(layers):
            return channels
    except Exception:  # absent or damaged: read off the network again
        pass
    channels = in_child(partial(_channels, backbone, tuple(layers)))
    with contextlib.suppress(OSError):  # a cache that cannot be written: read them again next time
        artifacts.write_json_atomic(kept, channels)
    return channels


def _channels(backbone: str, layers: tuple[str, ...]) -> dict[str, int]:
    from cnncodes.nets.models import trunk

    entry = get_backbone(backbone)
    network = entry.build_network(None, entry.default_layer, Weights("none"))
    outputs = trunk(entry, network, layers).outputs
    return {layer: int(output.shape[-1]) for layer, output in zip(layers, outputs)}


def build_taps(layout: TapLayout, weights: Weights) -> keras.Model:
    """The tapped model: uint8 pixels at the largest size in, one row of every pooled tap at every size out.

    Args:
        layout: what to tap, pool and at which sizes.
        weights: the backbone's resolved weights.

    Returns:
        The Keras model.
    """
    import keras

    from cnncodes.nets.models import pixel_input, pooling_layer, resized, trunk

    entry = get_backbone(layout.backbone)
    size = max(layout.sizes)
    several = len(layout.sizes) > 1
    network = entry.build_network(None if several else size, entry.default_layer, weights)
    tapped = trunk(entry, network, layout.layers)
    maps = tapped.outputs
    pools = {
        (layer, how): pooling_layer(maps[i], how, name=f"{how}_{i}")
        for i, layer in enumerate(layout.layers)
        for how in layout.poolings
    }
    pixels, preprocessed = pixel_input(entry, size)
    parts = []
    for scale in layout.sizes:
        outputs = tapped(resized(preprocessed, scale, size))
        outputs = outputs if isinstance(outputs, list) else [outputs]
        for i, layer in enumerate(layout.layers):
            parts += [pools[layer, how](outputs[i]) for how in layout.poolings]
    row = keras.layers.Concatenate(name="taps")(parts) if len(parts) > 1 else parts[0]
    return keras.Model(pixels, row, name=f"{entry.name}_taps")


def taps_runner(layout: TapLayout, weights: Weights, *, identity: Any, runtime: str = "onnx") -> Runner:
    """The tapped model on `runtime`, converted once and cached like every extractor.

    Args:
        layout: what the model taps.
        weights: the weights to build it with on a cache miss.
        identity: what makes these weights these weights (e.g. the extractor's `network_key`).
        runtime: `onnx` or `keras`.

    Returns:
        The runner: uint8 pixels in, rows of `layout.width` numbers out.
    """
    key = artifacts.sha256_json([layout.key, identity])
    build = partial(build_taps, layout, weights)
    return make_runner(build, key, runtime, notice=warn, label=f"{layout.backbone}'s taps")


def pooled(rows: np.ndarray, layout: TapLayout, *, layer: str, pooling: str, size: int) -> np.ndarray:
    """One tap's pooled vectors at one size, from rows of the tapped model.

    Args:
        rows: (n, width) forward-pass rows.
        layout: their layout.
        layer: the layer.
        pooling: the pooling.
        size: the input size.

    Returns:
        (n, channels) float32.
    """
    return rows[:, layout.columns(size=size, layer=layer, pooling=pooling)]
