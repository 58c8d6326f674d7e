"""`extract --pooling gem` and `--layer a,b`: the codes they make, the inputs they refuse, and every command after.

An untrained VGG16 at 32 px (`fast_spec`, `FAST_ARGS`) taps block3_pool (4 x 4 x 256) and
block5_pool (1 x 1 x 512): the joined code is 768 long, each part a unit vector.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import cnncodes
from cnncodes.classify.calibration import class_probabilities
from cnncodes.codes.features import load_features
from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.weights import Weights
from cnncodes.runs.bundle import load_bundle
from cnncodes.runtime.runners import KerasRunner

from .helpers import FAST_ARGS, SAVED_RECORD, cli, fast_spec, in_process, make_dataset, pattern

JOINED = "block3_pool,block5_pool"


def pixels(n: int = 4, size: int = 32) -> np.ndarray:
    """`n` distinct images of the three kinds, as uint8 pixels."""
    kinds = ("stripes", "circles", "squares")
    return np.stack([pattern(kinds[seed % 3], seed, size) for seed in range(n)])


def tapped_maps(layer: str, images: np.ndarray) -> np.ndarray:
    """The oracle: the untrained VGG16 cut at `layer` by hand, on `images` preprocessed by Keras's own function."""
    import keras

    entry = get_backbone("vgg16")
    network = entry.build_network(images.shape[1], layer, Weights("none"))
    cut = keras.Model(network.inputs, network.get_layer(layer).output)
    return np.asarray(cut.predict_on_batch(entry.preprocess_input(images.astype(np.float32))), dtype=np.float64)


def test_gem_codes_are_the_generalised_mean_of_the_tapped_maps_on_keras_and_onnx():
    images = pixels()
    spec = fast_spec(layer="block3_pool", pooling="gem")
    maps = tapped_maps("block3_pool", images)
    expected = np.mean(np.maximum(maps, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    assert not np.allclose(expected, maps.mean(axis=(1, 2)), rtol=0.05)  # not the average it would equal by mistake
    for codes in (KerasRunner(spec.build(Weights("none")))(images), spec.runner(Weights("none"), "onnx")(images)):
        np.testing.assert_allclose(codes, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_several_layers_are_each_layers_code_l2_normalised_side_by_side(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=2, size=40)
    joined = cli("extract", data, "--out", tmp_path / "joined", *FAST_ARGS, "--layer", JOINED, "--runtime", "keras")
    assert joined.exit_code == 0, joined.output
    both = load_features(tmp_path / "joined")
    assert both.spec.layer == JOINED and both.X.shape == (6, 256 + 512)
    parts = []
    for layer in JOINED.split(","):
        one = cnncodes.extract(data, tmp_path / layer, fast_spec(layer=layer), runtime="keras", progress=False)
        single = load_features(one.out)
        assert single.paths == both.paths
        parts.append(single.X / np.linalg.norm(single.X, axis=1, keepdims=True))
    np.testing.assert_allclose(both.X, np.hstack(parts), rtol=1e-4, atol=1e-6)


def test_several_sizes_give_each_scale_the_joined_code():
    images = pixels(size=64)
    spec = fast_spec(layer=JOINED, pooling="gem", image_size="32,64")
    views = KerasRunner(spec.build(Weights("none")))(images).reshape(len(images), 2, 768)
    at_64 = fast_spec(layer=JOINED, pooling="gem", image_size=64)
    np.testing.assert_allclose(views[:, 1], KerasRunner(at_64.build(Weights("none")))(images), rtol=1e-4, atol=1e-6)
    for part in (views[..., :256], views[..., 256:]):
        np.testing.assert_allclose(np.linalg.norm(part, axis=2), 1, rtol=1e-5)
    assert not np.allclose(views[:, 0], views[:, 1], atol=1e-3)


def test_a_single_layer_keeps_its_key_and_its_spec():
    saved = json.loads((SAVED_RECORD.parents[1] / "features" / "meta.json").read_text())["extractor"]
    spec = fast_spec()
    assert {**spec.to_dict(), "probe": saved["probe"]} == saved  # what an earlier release recorded
    assert spec.key == cnncodes.ExtractorSpec.from_dict(saved).key == fast_spec(layer="block5_pool").key
    assert fast_spec(layer=" block3_pool , block5_pool ").layer == JOINED
    assert len({spec.key, fast_spec(layer=JOINED).key, fast_spec(pooling="gem").key}) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "block3_pool,nope"], "has no layer 'nope': try one of block3_pool, block4_pool, block5_pool"),
        (["--layer", "block3_pool,block5_pool,block3_pool"], "names block3_pool more than once"),
        (["--layer", JOINED, "--pooling", "flatten"], "use --pooling avg, max or gem, not flatten"),
        (["--layer", "block5_pool,fc1"], "vgg16's fc1 is a layer of the classifier top"),
        (["--layer", "block5_pool,"], "--layer takes names joined by commas"),
    ],
)
def test_bad_layers_are_one_line_and_exit_2(tmp_path, args, message):
    data = make_dataset(tmp_path / "data", per_class=1, size=32)
    result = cli("extract", data, "--out", tmp_path / "f", *FAST_ARGS, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "f" / "features.npy").exists()


