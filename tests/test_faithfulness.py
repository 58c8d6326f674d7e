"""Deletion and insertion AUC: a map on what decides beats random and inverted maps; batching changes nothing."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cnncodes.core.errors import CnnCodesError
from cnncodes.explain.faithfulness import faithfulness, random_baseline, random_maps
from cnncodes.nets.backbones import REGISTRY
from cnncodes.nets.preprocessing import Preprocess

SIZE = 32
GREY = (128, 128, 128)
# The one patch each class's probability depends on: (rows, columns).
PATCHES = ((slice(4, 12), slice(4, 12)), (slice(20, 28), slice(16, 24)))


def score(images: np.ndarray) -> np.ndarray:
    """Class c's probability: how far its patch is from grey, 0 when flat or blurred, ~1 for a fine checkerboard."""
    return np.stack(
        [np.abs(images[:, rows, cols].astype(float) - 128).mean(axis=(1, 2, 3)) / 128 for rows, cols in PATCHES],
        axis=1,
    )


def images(n: int) -> np.ndarray:
    """Grey noise, with a 1-px black and white checkerboard in each patch: what the score sees."""
    rng = np.random.default_rng(7)
    out = rng.integers(118, 139, (n, SIZE, SIZE, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    checkerboard = np.where((yy + xx) % 2 == 0, 0, 255).astype(np.uint8)
    for rows, cols in PATCHES:
        out[:, rows, cols] = checkerboard[rows, cols, None]
    return out


def highlighting(classes: np.ndarray) -> np.ndarray:
    """Maps that are high on each image's class's patch, smoothly lower around it."""
    maps = np.zeros((len(classes), SIZE, SIZE), np.float32)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for i, c in enumerate(classes):
        rows, cols = PATCHES[c]
        centre = ((rows.start + rows.stop) / 2, (cols.start + cols.stop) / 2)
        maps[i] = -np.hypot(yy - centre[0], xx - centre[1])
        maps[i][rows, cols] = 1.0
    return maps


CLASSES = np.array([0, 1, 1, 0])


def measure(maps: np.ndarray, **kwargs):
    return faithfulness(score, pixels=images(len(CLASSES)), maps=maps, classes=CLASSES, zero_pixel=GREY, **kwargs)


def test_a_map_on_the_deciding_patch_beats_random_and_inverted_maps():
    good = measure(highlighting(CLASSES))
    inverted = measure(-highlighting(CLASSES))
    rand = random_baseline(score, pixels=images(4), classes=CLASSES, zero_pixel=GREY, grid=(8, 8), seed=3)

    for result in (good, inverted, rand):
        for auc in (result.deletion, result.insertion):
            assert auc.shape == (4,)
            assert ((auc >= 0) & (auc <= 1)).all()
    # the patch is 6 % of the pixels: gone after the first two steps of 5 %, back after two when inserted
    assert (good.deletion < 0.1).all() and (good.insertion > 0.85).all()
    assert (good.deletion < rand.deletion).all() and (good.insertion > rand.insertion).all()
    assert good.deletion.mean() < rand.deletion.mean() - 0.3 and good.insertion.mean() > rand.insertion.mean() + 0.3
    assert (inverted.deletion > 0.85).all() and (inverted.insertion < 0.15).all()
    assert (rand.deletion < inverted.deletion).all() and (rand.insertion > inverted.insertion).all()


def test_the_curves_start_and_end_where_the_protocol_says():
    result = measure(highlighting(CLASSES))
    original = score(images(4))[np.arange(4), CLASSES]

    assert result.deletion_curve.shape == result.insertion_curve.shape == (4, 21)
    np.testing.assert_allclose(result.deletion_curve[:, 0], original)
    np.testing.assert_allclose(result.insertion_curve[:, -1], original)
    # all deleted: the patch is grey; none inserted: the checkerboard is blurred to near grey
    np.testing.assert_allclose(result.deletion_curve[:, -1], 0)
    assert (result.insertion_curve[:, 0] < 0.15).all()
    np.testing.assert_allclose(result.deletion, np.trapezoid(result.deletion_curve, dx=0.05, axis=1))


def test_batching_across_images_gives_the_numbers_of_one_image_at_a_time():
    maps = highlighting(CLASSES) + np.random.default_rng(0).normal(0, 0.5, (4, SIZE, SIZE)).astype(np.float32)
    calls: list[int] = []

    def counted(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return score(batch)

    together = faithfulness(counted, pixels=images(4), maps=maps, classes=CLASSES, zero_pixel=GREY, batch_size=50)
    one_by_one = [
        faithfulness(
            score, pixels=images(4)[i : i + 1], maps=maps[i : i + 1], classes=CLASSES[i : i + 1], zero_pixel=GREY
        )
        for i in range(4)
    ]

    assert calls == [50, 50, 50, 18]  # 4 images x 21 steps x 2 curves, in full batches
    for name in ("deletion", "insertion", "deletion_curve", "insertion_curve"):
        np.testing.assert_array_equal(getattr(together, name), np.concatenate([getattr(r, name) for r in one_by_one]))


def test_ties_in_a_map_go_in_raster_order():
    flat = np.zeros((4, SIZE, SIZE), np.float32)
    raster = np.broadcast_to(-np.arange(SIZE * SIZE, dtype=np.float32).reshape(SIZE, SIZE), (4, SIZE, SIZE))
    first, again, explicit = measure(flat), measure(flat), measure(raster)
    np.testing.assert_array_equal(first.deletion_curve, again.deletion_curve)
    np.testing.assert_array_equal(first.deletion_curve, explicit.deletion_curve)
    np.testing.assert_array_equal(first.insertion_curve, explicit.insertion_curve)


def test_random_maps_are_seeded_smooth_cells_at_the_image_size():
    maps = random_maps(2, grid=(3, 3), size=(SIZE, SIZE), seed=5)
    assert maps.shape == (2, SIZE, SIZE)
    np.testing.assert_array_equal(maps, random_maps(2, grid=(3, 3), size=(SIZE, SIZE), seed=5))
    assert not np.array_equal(maps, random_maps(2, grid=(3, 3), size=(SIZE, SIZE), seed=6))
    # upsampled, not per-pixel noise: neighbouring pixels differ by a fraction of a cell's range
    assert np.abs(np.diff(maps, axis=2)).max() < 0.2


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(CnnCodesError, match="upsample each map"):
        measure(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(CnnCodesError, match="NaN"):
        measure(np.full((4, SIZE, SIZE), np.nan, np.float32))
    with pytest.raises(CnnCodesError, match="one row of class probabilities per image"):
        faithfulness(
            lambda b: score(b)[:, :1], pixels=images(4), maps=highlighting(CLASSES), classes=CLASSES, zero_pixel=GREY
        )


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_zero_pixel_is_what_the_network_sees_as_zero(name):
    entry = REGISTRY[name]
    if entry.preprocessing.startswith("none"):
        # the network normalises itself as Keras's "torch" mode does: x / 255 minus the mean, over the sd
        normalise = lambda x: keras.applications.imagenet_utils.preprocess_input(x.copy(), mode="torch")  # noqa: E731
    else:
        normalise = lambda x: keras.ops.convert_to_numpy(Preprocess(name)(x))  # noqa: E731
    pixel = lambda v: np.array([[[v]]], np.float32)  # noqa: E731

    np.testing.assert_allclose(normalise(pixel(entry.zero_input)), 0, atol=1e-5)
    # the uint8 zero pixel is within half a grey level of it
    half_level = np.abs(normalise(pixel((1, 1, 1))) - normalise(pixel((0, 0, 0)))) / 2
    assert (np.abs(normalise(pixel(entry.zero_pixel))) <= half_level + 1e-6).all()
    assert all(isinstance(v, int) and 0 <= v <= 255 for v in entry.zero_pixel)
