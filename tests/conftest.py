"""Fixtures shared by the test modules; what they share besides fixtures is in helpers.py."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

# Two xdist workers share two cores: each runs TensorFlow's and OpenMP's operators on one thread
# rather than oversubscribing the machine (7 % less wall time on test_extract and test_classify).
# Set before any test module imports TensorFlow; ONNX Runtime's threads sleep between operators.
# joblib counts one core too, so a search's n_jobs=-1 runs its candidates in the worker itself:
# a pool of processes, each importing scikit-learn, cost the suite more than the fits it ran.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "LOKY_MAX_CPU_COUNT"):
        os.environ.setdefault(_threads, "1")

from .helpers import (
    MAX_BYTES,
    MOBILENET_WEIGHTS,
    V2_MODEL,
    demo_in,
    free_port,
    make_dataset,
    missing_shared_data,
    run_lock,
    running_server,
    save_legacy_h5_weights,
    serve_bundle,
    session_root,
)


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
    missing_shared_data()
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> dict:
    """One run of the demo (`demo_in`) with the real weights, made once for the run and read by several tests.

    The first xdist worker to need it runs it under a lock; the other waits and reuses it. The tests
    only read its folder.
    """
    missing_shared_data()
    base = session_root(tmp_path_factory)
    with run_lock(base / "demo.lock"), pytest.MonkeyPatch.context() as mp:
        mp.setenv("CNNCODES_CACHE_DIR", str(base / "cnncodes_cache"))
        mp.setenv("KERAS_HOME", str(base / "keras_home"))
        mp.setenv("CNNCODES_WEIGHTS_DIR", str(MOBILENET_WEIGHTS.parent))
        return demo_in(base / "demo")


@pytest.fixture(scope="session")
def vgg16_weights(tmp_path_factory) -> Path:
    """A VGG16 no-top weights file (seeded, unlike the untrained weights), one for the whole run.

    Tests copy it rather than write their own: copies have the same SHA-256, so every extractor
    made from one converts to ONNX once for the run, both xdist workers included.
    """
    import keras

    path = session_root(tmp_path_factory) / "vgg16-weights" / "vgg16_notop.h5"
    with run_lock(path.with_suffix(".lock")):
        if not path.is_file():
            keras.utils.set_random_seed(123)
            model = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
            save_legacy_h5_weights(model, path)
    return path


@pytest.fixture(scope="session")
def served(tmp_path_factory) -> dict:
    """The bundle the serving tests serve (`serve_bundle`), made once for the run, and the environment to serve it in.

    The first xdist worker to need it makes it under a lock; the other waits and reuses it. "root" is
    this worker's own folder, for the servers' logs. Session-scoped fixtures run before
    `_isolated_caches`, so the same cache folders are set here, for this process and its servers.
    """
    base = session_root(tmp_path_factory)
    env = {**os.environ, "CNNCODES_CACHE_DIR": str(base / "cnncodes_cache"), "KERAS_HOME": str(base / "keras_home")}
    with run_lock(base / "served.lock"), pytest.MonkeyPatch.context() as mp:
        for name in ("CNNCODES_CACHE_DIR", "KERAS_HOME"):
            mp.setenv(name, env[name])
        model = serve_bundle(base / "served")
    data = base / "served" / "data"
    root = tmp_path_factory.mktemp("serve")
    return {"root": root, "data": data, "model": model, "env": env, "images": sorted(data.rglob("*.*"))}


@pytest.fixture(scope="session")
def server(served) -> Iterator[str]:
    """The server most serving tests share: a small body limit, a wait window long enough to batch concurrent
    requests, and its model named V2_MODEL in the V2 protocol's paths. Its output goes to served["root"]/server.log.
    """
    options = ("--max-bytes", str(MAX_BYTES), "--batch-wait-ms", "50", "--model-name", V2_MODEL)
    with running_server(served, *options) as (url, _):
        yield url


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on a free loopback port, for the tests of object stores."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_data(s3_server, tmp_path, monkeypatch) -> tuple[str, Path]:
    """A bucket of its own holding a class-per-folder dataset (and one broken file), and the same files on disk."""
    import pyarrow.fs

    from cnncodes.data import remote

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(key, value)
    remote.bucket_filesystem.cache_clear()
    local = make_dataset(tmp_path / "data", per_class=6)
    (local / "squares" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n and nothing else")
    bucket = f"cnncodes-{uuid.uuid4().hex[:12]}"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=s3_server, region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(bucket)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"{bucket}/data/{path.relative_to(local).as_posix()}") as f:
            f.write(path.read_bytes())
    return f"s3://{bucket}/data", local
