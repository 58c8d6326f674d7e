"""ImageNet weights found again for a fitted model, or not needed at all once it is prepared; `backbones` says where."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import MOBILENET_WEIGHTS, cli, make_dataset, write_image

MOBILENET_32 = ["--backbone", "mobilenetv2", "--image-size", "32", "--quiet"]


@pytest.fixture
def weights_dir(tmp_path: Path) -> Path:
    """A folder of its own holding a copy of the real MobileNetV2 weights under Keras's canonical name."""
    if not MOBILENET_WEIGHTS.is_file():
        pytest.fail(f"missing {MOBILENET_WEIGHTS}: run the tests from a checkout with ../shared beside it")
    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(MOBILENET_WEIGHTS, folder / MOBILENET_WEIGHTS.name)
    return folder


@pytest.fixture
def offline(monkeypatch) -> None:
    """Keras cannot download anything, as on a machine without network."""
    import keras

    def no_network(*_a, **_k):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", no_network)


@pytest.mark.slow
@pytest.mark.usefixtures("offline")
def test_a_fitted_model_finds_its_weights_where_extract_did_and_a_prepared_one_needs_none(
    tmp_path, weights_dir, monkeypatch
):
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "cache"))  # no model of another test is cached
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(weights_dir))
    data = make_dataset(tmp_path / "data", per_class=6)
    extract = cli("extract", data, "--out", tmp_path / "f", *MOBILENET_32, "--runtime", "keras")
    assert extract.exit_code == 0, extract.output
    fit = cli("fit-svm", tmp_path / "f", "--out", tmp_path / "m", "--classifier", "logreg", "--quiet")
    assert fit.exit_code == 0, fit.output
    model, image = tmp_path / "m" / "mobilenetv2-out_relu-logreg.joblib", write_image(tmp_path / "x.png")

    # a new shell: the weights folder not set, Keras's cache empty, no network; only the recorded file is left
    monkeypatch.delenv("CNNCODES_WEIGHTS_DIR")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
    first = cli("predict", model, image, "--format", "json", "--quiet")  # converts the network, from that file
    assert first.exit_code == 0, first.output
    assert cli("prepare", model).exit_code == 0

    moved = (weights_dir / MOBILENET_WEIGHTS.name).rename(tmp_path / "moved.h5")
    assert cli("prepare", model).exit_code == 0  # a prepared model is its cached ONNX model: no weights needed
    again = cli("predict", model, image, "--format", "json", "--quiet")
    assert again.exit_code == 0 and again.stdout == first.stdout, again.output

    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "another_cache"))  # not prepared on this machine
    lost = cli("predict", model, image, "--quiet")
    assert lost.exit_code == 2 and "Traceback" not in lost.output
    message = " ".join(lost.stderr.split())
    assert len(lost.stderr.strip().splitlines()) == 1, lost.stderr
    recorded = str(weights_dir / MOBILENET_WEIGHTS.name)
    for needed in (f"{recorded}, where extract found them, is gone", "--weights PATH", "CNNCODES_WEIGHTS_DIR"):
        assert needed in message, needed
    assert "--weights none" not in message
    assert cli("predict", model, image, "--runtime", "keras", "--weights", moved, "--quiet").exit_code == 0


@pytest.mark.usefixtures("offline")
def test_a_changed_weights_file_at_the_recorded_place_is_passed_over_and_named(tmp_path, weights_dir, monkeypatch):
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(weights_dir))
    data = make_dataset(tmp_path / "data", per_class=6)
    assert cli("extract", data, "--out", tmp_path / "f", *MOBILENET_32, "--runtime", "keras").exit_code == 0
    assert cli("fit-svm", tmp_path / "f", "--out", tmp_path / "m", "--classifier", "knn", "--quiet").exit_code == 0
    recorded = weights_dir / MOBILENET_WEIGHTS.name
    recorded.write_bytes(b"other weights")
    monkeypatch.delenv("CNNCODES_WEIGHTS_DIR")
    model = tmp_path / "m" / "mobilenetv2-out_relu-knn.joblib"
    changed = cli("predict", model, write_image(tmp_path / "x.png"), "--runtime", "keras", "--quiet")
    assert changed.exit_code == 2
    message = " ".join(changed.stderr.split())
    assert f"{recorded}, where extract found them, has changed since" in message
    assert "--weights PATH" in message and "--weights none" not in message


def test_backbones_says_where_each_weights_file_is_found_without_loading_tensorflow(tmp_path, weights_dir):
    keras_home = tmp_path / "keras_home"
    (keras_home / "models").mkdir(parents=True)
    (keras_home / "models" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"")  # only looked at
    code = (
        "import sys; from cnncodes.cli.main import app; app(['backbones'], standalone_mode=False); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    env = {"CNNCODES_WEIGHTS_DIR": str(weights_dir), "KERAS_HOME": str(keras_home), "COLUMNS": "300"}
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[-1] == "False False"
    sections: dict[str, list[str]] = {}
    for line in lines[next(i for i, x in enumerate(lines) if x.startswith("ImageNet weights")) : -1]:
        if line.startswith("ImageNet weights files"):
            sections[line] = []
        else:
            sections[list(sections)[-1]].append(line.split(":")[0])
    assert sections == {
        f"ImageNet weights files in $CNNCODES_WEIGHTS_DIR ({weights_dir}):": ["mobilenetv2"],
        f"ImageNet weights files in the Keras cache ({keras_home / 'models'}):": ["vgg16"],
        "ImageNet weights files to download (offline: not available):": [
            "vgg16 fc1,fc2",
            "vgg19",
            "vgg19 fc1,fc2",
            "resnet50",
            "efficientnetb0",
            "inceptionv3",
            "xception",
        ],
    }
