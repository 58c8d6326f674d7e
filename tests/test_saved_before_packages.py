"""Artifacts made by cnncodes before its modules moved into sub-packages load and answer as they did.

`tests/data/before_packages/` was written by the release with the flat layout: a features
folder (untrained VGG16, 32 px), a logreg and a k-NN bundle with their run records, and the
ONNX cache record of that extractor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cnncodes

SAVED = Path(__file__).parent / "data" / "before_packages"
RUNS = ("vgg16-block5_pool-logreg", "vgg16-block5_pool-knn")


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    copy = tmp_path / "saved"
    shutil.copytree(SAVED, copy)
    return copy


def test_the_features_folder_loads_unchanged(saved):
    feats = cnncodes.load_features(saved / "features")
    assert feats.X.shape == (18, 512) and feats.classes == ["circles", "squares", "stripes"]
    assert np.array_equal(feats.X, np.load(SAVED / "features" / "features.npy"))
    assert sorted(set(feats.subsets.tolist())) == ["test", "train", "val"]


@pytest.mark.parametrize("run", RUNS)
def test_a_bundle_predicts_its_recorded_test_images_as_it_did(saved, run):
    record = json.loads((saved / "models" / f"{run}.json").read_text())
    expected = record["test_predictions"]
    found = cnncodes.predict(
        saved / "models" / f"{run}.joblib", [saved / "images" / row["path"] for row in expected], progress=False
    )
    assert [p.label for p in found] == [row["predicted"] for row in expected]
    assert np.allclose([p.probability for p in found], [row["probability"] for row in expected], atol=2e-6)


def test_the_onnx_cache_keeps_its_names_and_the_runs_rank(saved, monkeypatch, tmp_path):
    """The extractor lands in the cache file the old release made, so a warm cache stays warm."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(cache))
    cnncodes.predict(saved / "models" / f"{RUNS[0]}.joblib", saved / "images" / "circles", progress=False)
    (old,) = (SAVED / "onnx").glob("*.json")
    made = json.loads((cache / "onnx" / old.name).read_text())
    assert (
        made["key"] == json.loads(old.read_text())["key"] and (cache / "onnx" / old.with_suffix(".onnx").name).exists()
    )
    assert sorted(r["run"] for r in cnncodes.compare(saved / "models")) == sorted(RUNS)
