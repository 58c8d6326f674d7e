"""The ONNX Runtime forward pass: equal to Keras, cached, robust, and free of TensorFlow when warm."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from functools import partial

import numpy as np
import pytest

import cnncodes
from cnncodes.cli.main import app
from cnncodes.data.decode import load_square
from cnncodes.runtime.runners import KerasRunner, OnnxRunner, cached_runner, make_runner, onnx_cache_path

from .helpers import FLOWERS, fast_spec, make_dataset, needs_real_weights, pattern, runner


def assert_same_codes(spec, weights, pixels):
    keras_codes = KerasRunner(spec.build(weights))(pixels)
    onnx = spec.runner(weights, "onnx")
    assert isinstance(onnx, OnnxRunner)
    onnx_codes = onnx(pixels)
    assert onnx_codes.shape == keras_codes.shape
    assert np.abs(onnx_codes - keras_codes).max() <= 1e-4 * np.abs(keras_codes).max()


@pytest.mark.parametrize(  # VGG16 at the other tests' size, whose conversion they share; ResNet50 with a 2x2 map
    ("backbone", "layer", "size"),
    [("vgg16", None, 32), ("vgg16", "block3_pool", 32), ("resnet50", None, 48)],
)
@pytest.mark.slow
def test_onnx_codes_equal_keras_codes_untrained(tmp_path, backbone, layer, size):
    data = make_dataset(tmp_path / "d", per_class=2)
    pixels = np.stack([load_square(p, size) for p in sorted(data.rglob("*.*"))])
    spec = cnncodes.ExtractorSpec.create(backbone=backbone, layer=layer, image_size=size, weights="none")
    assert_same_codes(spec, spec.recorded_weights, pixels)


@needs_real_weights
@pytest.mark.parametrize("layer", [None, "block_13_expand_relu"])
@pytest.mark.slow
def test_onnx_codes_equal_keras_codes_with_real_mobilenet(monkeypatch, layer):
    files = [sorted((FLOWERS / c).glob("*.jpg"))[0] for c in ("Daisy", "Iris", "Tulip", "Pansy")]
    pixels = np.stack([load_square(f, 96) for f in files])
    spec = cnncodes.ExtractorSpec.create(backbone="mobilenetv2", layer=layer, image_size=96)
    assert_same_codes(spec, spec.recorded_weights, pixels)


def small_spec():
    """A network cheap to convert: the tests that damage a private cache convert it afresh each time."""
    spec = cnncodes.ExtractorSpec.create(backbone="vgg16", layer="block2_pool", image_size=32, weights="none")
    return spec, spec.recorded_weights


@pytest.mark.slow
def test_converted_model_is_cached_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "cache"))  # it damages entries: not the shared cache
    spec, weights = small_spec()
    first = spec.runner(weights, "onnx")
    assert isinstance(first, OnnxRunner)

    def must_not_build():
        raise AssertionError("a cached model must not be built again")

    assert isinstance(make_runner(must_not_build, spec.key, "onnx"), OnnxRunner)

    path = onnx_cache_path(spec.key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    builds = []
    rebuilt = make_runner(lambda: builds.append(1) or spec.build(weights), spec.key, "onnx")
    assert builds == [1] and isinstance(rebuilt, OnnxRunner)
    assert json.loads(path.with_suffix(".json").read_text())["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.read_bytes() != bytes(data)
    assert isinstance(make_runner(must_not_build, spec.key, "onnx"), OnnxRunner)


@pytest.mark.slow
def test_cache_folder_is_private_and_a_swapped_entry_is_refused_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "cache"))  # it damages entries: not the shared cache
    spec, weights = small_spec()
    other = cnncodes.ExtractorSpec.create(backbone="vgg16", layer="block3_pool", image_size=32, weights="none")
    spec.runner(weights, "onnx")
    other.runner(weights, "onnx")
    pinned = spec.pinned()
    mine, theirs = onnx_cache_path(spec.key), onnx_cache_path(other.key)
    assert stat.S_IMODE(mine.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(mine.parent.parent.stat().st_mode) == 0o700
    pixels = np.stack([pattern("stripes", i, 32) for i in range(3)])
    expected = KerasRunner(spec.build(weights))(pixels)

    shutil.copy(theirs, mine)  # another network's entry, copied with its record
    shutil.copy(theirs.with_suffix(".json"), mine.with_suffix(".json"))
    assert cached_runner(mine, spec.key) == "it was made for another model"

    record = json.loads(theirs.with_suffix(".json").read_text())  # and with the record edited to fit
    mine.with_suffix(".json").write_text(json.dumps(record | {"key": spec.key}))
    notices = []
    rebuilt = make_runner(partial(spec.build, weights), spec.key, "onnx", notice=notices.append, pin=pinned.probe)
    assert sum("refused" in n for n in notices) == 1, notices
    np.testing.assert_allclose(rebuilt(pixels), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    assert json.loads(mine.with_suffix(".json").read_text())["probe"] == pinned.probe


def unexportable(spec, weights):
    """A model whose export fails in the child process that converts it."""
    model = spec.build(weights)

    def broken_export(*args, **kwargs):
        raise RuntimeError("unsupported op Foo")

    model.export = broken_export
    return model


KILLED_IN_CHILD = """
import os, signal, sys
import cnncodes


