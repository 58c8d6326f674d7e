"""The Keras models built from the registry, and models saved by earlier versions."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.models import build_classifier, build_extractor
from cnncodes.nets.weights import Weights

DATA = Path(__file__).parent / "data"


def test_a_model_saved_before_the_models_module_existed_still_loads_and_predicts_the_same():
    """tests/data/saved_before_models_module.keras: a Preprocess layer and a head, saved by cnncodes 0.1.0."""
    import cnncodes.nets.preprocessing  # noqa: F401 - registers the layer, as `predict` does

    model = keras.saving.load_model(DATA / "saved_before_models_module.keras")
    probe = np.arange(2 * 8 * 8 * 3, dtype=np.uint8).reshape(2, 8, 8, 3)
    np.testing.assert_allclose(
        model.predict(probe, verbose=0), np.load(DATA / "saved_before_models_module.npy"), rtol=1e-6
    )


def test_extractor_and_classifier_share_the_preprocessing_and_the_network():
    entry = get_backbone("mobilenetv2")
    extractor = build_extractor(entry, 32, entry.default_layer, "avg", Weights("none"))
    classifier, network = build_classifier(entry, 32, 3, Weights("none"), 0.2)
    pixels = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    pooled = keras.Model(classifier.inputs, classifier.get_layer("head_pool").output)
    np.testing.assert_allclose(
        pooled.predict(pixels, verbose=0), extractor.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6
    )  # the same untrained weights: same seed, same network
    assert network.name.startswith("mobilenetv2")
