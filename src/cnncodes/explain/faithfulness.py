"""How faithful a heat map is, measured: deletion and insertion AUC (Petsiuk et al. 2018, "RISE").

A map that looks plausible can still be wrong. The causal test: take pixels away in the
map's order, most important first, and watch the class's probability. A faithful map makes
it fall fast (deletion: low area under the curve); putting the pixels back in the same
order onto an image with the information blurred away makes it rise fast (insertion: high
area). Each curve has `steps` + 1 points, 0 to 100 % of the pixels in steps of 100/`steps`
% (RISE's protocol here: 20 steps of 5 %); its area (trapezoids, the x axis from 0 to 1) is
in [0, 1] as the probabilities are.

Deleted pixels get the network's ZERO INPUT, the pixel its preprocessing maps to 0
(`Backbone.zero_pixel`), as RISE zeroes the normalised tensor: nothing, to the network,
rather than black, which is a strong signal. Insertion starts from a Gaussian blur of the
image (sigma a fraction of its side), as RISE's does.

All images' versions at one step go through `score` together, in chunks of `batch_size`,
so explaining many images costs forward passes of full batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from cnncodes.core.errors import CnnCodesError

# RISE's protocol: 20 steps of 5 % of the pixels.
STEPS = 20
# Insertion's starting image: a Gaussian blur of sigma 5 % of the image's side.
BLUR = 0.05

# The whole pipeline on uint8 images (m, H, W, 3): (m, classes) probabilities.
Score = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Faithfulness:
    """Per image, the deletion and insertion curves of the explained class's probability and their areas.

    Attributes:
        deletion: (n,) area under the deletion curve, in [0, 1]: lower is more faithful.
        insertion: (n,) area under the insertion curve, in [0, 1]: higher is more faithful.
        deletion_curve: (n, steps + 1) the probability with 0, 1/steps, ..., all of the pixels deleted.
        insertion_curve: (n, steps + 1) the probability with 0, ..., all of the pixels put back.
    """

    deletion: np.ndarray
    insertion: np.ndarray
    deletion_curve: np.ndarray
    insertion_curve: np.ndarray


def faithfulness(
    score: Score,
    *,
    pixels: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    zero_pixel: Sequence[int],
    steps: int = STEPS,
    blur: float = BLUR,
    batch_size: int = 64,
) -> Faithfulness:
    """Deletion and insertion AUC of each image's map for its class, batched across images.

    Pixels are taken in the order of the map, highest first; equal values in raster order
    (row by row, left to right), so a map with ties gives the same numbers every time.

    Args:
        score: the whole pipeline on uint8 images (m, H, W, 3), giving (m, classes) probabilities.
        pixels: (n, H, W, 3) uint8, the images as the network sees them.
        maps: (n, H, W) float, each image's map at the images' resolution.
        classes: (n,) the class each map explains.
        zero_pixel: the uint8 RGB deleted pixels get (`Backbone.zero_pixel`).
        steps: points of each curve besides its start.
        blur: sigma of insertion's Gaussian blur, as a fraction of the image's side.
        batch_size: images per call of `score`.

    Returns:
        The curves and their areas.

    Raises:
        CnnCodesError: the inputs' shapes do not match, a map is not finite, or `score` gives the wrong shape.
    """
    pixels, maps, classes = np.asarray(pixels), np.asarray(maps), np.asarray(classes).astype(np.int64)
    _check(pixels, maps, classes)
    n, height, width = maps.shape
    ranks = _ranks(maps)
    counts = np.rint(np.arange(steps + 1) * (height * width) / steps).astype(np.int64)
    starts = (pixels, _blurred(pixels, blur=blur))
    fills = (np.broadcast_to(np.asarray(zero_pixel, np.uint8), pixels.shape), pixels)
    # One job per (curve, step, image): consecutive jobs are all images at one step.
    curve, step, image = (
        a.ravel() for a in np.meshgrid(np.arange(2), np.arange(steps + 1), np.arange(n), indexing="ij")
    )
    probabilities = np.empty(len(image))
    for lo in range(0, len(image), batch_size):
        c, t, i = curve[lo : lo + batch_size], step[lo : lo + batch_size], image[lo : lo + batch_size]
        changed = (ranks[i] < counts[t][:, None, None])[..., None]
        start = np.where((c == 0)[:, None, None, None], starts[0][i], starts[1][i])
        fill = np.where((c == 0)[:, None, None, None], fills[0][i], fills[1][i])
        probabilities[lo : lo + batch_size] = _scored(score, np.where(changed, fill, start), classes[i])
    deletion_curve, insertion_curve = probabilities.reshape(2, steps + 1, n).transpose(0, 2, 1)
    return Faithfulness(
        deletion=np.asarray(np.trapezoid(deletion_curve, dx=1 / steps, axis=1)),
        insertion=np.asarray(np.trapezoid(insertion_curve, dx=1 / steps, axis=1)),
        deletion_curve=deletion_curve,
        insertion_curve=insertion_curve,
    )


def random_baseline(
    score: Score,
    *,
    pixels: np.ndarray,
    classes: np.ndarray,
    zero_pixel: Sequence[int],
    grid: tuple[int, int],
    seed: int = 0,
    steps: int = STEPS,
    blur: float = BLUR,
    batch_size: int = 64,
) -> Faithfulness:
    """The same scores for seeded random maps: what a map must beat to mean anything.

    The noise is drawn per cell of `grid`, the explained feature map's, and upsampled like a
    heat map, not per pixel: the real maps delete contiguous blobs of that size, and scattered
    single pixels are another perturbation (they wreck fine texture everywhere, to which
    networks react differently), so the comparison would measure the grain, not where the map
    points. `grid` = the image's own size gives per-pixel noise.

    Args:
        score: the whole pipeline, as for `faithfulness`.
        pixels: (n, H, W, 3) uint8, the images as the network sees them.
        classes: (n,) the class each image is explained for.
        zero_pixel: the uint8 RGB deleted pixels get (`Backbone.zero_pixel`).
        grid: (rows, columns) of the explained feature map.
        seed: the random maps' seed.
        steps: as for `faithfulness`.
        blur: as for `faithfulness`.
        batch_size: as for `faithfulness`.

    Returns:
        The curves and their areas for the random maps.
    """
    pixels = np.asarray(pixels)
    maps = random_maps(len(pixels), grid=grid, size=(pixels.shape[1], pixels.shape[2]), seed=seed)
    return faithfulness(
        score,
        pixels=pixels,
        maps=maps,
        classes=classes,
        zero_pixel=zero_pixel,
        steps=steps,
        blur=blur,
        batch_size=batch_size,
    )


def random_maps(n: int, *, grid: tuple[int, int], size: tuple[int, int], seed: int) -> np.ndarray:
    """Uniform noise per cell of `grid`, upsampled bilinearly with half-pixel centres to `size` (rows, columns).

    Args:
        n: how many maps.
        grid: (rows, columns) of cells.
        size: (height, width) of the maps.
        seed: the noise's seed.

    Returns:
        (n, height, width) float32 maps.
    """
    cells = np.random.default_rng(seed).random((n, *grid), dtype=np.float32)
    height, width = size
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((width, height), Image.Resampling.BILINEAR)) for c in cells]
    ).reshape(n, height, width)


def _blurred(pixels: np.ndarray, *, blur: float = BLUR) -> np.ndarray:
    """Insertion's starting images: each image under a Gaussian blur of sigma `blur` times its longer side.

    Args:
        pixels: (n, H, W, 3) uint8.
        blur: sigma as a fraction of the side.

    Returns:
        (n, H, W, 3) uint8.
    """
    sigma = blur * max(pixels.shape[1:3])
    kernel = ImageFilter.GaussianBlur(radius=sigma)
    return np.stack([np.asarray(Image.fromarray(image).filter(kernel)) for image in pixels]).reshape(pixels.shape)


def _ranks(maps: np.ndarray) -> np.ndarray:
    """Each pixel's place in its map's order: 0 for the highest, ties in raster order."""
    n = len(maps)
    flat = maps.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(flat.shape[1])[None, :].repeat(n, axis=0), axis=1)
    return ranks.reshape(maps.shape)


def _scored(score: Score, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The probability of each image's class, once `score` gave one row per image."""
    probabilities = np.asarray(score(images))
    if probabilities.ndim != 2 or len(probabilities) != len(images) or classes.max() >= probabilities.shape[1]:
        raise CnnCodesError(
            f"score gave shape {probabilities.shape} for {len(images)} images: it must give one row of "
            f"class probabilities per image, with class {classes.max()} in it"
        )
    return probabilities[np.arange(len(images)), classes]


def _check(pixels: np.ndarray, maps: np.ndarray, classes: np.ndarray) -> None:
    if pixels.ndim != 4 or pixels.shape[3] != 3 or pixels.dtype != np.uint8:
        raise CnnCodesError(f"pixels of shape {pixels.shape} and type {pixels.dtype}: give uint8 (n, H, W, 3) images")
    if maps.shape != pixels.shape[:3]:
        raise CnnCodesError(
            f"maps of shape {maps.shape} for images {pixels.shape[:3]}: upsample each map to its image's size first"
        )
    if classes.shape != (len(pixels),) or (len(classes) and classes.min() < 0):
        raise CnnCodesError(f"classes {classes.shape} for {len(pixels)} images: give one class index per image")
    if not np.isfinite(maps).all():
        raise CnnCodesError("a map holds NaN or infinite values: faithfulness needs an order of the pixels")
