"""Fixtures shared by the test modules; what they share besides fixtures is in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .helpers import FLOWERS, MOBILENET_WEIGHTS, make_dataset, session_root


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A three-class dataset of 8 small images per class, fresh for each test."""
    return make_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Never touch the developer's ~/.keras or ~/.cache; real weights come from the `shared_data` fixture.

    The ONNX cache and KERAS_HOME are shared by the whole run, both xdist workers included, so each
    extractor is converted once. Conversions publish atomically: two workers converting the same model
    at once each publish a whole, checked model. A test that damages cache entries sets its own cache.
    """
    root = session_root(tmp_path_factory)
    monkeypatch.setenv("KERAS_HOME", str(root / "keras_home"))
    monkeypatch.setenv("CNNCODES_CACHE_DIR", str(root / "cnncodes_cache"))
    monkeypatch.delenv("CNNCODES_WEIGHTS_DIR", raising=False)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def shared_data(monkeypatch) -> None:
    """The real weights and images beside the project (../shared), found whatever the environment says.

    Their absence fails the test instead of skipping it: a skipped test proves nothing.
    """
    missing = [str(p) for p in (MOBILENET_WEIGHTS, FLOWERS, FLOWERS.parent / "DUPLICATES.tsv") if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run the tests from a checkout with ../shared beside it")
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))
