"""What a layer makes of one image: its most active channels' maps side by side, one grid PNG per image."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnncodes.codes.spec import ExtractorSpec
from cnncodes.core.errors import CnnCodesError
from cnncodes.explain.grid import MAX_COLUMNS, write_grid
from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.models import tap
from cnncodes.nets.weights import Weights

# Channels shown unless told: a 4 x 4 grid; at most an 8 x 8 one.
CHANNELS = 16
# The side of a tile: a 7 x 7 map shows cells of 13 px.
_CELL = 96


def feature_map_grid(
    pixels: np.ndarray,
    *,
    layer: str,
    paths: Sequence[Path],
    extractor: ExtractorSpec | str,
    weights: Weights | None = None,
    channels: int = CHANNELS,
    batch_size: int = 8,
) -> list[list[int]]:
    """Write each image's activations at `layer` as a grid PNG: its most active channels, each normalised alone.

    Channels are ranked by their mean over the map, per image; each tile is scaled from its own
    minimum to its own maximum (viridis), so a tile shows where its channel fires, not how much
    it fires against the others, and is captioned with its channel index.

    Args:
        pixels: (n, height, width, 3) uint8 RGB images, as the network sees them (decoded and resized).
        layer: the layer whose maps are shown (`cnncodes layers BACKBONE` lists them).
        paths: one PNG to write per image.
        extractor: the spec of the extractor whose network is shown (its weights are found again and
            checked, `find_weights`), or a registry name.
        weights: the weights to load: needed with a registry name; with a spec, they replace those it finds.
        channels: channels shown per image, 1 to 64.
        batch_size: images per forward pass.

    Returns:
        Each image's channels shown, most active first (the grid's order).

    Raises:
        CnnCodesError: a bad argument, no such layer, a layer without a map (a vector), or weights not found.
    """
    import keras

    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.dtype != np.uint8 or len(pixels) != len(paths):
        raise CnnCodesError(f"pixels must be (n, height, width, 3) uint8 with one path each (got {pixels.shape})")
    if not 1 <= channels <= MAX_COLUMNS * MAX_COLUMNS:
        raise CnnCodesError(f"channels must be 1 to {MAX_COLUMNS * MAX_COLUMNS} (got {channels})")
    if isinstance(extractor, ExtractorSpec):  # a spec of the classifier top loads the top's weights file
        entry, built, loaded = get_backbone(extractor.backbone), extractor.layer, weights or extractor.find_weights()
    elif weights is None:
        raise CnnCodesError(f"feature maps of {extractor} need its weights: pass weights=")
    else:
        entry, built, loaded = get_backbone(extractor), layer, weights
    entry.check_size(min(pixels.shape[1:3]), built)
    network = entry.build_network(pixels.shape[1] if entry.needs_top(built) else None, built, loaded)
    output = tap(entry, network, layer).output
    if len(output.shape) != 4:
        raise CnnCodesError(f"{layer} gives a vector, not feature maps: choose a convolutional layer")
    trunk = keras.Model(network.inputs, output)
    shown = []
    for start in range(0, len(pixels), batch_size):
        batch = entry.preprocess_input(pixels[start : start + batch_size].astype(np.float32))
        for maps, path in zip(np.asarray(trunk.predict_on_batch(batch)), paths[start : start + batch_size]):
            order = np.argsort(-maps.mean(axis=(0, 1)), kind="stable")[:channels]
            write_grid(path, [_coloured(maps[..., c]) for c in order], [str(c) for c in order], cell=_CELL)
            shown.append([int(c) for c in order])
    return shown


def _coloured(values: np.ndarray) -> np.ndarray:
    """One map from its minimum to its maximum in viridis, uint8 RGB (a constant map is all dark)."""
    from matplotlib import colormaps

    spread = float(values.max() - values.min())
    scaled = (values - values.min()) / spread if spread > 0 else np.zeros_like(values)
    return (colormaps["viridis"](scaled)[..., :3] * 255).astype(np.uint8)
