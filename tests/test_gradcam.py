"""Grad-CAM of fine-tuned models: CAM where theory says so, the same after saving, the Keras recipe on flat nets."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from cnncodes.core.errors import CnnCodesError
from cnncodes.explain.gradcam import grad_cam
from cnncodes.finetuning.surgery import set_trainable
from cnncodes.nets.backbones import get_backbone
from cnncodes.nets.models import build_classifier, small_cnn
from cnncodes.nets.preprocessing import Preprocess
from cnncodes.nets.weights import Weights

from .helpers import pattern

SIZE = 96  # VGG16 at 96 px: a 3 x 3 feature map (an untrained MobileNetV2's last maps are ~1e-10)
CLASSES = np.array([0, 2, 1])


@pytest.fixture(scope="module")
def classifier() -> tuple[keras.Model, keras.Model]:
    model, network = build_classifier(get_backbone("vgg16"), SIZE, 3, Weights("none"), 0.5)
    set_trainable(network, None)
    return model, network


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.stack([pattern(kind, seed, SIZE) for seed, kind in enumerate(("stripes", "circles", "squares"))])


def test_grad_cam_equals_cam_for_a_frozen_backbone_and_a_pooled_dense_head(classifier, pixels):
    model, network = classifier
    features = keras.ops.convert_to_numpy(network(Preprocess("vgg16")(pixels), training=False))
    kernel, bias = model.get_layer("head").get_weights()
    cam = np.einsum("nhwk,kn->nhw", features, kernel[:, CLASSES])
    cells = features.shape[1] * features.shape[2]
    assert features.shape[1:3] == (3, 3)
    assert (cam > 0).any() and (cam < 0).any()  # the ReLU has something to cut

    explained = grad_cam(model, pixels, CLASSES)

    # α_k = W[k, c] / (h·w), so Grad-CAM = ReLU(Σ_k W[k, c] A_k) / (h·w) = ReLU(CAM) / (h·w)
    scale = np.abs(cam).max() / cells
    np.testing.assert_allclose(explained.maps, np.maximum(cam, 0) / cells, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(explained.logits, features.mean(axis=(1, 2)) @ kernel + bias, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(explained.probabilities, model.predict(pixels, verbose=0), atol=1e-5)
    np.testing.assert_allclose(explained.probability, explained.probabilities[np.arange(3), CLASSES])
    assert explained.maps.dtype == np.float32
    assert explained.layer == "vgg16/block5_pool"


def test_grad_cam_is_the_same_in_batches_and_from_a_saved_model(classifier, pixels, tmp_path):
    model, _ = classifier
    whole = grad_cam(model, pixels, CLASSES)
    path = tmp_path / "finetuned.keras"
    model.save(path)

    reloaded = grad_cam(keras.saving.load_model(path), pixels, CLASSES, batch_size=2)

    np.testing.assert_allclose(reloaded.maps, whole.maps, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(reloaded.logits, whole.logits, rtol=1e-5, atol=1e-6)
    assert reloaded.layer == whole.layer


def test_another_class_gives_another_map(classifier, pixels):
    model, _ = classifier
    first = grad_cam(model, pixels, np.zeros(3, int))
    second = grad_cam(model, pixels, np.ones(3, int))
    assert not np.allclose(first.maps, second.maps)
    np.testing.assert_allclose(first.logits, second.logits)


def test_small_cnn_follows_the_keras_example_on_its_last_conv_layer():
    keras.utils.set_random_seed(1)
    model = small_cnn(32, 4)
    images = np.stack([pattern("circles", seed, 32) for seed in range(2)])
    classes = np.array([3, 1])
    # The Keras example's own recipe, which works on a flat model: one model gives the conv maps and the head's input
    conv, head = model.get_layer("conv2"), model.get_layer("head")
    probe = keras.Model(model.inputs[0], [conv.output, head.input])
    import tensorflow as tf

    with tf.GradientTape() as tape:
        maps, pooled = probe(images)
        logits = pooled @ head.kernel + head.bias
        chosen = tf.gather(logits, classes, batch_dims=1)
    weights = tf.reduce_mean(tape.gradient(chosen, maps), axis=(1, 2))
    expected = tf.nn.relu(tf.einsum("nhwk,nk->nhw", maps, weights)).numpy()

    explained = grad_cam(model, images, classes)

    assert explained.layer == "conv2"
    assert explained.maps.shape == (2, 28, 28)
    assert explained.maps.max() > 0
    np.testing.assert_allclose(explained.maps, expected, rtol=1e-4, atol=1e-6 * expected.max())


def test_bad_models_and_inputs_are_one_line_errors(classifier, pixels):
    model, _ = classifier
    with pytest.raises(CnnCodesError, match=r"class index 3 out of range: .* classes 0–2"):
        grad_cam(model, pixels, np.array([0, 3, 1]))
    with pytest.raises(CnnCodesError, match="one class per image"):
        grad_cam(model, pixels, np.array([0, 1]))
    with pytest.raises(CnnCodesError, match="takes uint8 images of shape"):
        grad_cam(model, pixels.astype(np.float32), CLASSES)
    flat = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")]
    )
    with pytest.raises(CnnCodesError, match="no convolutional layer or nested backbone"):
        grad_cam(flat, np.zeros((1, 8, 8, 3), np.uint8), np.array([0]))
    logits_only = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3), keras.layers.Dense(2)])
    with pytest.raises(CnnCodesError, match="does not end in a softmax Dense layer"):
        grad_cam(logits_only, np.zeros((1, 8, 8, 3), np.uint8), np.array([0]))