@pytest.fixture(scope="module")
def joined_gem(tmp_path_factory) -> dict[str, Path]:
    """Codes of two layers, gem-pooled, and a logistic regression fitted on them."""
    root = tmp_path_factory.mktemp("layers")
    data = make_dataset(root / "data", per_class=6, size=40)
    made = cli("extract", data, "--out", root / "features", *FAST_ARGS, "--layer", JOINED, "--pooling", "gem")
    assert made.exit_code == 0, made.output
    fitted = cli("fit-svm", root / "features", "--out", root / "models", "--classifier", "logreg", "--cv", 2, "-q")
    assert fitted.exit_code == 0, fitted.output
    return {"data": data, "features": root / "features", "model": root / "models" / f"vgg16-{JOINED}-logreg.joblib"}


def test_predict_serve_and_prepare_rebuild_the_joined_gem_extractor(joined_gem):
    from cnncodes.serving.app import create_app
    from cnncodes.serving.predict import load_predictor
    from cnncodes.serving.settings import ServeSettings

    model, features = joined_gem["model"], load_features(joined_gem["features"])
    bundle = load_bundle(model)[1]
    assert bundle["extractor"]["layer"] == JOINED and bundle["extractor"]["pooling"] == "gem"
    stored = class_probabilities(bundle["model"], np.asarray(features.X), len(features.classes))
    images = [joined_gem["data"] / path for path in features.paths]
    predicted = cli("predict", model, *images, "--format", "json", "--top-k", 3, "--quiet")
    assert predicted.exit_code == 0, predicted.output
    answers = json.loads(predicted.stdout)
    again = [[{t["label"]: t["probability"] for t in a["top_k"]}[c] for c in features.classes] for a in answers]
    np.testing.assert_allclose(again, stored, atol=1e-4)

    async def infer(client):
        return await client.post(
            f"/v2/models/vgg16-{JOINED}-logreg/infer",
            content=images[0].read_bytes(),
            headers={"Inference-Header-Content-Length": "0"},
        )

    served = in_process(create_app(load_predictor(model), ServeSettings(model=str(model))), infer)
    assert served.status_code == 200, served.text
    np.testing.assert_allclose(served.json()["outputs"][0]["data"], stored[0], atol=1e-4)
    prepared = cli("prepare", model)
    assert prepared.exit_code == 0, prepared.output


def test_explain_refuses_joined_or_gem_codes_in_one_line(joined_gem, tmp_path):
    explained = cli("explain", joined_gem["model"], joined_gem["data"] / "circles", "--out", tmp_path / "x", "-q")
    assert explained.exit_code == 2, explained.output
    line = explained.stderr.strip()
    assert f"several layers' codes joined ({JOINED})" in line and "no heat map" in line and "\n" not in line
    from cnncodes.explain.maps import FeatureMaps

    with pytest.raises(cnncodes.CnnCodesError, match=r"means \(pooling gem\).*no heat map"):
        FeatureMaps(fast_spec(layer="block3_pool", pooling="gem"), Weights("none"))