def build():
    \"\"\"Builds in the parent; in the converting child, dies as the kernel's OOM killer would make it.\"\"\"
    if getattr(sys.modules["__main__"].__spec__, "name", None) == "cnncodes.runtime.child":
        os.kill(os.getpid(), signal.SIGKILL)
    spec = cnncodes.ExtractorSpec.create(backbone="vgg16", image_size=32, weights="none")
    return spec.build(spec.recorded_weights)
"""
CONVERT_KILLED = """
from cnncodes.runtime.runners import make_runner, onnx_cache_path
from killed import build
notices = []
runner = make_runner(build, "killed", "onnx", notice=notices.append)
print(type(runner).__name__, onnx_cache_path("killed").with_suffix(".failed").exists(), notices[-1])
"""


@pytest.mark.slow
def test_failed_conversion_falls_back_to_keras_with_a_notice_and_a_killed_one_is_tried_again(monkeypatch, tmp_path):
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "cache"))
    spec, weights = small_spec()
    notices = []
    fallback = make_runner(partial(unexportable, spec, weights), spec.key, "onnx", notice=notices.append)
    assert isinstance(fallback, KerasRunner)
    assert len(notices) == 1  # the conversion itself is news on the console, not a notice
    assert "unsupported op Foo" in notices[0] and "Keras" in notices[0]
    assert not onnx_cache_path(spec.key).exists()
    failed = onnx_cache_path(spec.key).with_suffix(".failed")
    assert failed.is_file()  # a failure that repeats is not tried again...
    again = make_runner(partial(unexportable, spec, weights), spec.key, "onnx", notice=notices.append)
    assert isinstance(again, KerasRunner) and len(notices) == 2
    assert "unsupported op Foo" in notices[1] and f"to try converting again, delete {failed}" in notices[1]  # ...unless

    def unbuildable():
        raise cnncodes.CnnCodesError("vgg16 has no layer 'nope'")

    with pytest.raises(cnncodes.CnnCodesError, match="no layer 'nope'"):  # a user's error, not the converter's
        make_runner(unbuildable, "unbuildable", "onnx")
    assert not onnx_cache_path("unbuildable").with_suffix(".failed").exists()

    # A process without TensorFlow converts in a child; one killed there is tried again next time.
    (tmp_path / "killed.py").write_text(KILLED_IN_CHILD)
    env = os.environ | {"CNNCODES_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", CONVERT_KILLED], capture_output=True, text=True, env=env, check=False, timeout=600
    )
    assert done.returncode == 0, done.stderr
    kind, failed_recorded, notice = done.stdout.strip().splitlines()[-1].split(" ", 2)
    assert kind == "KerasRunner" and failed_recorded == "False" and "killed" in notice


@pytest.mark.slow
def test_cold_conversion_leaves_no_tensorflow_in_the_process_and_never_runs_the_script_again(tmp_path):
    """A notebook user's script without an `if __name__ == "__main__":` guard runs once, and converts."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        f"""
