"""The maths of `explain`'s maps, on codes the tests make: CAM's defining identity, occlusion, placement."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cnncodes import CodesClassifier
from cnncodes.classify.calibration import class_probabilities
from cnncodes.data.decode import square_box, to_square
from cnncodes.explain.place import area_matrix, combined, on_grid, upsampled
from cnncodes.explain.readout import class_scores, evidence, pooled

GRIDS = [(3, 3), (5, 5), (4, 4)]  # views at several scales, as MobileNetV2's three sizes give


def _views(n: int, classes: int, grids, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Post-ReLU-like feature maps per view whose pooled codes tell `classes` classes apart, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(size=(classes, 12)) * 2
    views = []
    for h, w in grids:
        maps = rng.gamma(1.0, 1.0, size=(n, h, w, 12)) + np.maximum(centres[labels], 0)[:, None, None] * 0.5
        views.append(maps.astype(np.float32))
    return views, labels


@pytest.mark.parametrize("kind", ["logreg", "linear-svm", "sgd"])
@pytest.mark.parametrize("normalize", ["standard", "l2", "none"])
@pytest.mark.parametrize("classes", [2, 4])
def test_cam_mean_plus_intercept_is_the_decision_score(kind, normalize, classes):
    views, labels = _views(48, classes, GRIDS[:1])
    codes = pooled(views, "avg")
    model = CodesClassifier(kind=kind, normalize=normalize, cv=3, n_jobs=1).fit(codes, labels)
    explained = np.tile(np.arange(classes), (len(codes), 1))
    found = evidence(model, views, "avg", kind, explained, classes)
    assert found.method == "cam"
    maps = combined(found.views, [False])
    scores = class_scores(model.model_, codes, classes)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + found.intercepts, scores, rtol=1e-9, atol=1e-9)
    assert (maps.std(axis=(1, 2)) > 1e-4).all()  # every map varies over its cells: not a constant


def test_cam_identity_holds_with_pca_several_sizes_and_the_mirror_image():
    views, labels = _views(60, 3, GRIDS + GRIDS)  # three sizes, each also seen mirrored
    mirrored = [False] * 3 + [True] * 3
    codes = pooled(views, "avg")
    model = CodesClassifier(kind="logreg", normalize="standard", pca=5, cv=3, n_jobs=1).fit(codes, labels)
    explained = model.predict_proba(codes).argmax(axis=1)[:, None]
    found = evidence(model, views, "avg", "logreg", explained, 3)
    maps = combined(found.views, mirrored)
    assert maps.shape[1:3] == (5, 5)  # the finest grid
    scores = np.take_along_axis(class_scores(model.model_, codes, 3), explained, axis=1)
    np.testing.assert_allclose(maps.mean(axis=(1, 2)) + found.intercepts, scores, rtol=1e-9, atol=1e-9)


def test_logistic_class_scores_are_its_logits():
    views, labels = _views(40, 3, GRIDS[:1])
    codes = pooled(views, "avg")
    model = CodesClassifier(kind="logreg", normalize="l2", cv=3, n_jobs=1).fit(codes, labels)
    scores = class_scores(model.model_, codes, 3)
    softmax = np.exp(scores - scores.max(axis=1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(axis=1, keepdims=True), model.model_.predict_proba(codes))


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_occlusion_is_the_probability_drop_without_each_cell(pooling):
    views, labels = _views(30, 3, [(3, 3), (2, 2)])
    codes = pooled(views, pooling)
    model = CodesClassifier(kind="knn", normalize="standard", cv=3, n_jobs=1).fit(codes, labels)
    explained = np.zeros((len(codes), 1), dtype=int)
    found = evidence(model, views, pooling, "knn", explained, 3)
    assert found.method == "occlusion"
    image, view, (r, c) = 4, 1, (1, 0)  # brute force: leave the cell out and pool again
    cells = np.delete(views[view][image].reshape(-1, 12), r * 2 + c, axis=0)
    left = cells.max(axis=0) if pooling == "max" else cells.mean(axis=0)
    others = pooled([views[0][image : image + 1]], pooling)[0]
    code = (others + left) / 2
    before = class_probabilities(model, codes[image : image + 1], 3)[0, 0]
    after = class_probabilities(model, code[None], 3)[0, 0]
    assert found.views[view][image, r, c, 0] == pytest.approx(before - after, abs=1e-9)


def test_resampling_keeps_a_maps_mean_and_combining_turns_mirror_views_back():
    rng = np.random.default_rng(1)
    maps = rng.normal(size=(2, 7, 7, 1))
    for rows, cols in [(12, 12), (5, 9), (7, 7)]:
        np.testing.assert_allclose(on_grid(maps, rows, cols).mean(axis=(1, 2)), maps.mean(axis=(1, 2)))
    np.testing.assert_allclose(area_matrix(3, 6).sum(axis=1), 1)
    flipped = maps[:, :, ::-1]
    np.testing.assert_allclose(combined([maps, flipped], [False, True]), maps)


def test_a_map_lies_on_the_image_with_half_pixel_centres():
    grid = np.zeros((7, 7))
    grid[3, 3] = 1
    values = upsampled(grid, (0, 0, 224, 224), 224, 224)
    np.testing.assert_allclose(values, values[::-1, ::-1])  # a corner-aligned zoom would shift it by half a cell
    assert np.unravel_index(np.nanargmax(values), values.shape) in {(111, 111), (111, 112), (112, 111), (112, 112)}
    cropped = upsampled(grid, square_box(300, 200, 224, "crop"), 300, 200)
    assert np.isnan(cropped[:, :50]).all() and np.isnan(cropped[:, -50:]).all()
    assert not np.isnan(cropped[:, 50:250]).any()


@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_the_box_is_the_one_the_decoder_cuts(resize):
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (61, 97, 3), dtype=np.uint8))
    box = square_box(image.width, image.height, 32, resize)
    again = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR, box=box))
    np.testing.assert_array_equal(to_square(image, 32, resize), again)


def test_the_padded_box_reaches_past_the_image_where_the_padding_is():
    image = Image.new("RGB", (80, 40), (0, 0, 0))
    left, top, right, bottom = square_box(80, 40, 32, "pad")
    assert (left, right) == (0, 80) and top < 0 < 40 < bottom and bottom - top == pytest.approx(80)
    padded = to_square(image, 32, "pad")
    assert (padded[:8] == 255).all() and (padded[8:24] == 0).all() and (padded[24:] == 255).all()


def test_a_linear_model_on_max_pooled_codes_is_explained_by_occlusion():
    views, labels = _views(30, 2, [(3, 3)])
    codes = pooled(views, "max")
    model = CodesClassifier(kind="logreg", normalize="standard", cv=3, n_jobs=1).fit(codes, labels)
    found = evidence(model, views, "max", "logreg", np.zeros((30, 1), dtype=int), 2)
    assert found.method == "occlusion" and not found.intercepts.any()
