"""`cnncodes filters` (activation maximisation) and the feature-map grids of `explain --feature-maps`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cnncodes.core.errors import CnnCodesError
from cnncodes.explain.featuremaps import feature_map_grid
from cnncodes.explain.filters import InputSpace, draw_filters, filter_pictures, maximised
from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.models import build_extractor
from cnncodes.nets.weights import Weights

from .helpers import MOBILENET_WEIGHTS, cli, fast_spec, needs_real_weights, pattern

RGB = {"red": 0, "green": 1, "blue": 2}


def colour_model(backbone: str, relu: str):
    """One 3 x 3 convolution on `backbone`'s input whose filter 0 detects red and filter 1 blue (minus the others).

    Its input channels are the network's: BGR for VGG, RGB for MobileNetV2, written out here
    rather than read from the code under test.
    """
    import keras

    order = {"vgg16": ("blue", "green", "red"), "mobilenetv2": ("red", "green", "blue")}[backbone]
    kernel = np.zeros((3, 3, 3, 2), np.float32)
    for f, colour in enumerate(("red", "blue")):
        kernel[:, :, :, f] = [2.0 if name == colour else -1.0 for name in order]
    x = keras.Input((None, None, 3))
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu" if relu == "conv" else None, name="colour")
    y = conv(x)
    if relu == "relu6 layer":
        y = keras.layers.ReLU(6.0, name="colour_relu")(y)
    conv.set_weights([kernel, np.zeros(2, np.float32)])
    return keras.Model(x, y), "colour" if relu == "conv" else "colour_relu"


@pytest.mark.parametrize("relu", ["conv", "relu6 layer"])
@pytest.mark.parametrize("backbone", ["vgg16", "mobilenetv2"])
def test_the_picture_of_a_colour_filter_is_that_colour(backbone, relu):
    # VGG's grey start is below zero for "red minus the others" (caffe subtracts a larger mean from blue and green):
    # after the ReLU nothing would move. Only the value before the ReLU, in the BGR space mapped back, gives red.
    model, layer = colour_model(backbone, relu)
    space = InputSpace.of(get_backbone(backbone).preprocess_input)
    red, blue = filter_pictures(model, layer=layer, space=space, filters=[0, 1], size=32, steps=5)
    assert "before its ReLU" in maximised(model, layer) or "a ReLU" in maximised(model, layer)
    for picture, colour in ((red, "red"), (blue, "blue")):
        means = picture.pixels.reshape(-1, 3).mean(axis=0)
        others = [means[c] for name, c in RGB.items() if name != colour]
        assert means[RGB[colour]] > max(others) + 50, (colour, means)
        assert picture.pixels.dtype == np.uint8 and picture.pixels.shape == (
            24,
            24,
            3,
        )  # the example's 25 of 180 px cropped per side
    assert red.filter == 0 and blue.filter == 1 and red.loss > 0 and blue.loss > 0


def test_input_space_maps_pixels_to_the_network_and_back():
    pixels = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3))
    for name in ("vgg16", "mobilenetv2", "efficientnetb0"):
        entry = get_backbone(name)
        space = InputSpace.of(entry.preprocess_input)
        assert np.allclose(space.to_input(pixels), entry.preprocess_input(pixels.astype(np.float32).copy()), atol=1e-3)
        assert np.allclose(space.to_pixels(space.to_input(pixels)), pixels, atol=1e-3)
    assert InputSpace.of(get_backbone("mobilenetv2").preprocess_input).level == pytest.approx(1 / 127.5)


def test_a_model_without_the_layer_is_one_line_naming_its_layers():
    model, _ = colour_model("vgg16", "conv")
    space = InputSpace.of(get_backbone("vgg16").preprocess_input)
    with pytest.raises(CnnCodesError, match=r"has no layer 'nope': use one of colour$"):
        filter_pictures(model, layer="nope", space=space, filters=[0], size=32, steps=1)
    with pytest.raises(CnnCodesError, match="channels 0 to 1, not 2"):
        filter_pictures(model, layer="colour", space=space, filters=[2], size=32, steps=1)


def test_cli_writes_the_grid_and_its_json(tmp_path):
    out = tmp_path / "filters"
    result = cli(
        "filters", "vgg16", "--weights", "none", "--layer", "block1_conv2", "--size", 32, "--filters", 4,
        "--steps", 5, "--noise-seed", 3, "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["filters.json", "filters.png"]
    made = json.loads((out / "filters.json").read_text())
    assert made["seed"] == 3  # --noise-seed: the channels and the starting noise
    assert made["maximised"] == "block1_conv2 before its ReLU" and made["drawn"] == 4 and made["channels"] == 64
    tiles = made["tiles"]
    losses = [t["loss"] for t in tiles]
    assert len(tiles) == 4 and losses == sorted(losses, reverse=True)
    assert len({t["filter"] for t in tiles}) == 4 and all(0 <= t["filter"] < 64 for t in tiles)
    assert [(t["row"], t["column"]) for t in tiles] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with Image.open(out / "filters.png") as png:
        png.verify()
        assert png.format == "PNG" and png.size == (2 * 66 + 2, 2 * 80 + 2)  # 2 x 2 cells of 64 px, captions
    assert "4 filters of block1_conv2 before its ReLU" in " ".join(result.stdout.split())


def test_cli_unknown_layer_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "filters"
    result = cli("filters", "vgg16", "--weights", "none", "--layer", "block9_conv", "--size", 32, "--out", out)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "block9_conv" in lines[0] and "block5_pool" in lines[0], result.stderr
    assert not out.exists()


def test_more_filters_than_the_grid_keeps_the_best_64(tmp_path):
    result = draw_filters(
        backbone="vgg16",
        layer="block2_conv1",
        out=tmp_path,
        filters=70,
        size=32,
        steps=1,
        weights="none",
        progress=False,
    )
    made = json.loads(result.json.read_text())
    assert made["drawn"] == 70 and made["channels"] == 128 and len(made["tiles"]) == 64
    assert made["tiles"][-1]["row"] == 7 and made["tiles"][-1]["column"] == 7
    assert result.tiles[-1].loss == min(t["loss"] for t in made["tiles"])
    with pytest.raises(CnnCodesError, match="at least 1"):
        draw_filters(backbone="vgg16", layer="block2_conv1", out=tmp_path / "none", filters=0, weights="none")


@needs_real_weights
def test_imagenet_mobilenet_climbs_before_the_relu6():
    entry = get_backbone("mobilenetv2")
    network = entry.build_network(64, "block_13_expand_relu", Weights("imagenet", MOBILENET_WEIGHTS))
    space = InputSpace.of(entry.preprocess_input)
    assert maximised(network, "block_13_expand_relu") == "the input of block_13_expand_relu, a ReLU"

    def climbed(steps: int) -> list[float]:
        found = filter_pictures(
            network, layer="block_13_expand_relu", space=space, filters=[3, 7], size=64, steps=steps
        )
        return [p.loss for p in found]

    assert all(after > before + 0.5 for before, after in zip(climbed(1), climbed(8)))


def test_feature_map_grids_show_the_most_active_channels(tmp_path):
    pixels = np.stack([pattern("stripes", 1, 32), pattern("circles", 2, 32)])
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    shown = feature_map_grid(pixels, layer="block1_conv2", paths=paths, extractor="vgg16", weights=Weights("none"))
    # The pooled code of the production extractor is each channel's mean over the map: its 16 largest, in order.
    codes = build_extractor(get_backbone("vgg16"), 32, "block1_conv2", "avg", Weights("none")).predict(pixels)
    assert shown == [list(np.argsort(-code, kind="stable")[:16]) for code in codes]
    assert shown == feature_map_grid(pixels, layer="block1_conv2", paths=paths, extractor=fast_spec())
    with Image.open(paths[0]) as png:
        grid = np.asarray(png.convert("RGB"))
    assert grid.shape == (4 * 112 + 2, 4 * 98 + 2, 3)  # 4 x 4 cells of 96 px with captions
    first = grid[2:98, 2:98].reshape(-1, 3).astype(int)
    # Each tile is normalised alone: viridis's darkest and brightest colours are both in it.
    assert np.abs(first - [68, 1, 84]).sum(axis=1).min() < 10 and np.abs(first - [253, 231, 36]).sum(axis=1).min() < 10


def test_feature_map_grid_refuses_a_vector_layer_and_a_name_without_weights(tmp_path):
    pixels = np.zeros((1, 224, 224, 3), np.uint8)
    with pytest.raises(CnnCodesError, match="fc1 gives a vector"):
        feature_map_grid(pixels, layer="fc1", paths=[tmp_path / "a.png"], extractor="vgg16", weights=Weights("none"))
    with pytest.raises(CnnCodesError, match="need its weights"):
        feature_map_grid(pixels, layer="block1_conv1", paths=[tmp_path / "a.png"], extractor="vgg16")
    assert not list(tmp_path.iterdir())