import sys, cnncodes
from cnncodes.runtime.runners import OnnxRunner
with open({str(tmp_path / "runs.txt")!r}, "a") as runs:
    runs.write("ran\\n")
spec = cnncodes.ExtractorSpec.create(backbone="mobilenetv2", image_size=32, weights="none")
assert isinstance(spec.runner(spec.recorded_weights), OnnxRunner)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))
"""
    )
    env = os.environ | {"CNNCODES_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert (
        "Converting mobilenetv2/out_relu for ONNX Runtime (first use; cached for later runs)"
        in " ".join(done.stderr.split())
        and "Traceback" not in done.stderr
    )
    assert (tmp_path / "runs.txt").read_text() == "ran\n"


def test_bundle_fitted_on_keras_codes_predicts_the_same_with_onnx(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=10)
    cnncodes.extract(data, tmp_path / "f", fast_spec(), runtime="keras", progress=False)
    fit = runner.invoke(
        app, ["fit-svm", str(tmp_path / "f"), "--out", str(tmp_path / "m"), "--classifier", "logreg", "--quiet"]
    )
    assert fit.exit_code == 0, fit.output
    model = tmp_path / "m" / "vgg16-block5_pool-logreg.joblib"
    answers = {}
    for runtime in ("keras", "onnx"):
        result = runner.invoke(
            app, ["predict", str(model), str(data), "--runtime", runtime, "--format", "json", "--quiet"]
        )
        assert result.exit_code == 0, result.output
        answers[runtime] = json.loads(result.stdout)
    assert [a["label"] for a in answers["keras"]] == [a["label"] for a in answers["onnx"]]
    np.testing.assert_allclose(
        [a["probability"] for a in answers["keras"]], [a["probability"] for a in answers["onnx"]], atol=1e-3
    )


def test_warm_cache_extract_and_predict_never_import_tensorflow(tmp_path):
    data = make_dataset(tmp_path / "d", per_class=6)
    cnncodes.extract(data, tmp_path / "f", fast_spec(), progress=False)
    fit = runner.invoke(
        app, ["fit-svm", str(tmp_path / "f"), "--out", str(tmp_path / "m"), "--classifier", "knn", "--quiet"]
    )
    assert fit.exit_code == 0, fit.output
    (tmp_path / "d" / "squares" / "extra.png").write_bytes((tmp_path / "d" / "squares" / "squares_01.png").read_bytes())
    script = f"""
import sys, cnncodes
from cnncodes.serving.predict import predict
spec = cnncodes.ExtractorSpec.create(backbone="vgg16", weights="none", image_size=32)
r = cnncodes.extract({str(data)!r}, {str(tmp_path / "f2")!r}, spec, progress=False)
p = predict({str(tmp_path / "m" / "vgg16-block5_pool-knn.joblib")!r}, [{str(data / "stripes")!r}], progress=False)
assert r.computed == r.n_images and all(x.label for x in p), (r, p)
print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


ODD_FAILURE = """
class OddError(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def fail():
    print("converter chatter")
    raise OddError("one", "two")
"""


def test_the_child_keeps_stdout_clean_and_returns_an_error_it_cannot_send_as_its_type_and_text(tmp_path):
    """stdout may carry the command's JSON; an exception that pickles but cannot be rebuilt still says what it was."""
    (tmp_path / "odd.py").write_text(ODD_FAILURE)
    script = "from cnncodes.runtime.child import in_child\nfrom odd import fail\ntry:\n    in_child(fail)\n"
    script += "except Exception as e:\n    print(type(e).__name__, e)\n"
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.strip() == "RuntimeError OddError: one and two", done.stderr
    assert "converter chatter" in done.stderr
