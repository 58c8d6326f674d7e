"""`cnncodes imagenet`: the whole network's own ImageNet top-5, run through ONNX Runtime, found offline or named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cnncodes.data.decode import load_square

from .helpers import cli, save_legacy_h5_weights, write_image

MOBILENET_TOP = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"


def write_class_index(path: Path, n: int = 1000) -> Path:
    """A made-up class index in Keras's layout: WordNet-like ids and names by output index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({str(i): [f"n{i:08d}", f"class {i}"] for i in range(n)}))
    return path


@pytest.fixture(scope="module")
def top_network(tmp_path_factory):
    """MobileNetV2 with its classifier top and seeded random weights, saved under Keras's name with a class index.

    Untrained, its activations vanish layer by layer until every class is equally probable: its batch
    normalisations take the statistics of one batch of noise instead, so each image ranks the classes its own way.
    """
    import keras

    keras.utils.set_random_seed(7)
    model = keras.applications.MobileNetV2(include_top=True, weights=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # one training-mode call sets the moving statistics to the batch's
    model(np.random.default_rng(0).uniform(-1, 1, (4, 224, 224, 3)).astype("float32"), training=True)
    folder = tmp_path_factory.mktemp("weights")
    save_legacy_h5_weights(model, folder / MOBILENET_TOP)
    write_class_index(folder / "imagenet_class_index.json")
    return model, folder


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A folder of two readable images and one that is not an image."""
    folder = tmp_path / "images"
    write_image(folder / "a.png", "stripes", seed=1, size=64)
    write_image(folder / "b.jpg", "circles", seed=2, size=96)
    (folder / "c.png").write_bytes(b"not an image")
    return folder


def keras_top5(model, path: Path) -> tuple[list[tuple[str, str]], np.ndarray]:
    """Keras's own prediction for one image, ranked as `decode_predictions` ranks it."""
    import keras

    pixels = load_square(path, 224, "crop").astype("float32")[None]
    proba = model.predict(keras.applications.mobilenet_v2.preprocess_input(pixels), verbose=0)[0]
    return [(f"n{i:08d}", f"class {i}") for i in proba.argsort()[-5:][::-1]], proba


@pytest.mark.slow
def test_the_network_s_own_top5_equals_keras_s_through_onnx(top_network, images, monkeypatch):
    model, folder = top_network
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(folder))
    done = cli("imagenet", images, "--backbone", "mobilenetv2", "--json", "--quiet")
    assert done.exit_code == 0, done.output
    assert "Converting mobilenetv2 with its ImageNet top for ONNX Runtime" in done.stderr
    assert "running on Keras instead" not in done.stderr
    answers = {Path(a["filename"]).name: a for a in json.loads(done.stdout)}
    assert answers["c.png"]["top_k"] == [] and "not an image" in answers["c.png"]["error"]
    assert any(line.endswith("c.png: not an image (unrecognised format)") for line in done.stderr.splitlines())
    for name in ("a.png", "b.jpg"):
        expected, proba = keras_top5(model, images / name)
        got = answers[name]["top_k"]
        assert [(g["wnid"], g["name"]) for g in got] == expected
        np.testing.assert_allclose([g["probability"] for g in got], np.sort(proba)[::-1][:5], rtol=1e-4)

    # a new process, as a table: the cached ONNX model runs, without TensorFlow or Keras
    code = (
        "import sys; from cnncodes.cli.main import app; app(['imagenet', sys.argv[1], '--backbone', 'mobilenetv2', "
        "'--top-k', '2', '-q'], standalone_mode=False); print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    table = subprocess.run([sys.executable, "-c", code, images / "a.png"], capture_output=True, text=True)
    assert table.returncode == 0 and table.stdout.splitlines()[-1] == "False False", table.stderr
    assert "Converting" not in table.stderr
    (first, _), (second, _), (third, _) = keras_top5(model, images / "a.png")[0][:3]
    assert first in table.stdout and second in table.stdout and third not in table.stdout

    short = write_class_index(folder / "ten.json", n=10)
    wrong = cli("imagenet", images / "a.png", "--backbone", "mobilenetv2", "--class-index", short)
    assert wrong.exit_code == 2 and len(wrong.stderr.strip().splitlines()) == 1, wrong.output
    assert "names 10 classes" in wrong.stderr and "gives 1000" in wrong.stderr


def test_without_the_files_offline_one_line_names_each_and_where_to_put_it(tmp_path, monkeypatch):
    import keras

    def no_network(*_a, **_k):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", no_network)
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(tmp_path / "weights"))
    image = write_image(tmp_path / "a.png")
    missing = cli("imagenet", image, "--backbone", "vgg16")
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    message = " ".join(missing.stderr.split())
    for named in (
        "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
        "imagenet_class_index.json",
        str(tmp_path / "weights"),
    ):
        assert named in message, named
    assert "Name or service not known" in message

    write_class_index(tmp_path / "weights" / "imagenet_class_index.json")
    weights_only = " ".join(cli("imagenet", image, "--backbone", "resnet50").stderr.split())
    assert "resnet50_weights_tf_dim_ordering_tf_kernels.h5" in weights_only
    assert "imagenet_class_index.json" not in weights_only

    untrained = cli("imagenet", image, "--weights", "none")
    assert untrained.exit_code == 2 and "untrained" in untrained.stderr
