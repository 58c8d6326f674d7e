"""`--precision int8`: quantized codes close to fp32's, calibrated on train images only, cached by calibration set."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cnncodes import ExtractorSpec
from cnncodes.runtime.quantize import calibration_set

from .helpers import FLOWERS, MOBILENET_WEIGHTS, cli, make_dataset, needs_real_weights, session_root, write_image

SMALL = ("--backbone", "vgg16", "--layer", "block3_pool", "--weights", "none", "--image-size", "32")


def extract(data: Path, out: Path, *options: str):
    result = cli("extract", data, "--out", out, *options)
    assert result.exit_code == 0, result.output
    return result


def meta(features: Path) -> dict:
    return json.loads((features / "meta.json").read_text())


def subsets(features: Path, data: Path) -> dict[str, str]:
    with open(features / "split.csv", newline="") as f:
        return {str((data / row["path"]).resolve()): row["subset"] for row in csv.DictReader(f)}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="session")
def flowers(tmp_path_factory) -> Path:
    """A CSV of 15 real Flowers-17 photos (three classes), read in place."""
    listing = tmp_path_factory.mktemp("flowers") / "flowers.csv"
    rows = [f"{p},{c}\n" for c in ("Daisy", "Sunflower", "Tulip") for p in sorted((FLOWERS / c).glob("*.jpg"))[:5]]
    listing.write_text("path,label\n" + "".join(rows))
    return listing


@needs_real_weights
def test_int8_codes_agree_with_fp32_codes_on_real_mobilenet_weights(flowers, tmp_path, monkeypatch):
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))
    # 96 px: the fp32 model test_runtime converts, so a whole-suite run converts it once
    extract(flowers, tmp_path / "fp32", "--image-size", "96", "--quiet")
    extract(flowers, tmp_path / "int8", "--image-size", "96", "--precision", "int8", "--calibration", "8", "--quiet")
    fp32, int8 = (np.load(tmp_path / p / "features.npy") for p in ("fp32", "int8"))
    assert fp32.shape == int8.shape
    agreement = cosines(fp32, int8)
    assert agreement.mean() > 0.9 and agreement.min() > 0.8, agreement
    spec = meta(tmp_path / "int8")["extractor"]
    assert spec["precision"] == "int8" and spec["quantization"]["agreement"]["min"] > 0.8
    assert not np.allclose(fp32, int8)  # the codes really come from the quantized model


@pytest.fixture(scope="session")
def small_int8(tmp_path_factory):
    """An int8 extract of a small synthetic dataset, fitted and with its notices."""
    root = tmp_path_factory.mktemp("small_int8")
    data = make_dataset(root / "data", per_class=8, size=32)
    with pytest.MonkeyPatch.context() as env:  # session fixtures run before conftest's per-test cache isolation
        env.setenv("CNNCODES_CACHE_DIR", str(session_root(tmp_path_factory) / "cnncodes_cache"))
        result = extract(data, root / "features", *SMALL, "--precision", "int8", "--calibration", "6")
    fit = cli("fit-svm", root / "features", "--out", root / "models", "--classifier", "logreg", "--cv", "3", "--quiet")
    assert fit.exit_code == 0, fit.output
    return {
        "root": root,
        "data": data,
        "features": root / "features",
        "output": result.output,
        "model": root / "models" / "vgg16-block3_pool-logreg.joblib",
    }


def test_calibration_reads_train_images_only(small_int8):
    calibration = meta(small_int8["features"])["extractor"]["calibration"]
    seen = subsets(small_int8["features"], small_int8["data"])
    assert len(calibration["images"]) == 6 and calibration["holdout"]
    assert {seen[p] for p in calibration["images"] + calibration["holdout"]} == {"train"}
    assert "quantizing vgg16 to int8 on 6 train images" in small_int8["output"]


def test_a_changed_calibration_set_or_precision_never_reuses_a_cached_model(small_int8, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(small_int8["data"], data)
    before = meta(small_int8["features"])["extractor"]
    seen = subsets(small_int8["features"], small_int8["data"])
    test_image = next(p for p, s in seen.items() if s == "test")
    write_image(data / Path(test_image).relative_to(small_int8["data"]), "stripes", seed=999, size=32)
    again = extract(data, tmp_path / "a", *SMALL, "--precision", "int8", "--calibration", "6")
    assert "quantizing" not in again.output  # a new test image changes nothing the int8 model was made from
    assert meta(tmp_path / "a")["extractor"]["calibration"]["fingerprint"] == before["calibration"]["fingerprint"]

    calibrated = Path(before["calibration"]["images"][0]).relative_to(small_int8["data"])
    write_image(data / calibrated, "circles", seed=998, size=32)
    changed = extract(data, tmp_path / "a", *SMALL, "--precision", "int8", "--calibration", "6")
    assert "quantizing" in changed.output
    assert meta(tmp_path / "a")["extractor"]["calibration"]["fingerprint"] != before["calibration"]["fingerprint"]

    int8_codes = np.load(tmp_path / "a" / "features.npy")
    extract(data, tmp_path / "a", *SMALL, "--quiet")
    assert meta(tmp_path / "a")["extractor"]["precision"] == "fp32"
    assert not np.allclose(np.load(tmp_path / "a" / "features.npy"), int8_codes)


@pytest.mark.slow
def test_an_int8_model_quantized_now_runs_on_the_threads_asked_for(small_int8, tmp_path, monkeypatch):
    """A one-thread server that finds no cached int8 model must not take every core once it made one."""
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(tmp_path / "cold"))
    spec = ExtractorSpec.from_dict(meta(small_int8["features"])["extractor"])
    runner = spec.runner(spec.find_weights(), threads=1)
    assert runner.session.get_session_options().intra_op_num_threads == 1
    assert spec.runner(spec.find_weights(), threads=1).session.get_session_options().intra_op_num_threads == 1


def test_predict_with_an_int8_bundle_gives_the_recorded_test_predictions(small_int8):
    recorded = json.loads(small_int8["model"].with_suffix(".json").read_text())["test_predictions"]
    images = [small_int8["data"] / p["path"] for p in recorded]
    result = cli("predict", small_int8["model"], *images, "--format", "json", "--quiet")
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [a["label"] for a in answers] == [p["predicted"] for p in recorded]
    np.testing.assert_allclose([a["probability"] for a in answers], [p["probability"] for p in recorded], atol=1e-5)

    keras = cli("predict", small_int8["model"], *images, "--runtime", "keras", "--quiet")
    assert keras.exit_code == 2 and "int8" in keras.output and "Traceback" not in keras.output


def test_the_calibration_draw_keeps_its_images_when_other_train_images_come_and_go(tmp_path):
    """Another draw means another int8 model and every code computed again: adding one image must not reshuffle it."""
    for root in (tmp_path / "here", tmp_path / "moved"):
        for i in range(300):
            (root / f"class{i % 3}").mkdir(parents=True, exist_ok=True)
            (root / f"class{i % 3}" / f"{i:03d}.png").write_bytes(bytes([i % 256]))
    files = sorted(map(str, (tmp_path / "here").rglob("*.png")))
    before = calibration_set(files, 16)
    assert len(before["images"]) == 16 and len(before["holdout"]) == 32
    drawn = set(before["images"] + before["holdout"])
    undrawn, added = next(f for f in files if f not in drawn), tmp_path / "here" / "class0" / "new.png"
    added.write_bytes(b"new")
    for changed in ([f for f in files if f != undrawn], [*files, str(added)]):
        after = calibration_set(changed, 16)
        assert len(set(after["images"] + after["holdout"]) & drawn) >= 47  # at most the new file is drawn instead
    moved = calibration_set([f.replace("/here/", "/moved/") for f in files], 16)
    assert [Path(p).relative_to(tmp_path / "moved") for p in moved["images"]] == [
        Path(p).relative_to(tmp_path / "here") for p in before["images"]
    ]
