"""`extract --engine ray` on one local 2-CPU Ray, started once for the whole session.

The Ray engine must produce what the local engine produces (rows equal to float
tolerance, the same split, rejections and groups) from the same pieces, resume an
interrupted run, and report a file that cannot be decoded as a row with its reason.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

import cnncodes
from cnncodes.cli.main import app
from cnncodes.codes.engines.job import CodeJob
from cnncodes.codes.engines.ray import RayEngine

from .helpers import FAST_ARGS, fast_spec, make_dataset, runner


@pytest.fixture(scope="session")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = make_dataset(tmp_path_factory.mktemp("ray") / "data", per_class=8)
    (root / "stripes" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    # a file name that is not UTF-8 (Latin-1, as archives made on Windows have): no Arrow string
    (root / "circles" / "circles_03.png").rename(root / "circles" / os.fsdecode(b"circles_caf\xe9.png"))
    return root


def read(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_ray_engine_writes_what_the_local_engine_writes(local_ray, data: Path, tmp_path: Path):
    result = runner.invoke(
        app, ["extract", str(data), "--out", str(tmp_path / "ray"), *FAST_ARGS, "--engine", "ray", "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    local = cnncodes.extract(data, tmp_path / "local", fast_spec(), progress=False)
    ray_codes, local_codes = np.load(tmp_path / "ray" / "features.npy"), np.load(local.out / "features.npy")
    assert ray_codes.shape == local_codes.shape == (24, 512)
    assert np.abs(ray_codes - local_codes).max() <= 1e-5 * np.abs(local_codes).max()
    for name in ("split.csv", "rejected.csv"):
        assert read(tmp_path / "ray" / name) == read(local.out / name)
    np.testing.assert_array_equal(np.load(tmp_path / "ray" / "groups.npy"), np.load(local.out / "groups.npy"))
    meta = json.loads((tmp_path / "ray" / "meta.json").read_text())
    assert meta["engine"] == {"name": "ray", "nodes": 1, "cpus": 2, "workers": 2}
    assert json.loads((local.out / "meta.json").read_text())["engine"]["name"] == "local"


@pytest.mark.slow
def test_the_ray_engine_writes_the_local_engines_joined_gem_codes(local_ray, data: Path, tmp_path: Path):
    spec = fast_spec(layer="block3_pool,block5_pool", pooling="gem")
    local = np.load(cnncodes.extract(data, tmp_path / "local", spec, progress=False).out / "features.npy")
    on_ray = cnncodes.extract(data, tmp_path / "ray", spec, progress=False, engine="ray", workers=1)
    ray_codes = np.load(on_ray.out / "features.npy")
    assert ray_codes.shape == local.shape == (24, 768)
    assert np.abs(ray_codes - local).max() <= 1e-5 * np.abs(local).max()


@pytest.mark.slow
def test_interrupted_ray_run_resumes_without_redoing_finished_rows(local_ray, data: Path, tmp_path: Path):
    out, stopped_at = tmp_path / "f", []

    def stop(done: int, _total: int) -> None:
        if done >= 8:
            stopped_at.append(done)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(data, out, fast_spec(), progress=False, engine="ray", workers=1, batch_size=4, on_batch=stop)
    resumed = cnncodes.extract(data, out, fast_spec(), progress=False, engine="ray", workers=1, batch_size=4)
    assert (resumed.computed, resumed.reused) == (24 - stopped_at[0], stopped_at[0])
    fresh = cnncodes.extract(data, tmp_path / "fresh", fast_spec(), progress=False)
    assert np.abs(np.load(out / "features.npy") - np.load(fresh.out / "features.npy")).max() <= 1e-5


def test_a_file_that_fails_to_decode_on_an_actor_comes_back_with_its_reason(local_ray, data: Path):
    paths = [data / "stripes" / "stripes_00.jpg", data / "stripes" / "broken.jpg", data / "circles" / "circles_01.png"]
    job = CodeJob(spec=fast_spec(), runtime="onnx", paths=paths, batch_size=8)
    batches = list(RayEngine(workers=1).codes(job, np.arange(3)))
    rows = sorted(int(r) for b in batches for r in b.rows)
    failed = [f for b in batches for f in b.failed]
    assert rows == [0, 2] and len(failed) == 1 and failed[0][0] == 1 and "not an image" in str(failed[0][1])
    assert failed[0][1].category == "not an image"  # the category crosses the cluster too


def test_engine_ray_without_ray_installed_is_one_line_saying_how_to_install(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.delitem(sys.modules, "cnncodes.codes.engines.ray")
    result = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "f"), *FAST_ARGS, "--engine", "ray"])
    assert result.exit_code == 2
    assert "pip install 'cnncodes[ray]'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_ray_engine_reads_an_s3_prefix(local_ray, s3_data, tmp_path: Path):
    uri, local = s3_data
    on_ray = cnncodes.extract(uri, tmp_path / "ray", fast_spec(), progress=False, engine="ray", workers=1, batch_size=4)
    on_disk = cnncodes.extract(local, tmp_path / "disk", fast_spec(), progress=False)
    assert on_ray.n_images == on_disk.n_images == 18 and [p for p, *_ in on_ray.rejected] == ["squares/broken.png"]
    assert np.abs(np.load(on_ray.out / "features.npy") - np.load(on_disk.out / "features.npy")).max() <= 1e-5


@pytest.mark.slow
def test_an_int8_extract_runs_the_same_quantized_model_on_the_actors(local_ray, data: Path, tmp_path: Path):
    # at two sizes: the resize inside the network ships with the quantized model
    options = [
        *FAST_ARGS,
        "--image-size",
        "32,48",
        "--layer",
        "block3_pool",
        "--precision",
        "int8",
        "--calibration",
        "6",
    ]
    local = runner.invoke(app, ["extract", str(data), "--out", str(tmp_path / "local"), *options])
    assert local.exit_code == 0, local.output
    on_ray = runner.invoke(
        app, ["extract", str(data), "--out", str(tmp_path / "ray"), *options, "--engine", "ray", "--batch-size", "4"]
    )
    assert on_ray.exit_code == 0, on_ray.output
    local_codes, ray_codes = np.load(tmp_path / "local" / "features.npy"), np.load(tmp_path / "ray" / "features.npy")
    assert np.abs(ray_codes - local_codes).max() <= 1e-5 * np.abs(local_codes).max()
    assert json.loads((tmp_path / "ray" / "meta.json").read_text())["extractor"]["precision"] == "int8"
    fp32 = cnncodes.extract(
        data, tmp_path / "fp32", fast_spec(image_size=[32, 48], layer="block3_pool"), progress=False
    )
    assert not np.allclose(np.load(fp32.out / "features.npy"), ray_codes)  # the quantized model ran there
