"""Putting maps where they belong: the views' maps on one grid, and that grid on the original image.

Both steps keep what a map means. Views of different grids (an image seen at several sizes)
are resampled by exact area overlap, which keeps every map's mean, so the mean of the
combined map is still the mean over views that the code is. A grid is laid on the image
through the box the decoder cut the network's square from, sampled at pixel centres: a
corner-aligned zoom would shift a 7×7 map by half a cell.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import map_coordinates


def area_matrix(cells_in: int, cells_out: int) -> np.ndarray:
    """(cells_out, cells_in): each output cell's share of every input cell, by overlap along one axis.

    Rows sum to 1 (an output cell is an average), so resampling keeps a map's mean.
    """
    edges_in = np.arange(cells_in + 1) / cells_in
    edges_out = np.arange(cells_out + 1) / cells_out
    low = np.maximum(edges_out[:-1, None], edges_in[None, :-1])
    high = np.minimum(edges_out[1:, None], edges_in[None, 1:])
    return np.clip(high - low, 0, None) * cells_out


def on_grid(maps: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """(images, rows, columns, k) maps resampled to `rows`×`columns` by area overlap."""
    down = area_matrix(maps.shape[1], rows)
    across = area_matrix(maps.shape[2], columns)
    return np.einsum("ih,nhwk,jw->nijk", down, maps, across)


def combined(views: Sequence[np.ndarray], mirrored: Sequence[bool]) -> np.ndarray:
    """The views' maps (mirror views turned back) on the finest view's grid, averaged as the code averages them.

    Args:
        views: per view, (images, rows, columns, k) maps.
        mirrored: per view, whether it is of the mirror image.

    Returns:
        (images, rows, columns, k) maps whose mean is the mean over the views of their means.
    """
    rows, columns = max(v.shape[1] for v in views), max(v.shape[2] for v in views)
    turned = [v[:, :, ::-1] if flipped else v for v, flipped in zip(views, mirrored)]
    return np.mean([on_grid(v, rows, columns) for v in turned], axis=0)


def upsampled(grid: np.ndarray, box: Sequence[float], width: int, height: int) -> np.ndarray:
    """A map sampled at the centre of every pixel of a `width`×`height` image; NaN where the box does not reach.

    Args:
        grid: (rows, columns) map covering `box`.
        box: (left, top, right, bottom) of the square the network saw, in the image's pixels.
        width: the image's width.
        height: the image's height.

    Returns:
        (height, width) values, bilinear between cell centres, NaN outside the box.
    """
    left, top, right, bottom = box
    rows, columns = grid.shape
    x = (np.arange(width) + 0.5 - left) / (right - left) * columns - 0.5
    y = (np.arange(height) + 0.5 - top) / (bottom - top) * rows - 0.5
    yy, xx = np.meshgrid(y, x, indexing="ij")
    values = map_coordinates(np.asarray(grid, dtype=np.float64), [yy, xx], order=1, mode="nearest")
    outside = (yy < -0.5) | (yy > rows - 0.5) | (xx < -0.5) | (xx > columns - 0.5)
    return np.where(outside, np.nan, values)
