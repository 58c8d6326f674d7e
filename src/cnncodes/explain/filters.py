"""What each channel of a layer responds to: the picture that excites it most (activation maximisation).

The recipe is the Keras example "Visualizing what convnets learn": gradient ascent from faint
noise on the network's input, each step's gradient L2-normalised, the loss the channel's mean
activation away from the border of its map (border cells see padding, and would reward edge
artefacts). Two changes make it right for every backbone: the ascent runs in the network's own
input space, measured from the backbone's preprocessing (BGR minus the ImageNet means for VGG and
ResNet, [-1, 1] for MobileNetV2), and the pictures are mapped back to RGB through its inverse; and
where the layer ends in a ReLU (or ReLU6) the value before it is maximised, since a channel that
starts at or below zero gives the ReLU's output no gradient to climb.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import write_json_atomic
from cnncodes.core.progress import progress_bar
from cnncodes.explain.grid import MAX_COLUMNS, write_grid
from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.models import tap

if TYPE_CHECKING:
    import keras

# The Keras example's ascent: 30 steps of learning rate 10 on a 180-px image in [-1, 1] moves each
# value by about 4 grey levels (RMS) per step, from mid-grey noise of +-16 levels; its pictures lose
# 25 of 180 px on each side, where the loss never looked.
STEPS = 30
STEP_LEVELS = 10 * 127.5 / math.sqrt(180 * 180 * 3)
NOISE_LEVELS = 16.0
CROP = 25 / 180
# The activation map's cells left out of the loss on each side, as the example does (fewer on a small map).
BORDER = 2
# Filter pictures drawn unless told; the grid shows at most this many, the best by loss.
FILTERS = MAX_COLUMNS * MAX_COLUMNS
# The input size unless told: a cheaper ascent than the networks' 224 px, with as much to see as the example's 180.
SIZE = 128
# The smallest tile in the grid: room for a channel's index under it.
_MIN_CELL = 64


@dataclass(frozen=True)
class InputSpace:
    """How a network's input relates to RGB pixels 0–255: `input = pixels @ matrix + offset`, per pixel.

    Attributes:
        matrix: 3 x 3; a permutation matrix times a scale for BGR networks.
        offset: what an all-black pixel becomes.
    """

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def of(cls, preprocess: Callable[[np.ndarray], Any]) -> InputSpace:
        """The space a preprocessing function maps pixels to, measured from the function itself.

        Args:
            preprocess: float RGB pixels 0–255 in, network input out (a backbone's `preprocess_input`).

        Returns:
            The space.

        Raises:
            CnnCodesError: the function is not the same affine map of every pixel's channels.
        """
        probes = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.float32)
        mapped = np.asarray(preprocess(probes.reshape(4, 1, 1, 3).copy()), np.float64).reshape(4, 3)
        space = cls(matrix=(mapped[1:] - mapped[0]) / 255, offset=mapped[0])
        check = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
        if not np.allclose(np.asarray(preprocess(check.copy())), space.to_input(check), atol=1e-3):
            raise CnnCodesError("this preprocessing is not one affine map of each pixel: give the network's input")
        return space

    def to_input(self, pixels: np.ndarray) -> np.ndarray:
        return (pixels @ self.matrix + self.offset).astype(np.float32)

    def to_pixels(self, x: np.ndarray) -> np.ndarray:
        return (x - self.offset) @ np.linalg.inv(self.matrix)

    @property
    def level(self) -> float:
        """One grey level in input units (1 for caffe's BGR, 1/127.5 for [-1, 1])."""
        return float(abs(np.linalg.det(self.matrix)) ** (1 / 3))


@dataclass(frozen=True)
class FilterPicture:
    """One channel's picture and how strongly it excites the channel.

    Attributes:
        filter: the channel's index in the layer.
        loss: the channel's mean value (before the ReLU, if any) inside the border, on the final picture.
        pixels: the picture, uint8 RGB, contrast-stretched and its unseen border cropped.
    """

    filter: int
    loss: float
    pixels: np.ndarray


@dataclass(frozen=True)
class FiltersResult:
    """What `draw_filters` wrote: the grid, its JSON, the tiles best first, and what was maximised."""

    png: Path
    json: Path
    tiles: list[FilterPicture]
    maximised: str


def maximised_model(model: keras.Model, layer: str) -> tuple[keras.Model, str]:
    """The model from `model`'s input to what is maximised at `layer`, and what that is in words.

    Args:
        model: a Keras functional model.
        layer: one of its layers' names.

    Returns:
        The model, and e.g. "block1_conv2 before its ReLU".

    Raises:
        CnnCodesError: `model` has no such layer (the message lists its layers).
    """
    import keras

    found, kind = _layer_kind(model, layer)
    words = _MAXIMISED[kind].format(layer=layer)
    if kind == "relu input":
        return keras.Model(model.inputs, found.input), words
    if kind == "before relu":
        linear = type(found).from_config(found.get_config() | {"activation": "linear", "name": f"{layer}_before_relu"})
        before = linear(found.input)
        linear.set_weights(found.get_weights())
        return keras.Model(model.inputs, before), words
    return keras.Model(model.inputs, found.output), words


def maximised(model: keras.Model, layer: str) -> str:
    """What `filter_pictures` maximises at `layer`, in words (`maximised_model`'s, without building it)."""
    return _MAXIMISED[_layer_kind(model, layer)[1]].format(layer=layer)


_MAXIMISED = {
    "relu input": "the input of {layer}, a ReLU",
    "before relu": "{layer} before its ReLU",
    "output": "the output of {layer}",
}


def _layer_kind(model: keras.Model, layer: str) -> tuple[Any, str]:
    """The layer, and which of `_MAXIMISED` it has maximised: a ReLU's input, a layer's value before its own ReLU."""
    import keras

    try:
        found = model.get_layer(layer)
    except ValueError:
        names = ", ".join(each.name for each in model.layers[1:])
        raise CnnCodesError(f"{model.name} has no layer {layer!r}: use one of {names}") from None
    if isinstance(found, keras.layers.ReLU) or (
        isinstance(found, keras.layers.Activation) and _is_relu(found.activation)
    ):
        return found, "relu input"
    return found, "before relu" if _is_relu(getattr(found, "activation", None)) else "output"


def _is_relu(activation: Any) -> bool:
    return getattr(activation, "__name__", "") in ("relu", "relu6")


def filter_pictures(
    model: keras.Model,
    *,
    layer: str,
    space: InputSpace,
    filters: Sequence[int],
    size: int,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = 8,
    advance: Callable[[int], None] | None = None,
) -> list[FilterPicture]:
    """The picture that maximises each of `filters` at `layer`, by gradient ascent on `model`'s input.

    Args:
        model: any Keras model taking the network's float input (after preprocessing), (n, size, size, 3).
        layer: the layer whose channels are drawn; before its ReLU if it ends in one.
        space: how that input relates to RGB pixels (`InputSpace.of(backbone.preprocess_input)`).
        filters: the channel indices to draw.
        size: the pictures' side in pixels before the border is cropped.
        steps: gradient ascent steps.
        seed: the starting noise.
        batch_size: pictures climbed at once (each on its own channel).
        advance: called with the number of pictures finished, for a progress bar.

    Returns:
        One picture per filter, in the order of `filters`.

    Raises:
        CnnCodesError: no such layer, or a channel index the layer does not have.
    """
    target, _ = maximised_model(model, layer)
    channels = int(target.output.shape[-1])
    wrong = [f for f in filters if not 0 <= f < channels]
    if wrong:
        raise CnnCodesError(f"{layer} has channels 0 to {channels - 1}, not {wrong[0]}: choose among those")
    ascend = _ascent(target, channels, rate=STEP_LEVELS * space.level * math.sqrt(size * size * 3))
    rng = np.random.default_rng(seed)
    pictures = []
    for start in range(0, len(filters), batch_size):
        chosen = np.asarray(filters[start : start + batch_size], np.int32)
        noise = rng.uniform(-NOISE_LEVELS, NOISE_LEVELS, (len(chosen), size, size, 3)) + 127.5
        x, losses = ascend(space.to_input(noise), chosen, steps)
        pictures += [
            FilterPicture(filter=int(f), loss=float(loss), pixels=_displayed(space.to_pixels(image)))
            for f, loss, image in zip(chosen, losses, x)
        ]
        if advance is not None:
            advance(len(chosen))
    return pictures


def _ascent(target: keras.Model, channels: int, *, rate: float) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """`ascend(x, filters, steps)`: each image of `x` climbed towards its own filter; the images and final losses."""
    import tensorflow as tf

    def losses(x: Any, mask: Any) -> Any:
        values = target(x, training=False)
        if len(values.shape) == 4:
            height, width = values.shape[1], values.shape[2]
            bh, bw = min(BORDER, (height - 1) // 2), min(BORDER, (width - 1) // 2)
            values = values[:, bh : height - bh, bw : width - bw, :]
        picked = tf.reduce_sum(values * tf.reshape(mask, [-1] + [1] * (len(values.shape) - 2) + [channels]), -1)
        return tf.reduce_mean(tf.reshape(picked, [tf.shape(picked)[0], -1]), axis=1)

    @tf.function(reduce_retracing=True)
    def step(x: Any, mask: Any) -> Any:
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(losses(x, mask))
        return x + rate * tf.math.l2_normalize(tape.gradient(total, x), axis=[1, 2, 3])

    def ascend(x: np.ndarray, filters: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
        mask = tf.one_hot(filters, channels)
        image = tf.convert_to_tensor(x)
        for _ in range(steps):
            image = step(image, mask)
        return image.numpy(), losses(image, mask).numpy()

    return ascend


def _displayed(pixels: np.ndarray) -> np.ndarray:
    """The example's display: centred on mid-grey with a standard deviation of 15 %, the unseen border cropped.

    Stretching all channels together keeps the colours' balance, which is what the picture is about.
    """
    stretched = (pixels - pixels.mean()) / (pixels.std() + 1e-5) * 0.15 + 0.5
    crop = int(len(pixels) * CROP)
    if crop:
        stretched = stretched[crop:-crop, crop:-crop]
    return (np.clip(stretched, 0, 1) * 255).astype(np.uint8)


def draw_filters(
    *,
    backbone: str,
    layer: str,
    out: Path,
    filters: int = FILTERS,
    size: int = SIZE,
    steps: int = STEPS,
    weights: str = "imagenet",
    seed: int = 0,
    progress: bool = True,
) -> FiltersResult:
    """Draw `filters` channels of a backbone's layer and write the best 64 as `out/filters.png` and `filters.json`.

    Args:
        backbone: a registry name.
        layer: the layer whose channels are drawn (`cnncodes layers BACKBONE` lists them).
        out: the folder to write to (created if missing); nothing is written elsewhere.
        filters: how many channels to draw, chosen at random (by `seed`) when the layer has more.
        size: the pictures' side in pixels before cropping (the classifier top's layers take the backbone's size).
        steps: gradient ascent steps.
        weights: `imagenet`, `none` (untrained, seeded) or the path of a Keras weights file.
        seed: picks the channels and the starting noise.
        progress: show a progress bar.

    Returns:
        What was written.

    Raises:
        CnnCodesError: unknown backbone or layer, a size the backbone does not take, or weights not found.
    """
    if filters < 1 or steps < 1:
        raise CnnCodesError(f"filters and steps must be at least 1 (got {filters} and {steps})")
    entry = get_backbone(backbone)
    resolved = entry.resolve_weights(weights, layer)
    network = entry.build_network(size, layer, resolved)
    channels = int(tap(entry, network, layer).output.shape[-1])
    rng = np.random.default_rng(seed)
    drawn = list(range(channels)) if filters >= channels else sorted(rng.choice(channels, filters, replace=False))
    with progress_bar(f"{entry.name} {layer}", total=len(drawn), unit="filter", enabled=progress) as advance:
        pictures = filter_pictures(
            network,
            layer=layer,
            space=InputSpace.of(entry.preprocess_input),
            filters=[int(f) for f in drawn],
            size=size,
            steps=steps,
            seed=seed,
            advance=advance,
        )
    what = maximised(network, layer)
    run: dict[str, Any] = {"backbone": entry.name, "layer": layer, "maximised": what, "weights": resolved.kind}
    run |= {"weights_sha256": resolved.sha256, "size": size, "steps": steps, "seed": seed}
    best = sorted(pictures, key=lambda picture: -picture.loss)[:FILTERS]
    png, described = _write(out, best, run | {"drawn": len(drawn), "channels": channels})
    return FiltersResult(png=png, json=described, tiles=best, maximised=what)


def _write(out: Path, best: list[FilterPicture], run: dict[str, Any]) -> tuple[Path, Path]:
    """`out/filters.png`, the pictures best first, and `out/filters.json`: `run` and where each tile is."""
    png, described = out / "filters.png", out / "filters.json"
    cell = max(_MIN_CELL, len(best[0].pixels))
    places = write_grid(png, [p.pixels for p in best], [str(p.filter) for p in best], cell=cell)
    tiles = [
        {"tile": i, "row": row, "column": column, "layer": run["layer"], "filter": p.filter, "loss": p.loss}
        for i, ((row, column), p) in enumerate(zip(places, best))
    ]
    write_json_atomic(described, run | {"tiles": tiles})
    return png, described
