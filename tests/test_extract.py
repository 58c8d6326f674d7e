"""`cnncodes extract` through the CLI and the library API, with small images and small networks."""

from __future__ import annotations

import csv
import hashlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnncodes
from cnncodes.codes.features import load_features
from cnncodes.codes.plan import file_ids
from cnncodes.core.files import sha256_file
from cnncodes.data.decode import BadImage
from cnncodes.data.ingest import Dataset
from cnncodes.data.split import Split
from cnncodes.runtime.runners import KerasRunner, OnnxRunner

from .helpers import (
    FAST_ARGS,
    FLOWERS,
    cli,
    fast_spec,
    needs_real_weights,
    pattern,
    save_legacy_h5_weights,
    write_image,
)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def add_bad_files(data: Path) -> dict[str, str]:
    (data / "stripes" / "empty.jpg").write_bytes(b"")
    good = (data / "stripes" / "stripes_00.jpg").read_bytes()
    (data / "circles" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "squares" / "notes.jpg").write_text("not an image at all")
    return {"stripes/empty.jpg": "empty", "circles/truncated.jpg": "truncated", "squares/notes.jpg": "not an image"}


def test_extract_writes_codes_labels_split_rejected_and_meta(dataset: Path, tmp_path: Path):
    bad = add_bad_files(dataset)
    out = tmp_path / "features"
    result = cli("extract", dataset, "--out", out, *FAST_ARGS)
    assert result.exit_code == 0, result.output
    summary = " ".join(result.stderr.split())
    assert "Warning: skipped 3 file(s) (" in summary
    assert all(f"1 {why}" in summary for why in ("empty", "truncated", "not an image"))

    features = np.load(out / "features.npy")
    labels = np.load(out / "labels.npy")
    meta = json.loads((out / "meta.json").read_text())
    split_rows = read_csv(out / "split.csv")
    assert features.dtype == np.float32 and features.shape == (24, 512)
    assert np.isfinite(features).all() and features.std() > 0
    assert meta["classes"] == ["circles", "squares", "stripes"]
    assert meta["format"] == "cnncodes.features/2" and "paths" not in meta and "subsets" not in meta  # split.csv's
    assert meta["split"]["counts"] == {s: [r["subset"] for r in split_rows].count(s) for s in ("train", "val", "test")}
    assert [meta["classes"][i] for i in labels] == [r["label"] for r in split_rows]
    assert all(Path(r["path"]).parent.name == meta["classes"][i] for r, i in zip(split_rows, labels))
    assert {r["subset"] for r in split_rows} == {"train", "val", "test"}
    assert list(split_rows[0]) == ["path", "label", "subset"]
    extractor = dict(meta["extractor"])
    assert all(isinstance(v, float) for v in extractor.pop("probe"))  # pins the ONNX model to Keras's outputs
    assert extractor | {"weights_sha256": None} == {
        "backbone": "vgg16",
        "layer": "block5_pool",
        "pooling": "avg",
        "image_size": 32,
        "resize": "crop",
        "preprocessing": "caffe: RGB to BGR, minus ImageNet mean",
        "weights": "none",
        "weights_sha256": None,
        "weights_file": None,
        "flip": False,
        "scales": None,
        "views": None,
        "precision": "fp32",
        "calibration": None,
        "quantization": None,
        "format": 1,
    }
    assert meta["versions"]["keras"].startswith("3.")
    assert meta["images_per_second"] > 0 and meta["elapsed_seconds"] > 0

    rejected = {r["path"]: r for r in read_csv(out / "rejected.csv")}
    assert set(rejected) == set(bad)
    for path, word in bad.items():
        assert word in rejected[path]["reason"] and rejected[path]["category"] == word


def direct_forward_pass(dataset: Path, features: Path) -> tuple[KerasRunner, np.ndarray]:
    """The Keras network of a features folder, and the pixels of its images in row order."""
    from cnncodes.data.decode import load_square

    feats = load_features(features)
    pixels = np.stack([load_square(dataset / p, feats.spec.image_size) for p in feats.paths])
    return KerasRunner(feats.spec.build(feats.spec.find_weights())), pixels


def test_codes_match_a_direct_forward_pass_in_row_order(dataset: Path, tmp_path: Path):
    result = cnncodes.extract(dataset, tmp_path / "f", fast_spec(), progress=False)
    network, pixels = direct_forward_pass(dataset, result.out)
    expected = network(pixels)
    codes = np.load(result.out / "features.npy")
    assert np.abs(codes - expected).max() <= 1e-4 * np.abs(expected).max()


def test_flip_codes_are_the_mean_of_the_image_and_its_mirror_image(dataset: Path, tmp_path: Path):
    result = cnncodes.extract(dataset, tmp_path / "f", fast_spec(flip=True), progress=False)
    network, pixels = direct_forward_pass(dataset, result.out)
    expected = (network(pixels) + network(pixels[:, :, ::-1])) / 2
    codes = np.load(result.out / "features.npy")
    on_keras = np.load(
        cnncodes.extract(dataset, tmp_path / "k", fast_spec(flip=True), progress=False, runtime="keras").out
        / "features.npy"
    )
    for found in (codes, on_keras):
        assert np.abs(found - expected).max() <= 1e-4 * np.abs(expected).max()
    plain = np.load(cnncodes.extract(dataset, tmp_path / "plain", fast_spec(), progress=False).out / "features.npy")
    assert np.abs(codes - plain).max() > 0.05 * np.abs(plain).max()


@pytest.mark.slow
def test_codes_at_several_sizes_are_the_mean_of_the_codes_at_each_size_which_are_kept(
    dataset: Path, tmp_path: Path, monkeypatch
):
    both = load_features(
        cnncodes.extract(dataset, tmp_path / "both", fast_spec(image_size=[48, 32]), progress=False).out
    )
    assert (both.spec.image_size, both.spec.scales, both.spec.views) == (48, [32, 48], 2)
    runner = both.spec.runner(both.spec.find_weights())
    assert isinstance(runner.runner, OnnxRunner)  # exported exactly, no Keras fallback
    one = {  # through Keras: no conversion of the single-size networks just for the comparison
        n: load_features(
            cnncodes.extract(dataset, tmp_path / str(n), fast_spec(image_size=n), runtime="keras", progress=False).out
        ).X
        for n in (32, 48)
    }
    scale = np.abs(one[48]).max()
    # decoded once at 48 px and shrunk inside the network: the 32-px view is a direct 32-px decode's, nearly
    assert both.views is not None and both.views.shape == (len(both.X), 2, both.X.shape[1])
    for view, size in enumerate((32, 48)):
        assert np.abs(both.views[:, view] - one[size]).max() <= 0.01 * scale
    assert np.array_equal(both.X, both.views.mean(axis=1))
    monkeypatch.setattr("cnncodes.codes.features.IN_MEMORY_BYTES", 64)  # as for a million images: mapped, not in memory
    mapped = load_features(both.path).X
    assert isinstance(mapped, np.memmap) and np.array_equal(mapped, both.X)
    assert np.abs(one[48] - one[32]).max() > 0.1 * scale
    # what predict and serve compute for an image is the mean stored for it
    _, pixels = direct_forward_pass(dataset, both.path)
    assert np.abs(runner(pixels) - both.X).max() <= 1e-5 * scale


def test_flip_codes_stay_the_same_when_every_image_is_mirrored(dataset: Path, tmp_path: Path):
    for source in sorted(dataset.glob("*/*")):
        pixels = np.asarray(Image.open(source).convert("RGB"))
        for name, view in (("original", pixels), ("mirrored", pixels[:, ::-1])):
            target = tmp_path / name / source.parent.name / f"{source.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(view)).save(target)

    def codes(name: str, flip: bool) -> np.ndarray:
        out = cnncodes.extract(tmp_path / name, tmp_path / f"{name}-{flip}", fast_spec(flip=flip), progress=False).out
        return np.load(out / "features.npy")[np.argsort(load_features(out).paths)]

    scale = np.abs(codes("original", True)).max()
    assert np.abs(codes("original", True) - codes("mirrored", True)).max() <= 1e-4 * scale
    assert np.abs(codes("original", False) - codes("mirrored", False)).max() > 0.05 * scale


def test_rerun_with_same_data_and_settings_recomputes_nothing(dataset: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "f"
    first = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    stamp = (out / "features.npy").stat().st_mtime_ns

    def no_network(*_a, **_k):
        raise AssertionError("the network must not be built again")

    monkeypatch.setattr(cnncodes.ExtractorSpec, "build", no_network)
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert again.up_to_date and again.computed == 0 and again.n_images == first.n_images
    assert (out / "features.npy").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    "change",
    [dict(pooling="max"), dict(layer="block2_pool"), dict(image_size=40), dict(flip=True), dict(image_size=[32, 40])],
)
@pytest.mark.slow
def test_changed_settings_never_reuse_stale_rows(dataset: Path, tmp_path: Path, change):
    out = tmp_path / "f"
    base = dict(layer="block3_pool")  # a 4x4 map at 32 px, so avg and max pooling differ; cheap to convert
    cnncodes.extract(dataset, out, fast_spec(**base), progress=False)
    before = np.load(out / "features.npy")
    result = cnncodes.extract(dataset, out, fast_spec(**(base | change)), progress=False)
    assert result.computed == result.n_images == 24 and result.reused == 0
    fresh = cnncodes.extract(dataset, tmp_path / "fresh", fast_spec(**(base | change)), progress=False)
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(fresh.out / "features.npy"))
    after = np.load(out / "features.npy")
    assert after.shape != before.shape or not np.allclose(after, before)


def test_the_check_cache_holds_the_files_there_are_not_every_version_of_them(dataset: Path, tmp_path: Path):
    import sqlite3

    out = tmp_path / "f"
    for _ in range(3):
        for path in dataset.rglob("*.*"):
            os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # a new identity
        cnncodes.extract(dataset, out, fast_spec(), progress=False)
    with sqlite3.connect(out / ".cache" / "checks.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM checks2").fetchone()[0] == 24


def test_another_duplicate_threshold_regroups_without_recomputing_codes(dataset: Path, tmp_path: Path):
    near = pattern("stripes", 100).astype(np.int16)  # stripes_00.jpg's pixels
    near[:4, :4] += 40  # a corner brighter: a few hash bits apart, not zero
    Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)).save(dataset / "stripes" / "near.png")
    out, same_subsets = tmp_path / "f", 5  # a seed at which both groupings give every image the same subset
    first = cnncodes.extract(dataset, out, fast_spec(), progress=False, seed=same_subsets)
    assert len(np.unique(np.load(out / "groups.npy"))) == 24  # 25 images, one pair grouped
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False, seed=same_subsets, dup_threshold=0)
    assert again.counts == first.counts
    assert not again.up_to_date and again.computed == 0
    assert len(np.unique(np.load(out / "groups.npy"))) == 25
    assert json.loads((out / "meta.json").read_text())["split"]["dup_threshold"] == 0


def test_added_images_are_the_only_ones_computed_and_keep_old_subsets(dataset: Path, tmp_path: Path):
    out = tmp_path / "f"
    cnncodes.extract(dataset, out, fast_spec(), progress=False)
    old = load_features(out)
    old_rows = dict(zip(old.paths, np.array(old.X)))  # a copy: the next extract replaces the file
    for i in range(3):
        write_image(dataset / "stripes" / f"new_{i}.png", "stripes", seed=900 + i)
    said = cli("extract", dataset, "--out", out, *FAST_ARGS[:-1])
    assert said.exit_code == 0, said.output
    # the time is the features' whole extraction (meta.json's elapsed_seconds), which the line says
    assert "27 codes" in said.stdout and "3 computed, 24 reused (" in said.stdout
    assert (
        " s of extraction, earlier runs included; " in said.stdout and "images/s while computing codes)" in said.stdout
    )
    new = load_features(out)
    subsets = dict(zip(new.paths, new.subsets))
    assert all(subsets[p] == s for p, s in zip(old.paths, old.subsets))
    features = dict(zip(new.paths, new.X))
    for path, row in old_rows.items():
        np.testing.assert_array_equal(features[path], row)


def stop_after(rows: int, pause: float = 0.0):
    """An `on_batch` hook that stops the run like Ctrl-C once `rows` codes are stored."""

    def hook(done: int, _total: int) -> None:
        if done >= rows:
            time.sleep(pause)
            raise KeyboardInterrupt

    return hook


def test_a_file_that_failed_while_its_code_was_computed_is_tried_again(dataset: Path, tmp_path: Path, monkeypatch):
    """A read error after the check (an object store's timeout, NFS) must not make the next run 'up to date'."""
    reading = importlib.import_module("cnncodes.codes.reading")
    decode, flaky = reading.decode, "squares/squares_03.png"

    def fails_once(path, *args, **kwargs):
        if str(path).endswith(flaky):
            return BadImage("read timed out", "unreadable")
        return decode(path, *args, **kwargs)

    monkeypatch.setattr(reading, "decode", fails_once)
    out = tmp_path / "f"
    first = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert first.n_images == 23 and flaky in (out / "rejected.csv").read_text()
    monkeypatch.undo()
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert not again.up_to_date and again.computed == 1 and again.reused == 23 and again.n_images == 24
    assert flaky in load_features(out).paths and flaky not in (out / "rejected.csv").read_text()


def test_interrupted_run_leaves_no_outputs_and_resumes_where_it_stopped(dataset: Path, tmp_path: Path):
    out = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4, on_batch=stop_after(8, pause=1.5))
    assert not (out / "features.npy").exists() and not (out / "meta.json").exists()

    resumed = cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4)
    assert resumed.computed == 24 - 8 and resumed.reused == 8
    assert resumed.seconds > 1.5  # the interrupted run's time is carried into meta.json
    assert json.loads((out / "meta.json").read_text())["elapsed_seconds"] == resumed.seconds
    clean = cnncodes.extract(dataset, tmp_path / "clean", fast_spec(), progress=False, batch_size=4)
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(clean.out / "features.npy"), rtol=1e-6)


def test_files_added_and_deleted_before_a_resume_keep_the_interrupted_runs_rows(dataset: Path, tmp_path: Path):
    out = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4, on_batch=stop_after(12))
    write_image(dataset / "circles" / "added.png", "circles", seed=950)
    (dataset / "squares" / "squares_07.png").unlink()  # a file the user removed before running again
    resumed = cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4)
    assert resumed.n_images == 24 and resumed.reused >= 11 and resumed.computed == 24 - resumed.reused
    assert not list((out / ".cache").glob("salvaged*"))
    clean = cnncodes.extract(dataset, tmp_path / "clean", fast_spec(), progress=False, batch_size=4)
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(clean.out / "features.npy"), rtol=1e-6)


HOLDER = """
import pathlib, sys, time
import cnncodes

def hold(done, total):
    if done >= 8:
        pathlib.Path(sys.argv[3]).touch()
        time.sleep(600)

spec = cnncodes.ExtractorSpec.create(backbone="vgg16", weights="none", image_size=32)
cnncodes.extract(sys.argv[1], sys.argv[2], spec, progress=False, batch_size=4, on_batch=hold)
"""


def test_a_second_extract_is_refused_while_another_process_writes_and_resumes_after_it_is_killed(dataset, tmp_path):
    out, holding = tmp_path / "f", tmp_path / "holding"
    # the ONNX conversion is cached before the holder starts
    cnncodes.extract(dataset, tmp_path / "warm", fast_spec(), progress=False)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(dataset), str(out), str(holding)])
    try:
        deadline = time.monotonic() + 120
        while not holding.exists() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert holding.exists(), "the holder never got to its eighth row"
        second = cli("extract", dataset, "--out", out, *FAST_ARGS)
        assert second.exit_code == 2 and "another cnncodes extract is writing to" in second.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    after = cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4)  # the lock died with its holder
    assert (after.computed, after.reused) == (16, 8)


def test_a_run_killed_while_publishing_reuses_every_row(dataset: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "f"

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Split, "write_csv", killed)  # dies after features.npy was replaced, before meta.json
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False)
    monkeypatch.undo()
    assert not (out / "meta.json").exists()
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert (again.computed, again.reused) == (0, 24)
    fresh = cnncodes.extract(dataset, tmp_path / "fresh", fast_spec(), progress=False)
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(fresh.out / "features.npy"))


@pytest.mark.parametrize("renames", [3, 4, 5])
def test_a_run_killed_at_any_rename_of_its_publish_reuses_every_row(dataset, tmp_path, monkeypatch, renames):
    """The publish renames the new rows' ids, their index, the codes and their ids and index again; kill at each."""
    extract_module = importlib.import_module("cnncodes.codes.extract")  # `cnncodes.extract` is the function
    out = tmp_path / "f"
    cnncodes.extract(dataset, out, fast_spec(), progress=False)
    write_image(dataset / "circles" / "added.png", "circles", seed=951)
    publish, replace, calls = extract_module.publish_folder, os.replace, []

    def publishing(*args, **kwargs):
        calls.append("publish")
        return publish(*args, **kwargs)

    def replace_or_die(*args):
        if calls:
            calls.append(args)
            if len(calls) > renames:
                raise KeyboardInterrupt
        replace(*args)

    monkeypatch.setattr(extract_module, "publish_folder", publishing)
    monkeypatch.setattr(os, "replace", replace_or_die)
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False)
    monkeypatch.undo()
    assert_the_next_run_ends_as_a_fresh_one(dataset, out, tmp_path / "fresh", computed=0, reused=25)


def assert_the_next_run_ends_as_a_fresh_one(dataset: Path, out: Path, fresh: Path, computed: int, reused: int):
    """The next run into `out` computes and reuses that many rows, and its codes are a fresh run's."""
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert (again.computed, again.reused) == (computed, reused)
    cnncodes.extract(dataset, fresh, fast_spec(), progress=False)
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(fresh / "features.npy"))


def copy_killed_after(monkeypatch, chunks: int) -> None:
    """Copies of earlier rows go 4 rows a chunk, each synced, and die like Ctrl-C after `chunks` of them."""
    storage = importlib.import_module("cnncodes.codes.store")
    read, done = storage.NpyRows.read, []

    def read_or_die(self, rows):
        done.append(rows)
        if len(done) > chunks:
            raise KeyboardInterrupt
        return read(self, rows)

    monkeypatch.setattr(storage, "CHUNK_ROWS", 4)
    monkeypatch.setattr(storage, "SYNC_EVERY", 0.0)
    monkeypatch.setattr(storage.NpyRows, "read", read_or_die)


def test_a_copy_of_earlier_rows_cut_short_goes_on_at_the_next_run(dataset: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "f"
    cnncodes.extract(dataset, out, fast_spec(), progress=False)
    write_image(dataset / "circles" / "added.png", "circles", seed=952)
    copy_killed_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False)
    monkeypatch.undo()
    assert_the_next_run_ends_as_a_fresh_one(dataset, out, tmp_path / "fresh", computed=1, reused=24)


def cut_short_copy_of_salvaged_rows(dataset: Path, out: Path, monkeypatch) -> None:
    """A run stopped after 12 rows, an image added, then the copy of those rows into the new run cut short."""
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4, on_batch=stop_after(12))
    write_image(dataset / "circles" / "added.png", "circles", seed=953)
    copy_killed_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4)
    monkeypatch.undo()


def test_a_copy_of_salvaged_rows_cut_short_goes_on_and_leaves_nothing_behind(dataset, tmp_path, monkeypatch):
    out = tmp_path / "f"
    cut_short_copy_of_salvaged_rows(dataset, out, monkeypatch)
    assert list((out / ".cache").glob("salvaged*"))  # what the cut copy had not taken yet
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4)
    assert again.reused >= 12 and again.computed == 25 - again.reused
    assert not list((out / ".cache").glob("salvaged*"))
    fresh = cnncodes.extract(dataset, tmp_path / "fresh", fast_spec(), progress=False, batch_size=4)
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(fresh.out / "features.npy"), rtol=1e-6)


def test_rows_set_aside_never_go_to_a_run_with_other_settings(dataset: Path, tmp_path: Path, monkeypatch):
    out = tmp_path / "f"
    cut_short_copy_of_salvaged_rows(dataset, out, monkeypatch)
    # the file ids match, the extractor does not
    flipped = cnncodes.extract(dataset, out, fast_spec(flip=True), progress=False)
    assert flipped.computed == 25
    assert not list((out / ".cache").glob("salvaged*"))  # dropped with the other settings' unfinished rows
    fresh = cnncodes.extract(dataset, tmp_path / "fresh", fast_spec(flip=True), progress=False)
    np.testing.assert_allclose(np.load(out / "features.npy"), np.load(fresh.out / "features.npy"), rtol=1e-6)


def test_the_time_of_rows_copied_survives_a_later_kill(dataset: Path, tmp_path: Path):
    out = tmp_path / "f"
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4, on_batch=stop_after(12, pause=1.5))
    write_image(dataset / "circles" / "added.png", "circles", seed=955)
    with pytest.raises(KeyboardInterrupt):  # copies the rows set aside above, then stops
        cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4, on_batch=stop_after(16))
    done = cnncodes.extract(dataset, out, fast_spec(), progress=False, batch_size=4)
    assert done.reused >= 16 and done.seconds > 1.5  # the first run's time is in the codes it made


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))  # the SQLite cache fits, the codes do not
from cnncodes.cli.main import app
from cnncodes.codes.features import load_features
app(sys.argv[1:])
"""


def test_a_full_disk_is_one_error_line_and_the_same_command_completes_with_space(dataset, tmp_path, monkeypatch):
    out = tmp_path / "f"
    # the ONNX conversion is cached before space runs out
    cnncodes.extract(dataset, tmp_path / "warm", fast_spec(), progress=False)
    args = ["extract", str(dataset), "--out", str(out), *FAST_ARGS]
    full = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert full.returncode == 2, full.stderr
    message = full.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in message
    assert f"not enough space in {out / '.cache'}" in message and "49.2 KB needed" in message

    def no_checking(*_a, **_k):
        raise AssertionError("the files were checked by the run that stopped: that work is kept")

    monkeypatch.setattr(importlib.import_module("cnncodes.codes.engines.local"), "check_file", no_checking)
    completed = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert completed.computed == 24
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(tmp_path / "warm" / "features.npy"))


def test_groups_file_gives_near_duplicates_one_id(dataset: Path, tmp_path: Path):
    original = dataset / "stripes" / "stripes_03.png"
    Image.open(original).save(dataset / "stripes" / "copy.bmp")
    result = cnncodes.extract(dataset, tmp_path / "f", fast_spec(), progress=False)
    groups = np.load(result.out / "groups.npy")
    paths = load_features(result.out).paths
    assert groups.dtype == np.int64 and groups.shape == (25,)
    assert groups[paths.index("stripes/copy.bmp")] == groups[paths.index("stripes/stripes_03.png")]
    assert len(set(groups.tolist())) == 24


def test_an_image_replaced_in_place_with_size_and_mtime_kept_is_computed_again(dataset: Path, tmp_path: Path):
    target = dataset / "squares" / "picture.bmp"
    write_image(target, "squares", seed=1)
    out = tmp_path / "f"
    cnncodes.extract(dataset, out, fast_spec(), progress=False)
    stat = target.stat()
    Image.fromarray(np.ascontiguousarray(np.asarray(Image.open(target))[::-1])).save(target)  # same size, new pixels
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    again = cnncodes.extract(dataset, out, fast_spec(), progress=False)
    assert (again.computed, again.reused) == (1, 24)


def test_dup_threshold_out_of_range_is_one_line_and_cross_class_copies_are_warned(dataset: Path, tmp_path: Path):
    refused = cli("extract", dataset, "--out", tmp_path / "f", *FAST_ARGS, "--dup-threshold", "64")
    assert refused.exit_code == 2 and "--dup-threshold must be between 0 and 16" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    shutil.copy(dataset / "stripes" / "stripes_01.png", dataset / "circles" / "also_circles.png")
    warned = cli("extract", dataset, "--out", tmp_path / "f", *FAST_ARGS)
    assert warned.exit_code == 0, warned.output
    assert "1 duplicate group(s) hold images of different classes, e.g. circles/also_circles.png" in warned.stderr


def test_untrained_weights_are_reproducible(dataset: Path, tmp_path: Path):
    a = cnncodes.extract(dataset, tmp_path / "a", fast_spec(), progress=False)
    b = cnncodes.extract(dataset, tmp_path / "b", fast_spec(), progress=False)
    np.testing.assert_array_equal(np.load(a.out / "features.npy"), np.load(b.out / "features.npy"))


def test_csv_input(dataset: Path, tmp_path: Path):
    listing = tmp_path / "list.csv"
    paths = sorted(dataset.rglob("*.png"))
    listing.write_text(
        "path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in paths) + "gone.png,circles\nno_label.png,\n"
    )
    result = cnncodes.extract(listing, tmp_path / "f", fast_spec(), progress=False)
    assert result.n_images == len(paths) and result.classes == ["circles", "squares", "stripes"]
    rejected = {r["path"]: (r["reason"], r["category"]) for r in read_csv(result.out / "rejected.csv")}
    assert rejected == {
        "gone.png": ("file not found", "missing"),
        "no_label.png": (f"line {len(paths) + 3}: no label", "bad row"),
    }


def test_a_csv_mixing_uris_and_local_paths_is_refused(tmp_path: Path):
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\ns3://bucket/a.png,a\nb.png,b\n")
    with pytest.raises(cnncodes.CnnCodesError, match="lists URIs and local paths together"):
        cnncodes.extract(listing, tmp_path / "f", fast_spec(), progress=False)


def test_layer_pooling_choices_shape_the_codes(dataset: Path, tmp_path: Path):
    flat = cnncodes.extract(
        dataset, tmp_path / "flat", fast_spec(layer="block3_pool", pooling="flatten"), progress=False
    )
    assert flat.dim == 4 * 4 * 256
    best = cnncodes.extract(dataset, tmp_path / "mx", fast_spec(layer="block3_conv1", pooling="max"), progress=False)
    assert best.dim == 256


@pytest.fixture
def vgg16_weights_file(vgg16_weights: Path, tmp_path: Path) -> Path:
    """A VGG16 no-top weights file under Keras's canonical name, with weights unlike the untrained ones."""
    (tmp_path / "w").mkdir()
    return Path(shutil.copy(vgg16_weights, tmp_path / "w" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"))


@pytest.fixture
def mobilenet_weights_file(tmp_path: Path) -> Path:
    """A MobileNetV2 no-top weights file under Keras's canonical name (Keras publishes no hash for it)."""
    import keras

    keras.utils.set_random_seed(123)
    model = keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3))
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    return save_legacy_h5_weights(model, tmp_path / "w" / name)


@pytest.mark.slow
def test_imagenet_weights_resolve_env_dir_then_keras_cache(dataset, tmp_path, mobilenet_weights_file, monkeypatch):
    keras_home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(mobilenet_weights_file.parent))
    imagenet = dict(backbone="mobilenetv2", weights="imagenet")
    from_env = cnncodes.extract(dataset, tmp_path / "env", fast_spec(**imagenet), runtime="keras", progress=False)
    meta = json.loads((from_env.out / "meta.json").read_text())
    assert meta["extractor"]["weights_sha256"] == sha256_file(mobilenet_weights_file)
    assert meta["extractor"]["weights_file"] == str(mobilenet_weights_file)

    cache_copy = keras_home / "models" / mobilenet_weights_file.name
    cache_copy.parent.mkdir(parents=True)
    shutil.move(mobilenet_weights_file, cache_copy)
    from_cache = cnncodes.extract(dataset, tmp_path / "cache", fast_spec(**imagenet), runtime="keras", progress=False)
    assert json.loads((from_cache.out / "meta.json").read_text())["extractor"]["weights_sha256"] == sha256_file(
        cache_copy
    )
    np.testing.assert_array_equal(np.load(from_env.out / "features.npy"), np.load(from_cache.out / "features.npy"))
    untrained = cnncodes.extract(
        dataset, tmp_path / "none", fast_spec(backbone="mobilenetv2"), runtime="keras", progress=False
    )
    # untrained MobileNetV2 codes are tiny (around 1e-12): compare them relatively
    assert not np.allclose(
        np.load(untrained.out / "features.npy"), np.load(from_cache.out / "features.npy"), rtol=1e-2, atol=0
    )

    by_path = cli(
        "extract",
        dataset,
        "--out",
        tmp_path / "path",
        "--backbone",
        "mobilenetv2",
        "--image-size",
        "32",
        "--runtime",
        "keras",
        "--weights",
        cache_copy,
        "--quiet",
    )
    assert by_path.exit_code == 0, by_path.output
    np.testing.assert_array_equal(np.load(tmp_path / "path" / "features.npy"), np.load(from_cache.out / "features.npy"))


def test_a_canonical_file_that_is_not_kerass_is_refused_unless_given_by_path(
    dataset, tmp_path, vgg16_weights_file, monkeypatch
):
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(vgg16_weights_file.parent))
    refused = cli("extract", dataset, "--out", tmp_path / "f", "--backbone", "vgg16", "--image-size", "32", "--quiet")
    assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "not the file Keras publishes" in refused.stderr and f"--weights {vgg16_weights_file}" in refused.stderr
    by_path = cli(
        "extract",
        dataset,
        "--out",
        tmp_path / "f",
        "--backbone",
        "vgg16",
        "--image-size",
        "32",
        "--weights",
        vgg16_weights_file,
        "--quiet",
    )
    assert by_path.exit_code == 0, by_path.output


def test_offline_without_weights_is_one_clear_error(dataset, tmp_path, monkeypatch):
    import keras

    def offline(*_a, **_k):
        raise Exception("URL fetch failure: Name or service not known")

    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setenv("CNNCODES_WEIGHTS_DIR", str(tmp_path / "empty"))
    result = cli("extract", dataset, "--out", tmp_path / "f", "--backbone", "resnet50", "--quiet")
    assert result.exit_code == 2
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and "Traceback" not in result.output
    for needed in (
        "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        "CNNCODES_WEIGHTS_DIR",
        "--weights PATH",
        "--weights none",
        os.environ["KERAS_HOME"],
    ):
        assert needed in message, needed
    assert not (tmp_path / "f" / "features.npy").exists()


def test_weights_file_that_does_not_fit_is_a_clear_error(dataset, tmp_path, vgg16_weights_file):
    result = cli(
        "extract",
        dataset,
        "--out",
        tmp_path / "f",
        "--backbone",
        "resnet50",
        "--image-size",
        "32",
        "--weights",
        vgg16_weights_file,
        "--quiet",
    )
    assert result.exit_code == 2 and "does not fit resnet50" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--layer", "no_such_layer"], "has no layer 'no_such_layer'"),
        (["--image-size", "16"], "at least 32 px"),
        (["--split", "0.5,0.6,0.1"], "sum to 1"),
        (["--weights", "/no/such/file.h5"], "no such file"),
        (["--layer", "fc1"], "224 px"),
        (["--flip", "--pooling", "flatten"], "averaging an image's codes (--flip) only makes sense"),
        (["--image-size", "32,48", "--pooling", "flatten"], "codes (several --image-size) only makes sense"),
        (["--image-size", "32,big"], "--image-size takes sizes in pixels, e.g. 224 or 224,288,384"),
        (["--image-size", "48,16"], "at least 32 px"),
        (["--image-size", "100000"], "--image-size 100000 is over 2048 px"),
        (["--engine", "ray", "--runtime", "keras"], "--engine ray runs the network on ONNX Runtime"),
        (["--engine", "ray", "--address", "127.0.0.1:1"], "cannot reach the Ray cluster at 127.0.0.1:1"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(dataset, tmp_path, args, message):
    base = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--quiet"]
    result = cli("extract", dataset, "--out", tmp_path / "f", *base, *args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output


def test_unknown_backbone_is_refused_by_the_cli(dataset, tmp_path):
    result = cli("extract", dataset, "--out", tmp_path / "f", "--backbone", "alexnet")
    assert result.exit_code == 2 and "alexnet" in result.output


@pytest.mark.parametrize("layout", ["missing", "no_classes", "class_of_bad_files", "all_bad"])
def test_unusable_input_stops_before_heavy_work(tmp_path, monkeypatch, layout):
    data = tmp_path / "data"
    if layout == "no_classes":
        write_image(data / "loose.png")
    elif layout == "class_of_bad_files":
        write_image(data / "good" / "a.png")
        (data / "bad").mkdir()
        (data / "bad" / "x.jpg").write_bytes(b"\xff\xd8\xff garbage")
    elif layout == "all_bad":
        (data / "a").mkdir(parents=True)
        (data / "a" / "x.png").write_bytes(b"")

    def no_network(*_a, **_k):
        raise AssertionError("no network may be built for unusable input")

    monkeypatch.setattr(cnncodes.ExtractorSpec, "build", no_network)
    result = cli("extract", data, "--out", tmp_path / "f", *FAST_ARGS)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error:") and "Traceback" not in result.output
    if layout in ("missing", "no_classes"):  # found out before any file is written
        assert not (tmp_path / "f").exists()


@pytest.mark.slow
def test_backbones_and_layers_commands():
    listing = cli("backbones")
    assert listing.exit_code == 0
    for name in ("vgg16", "resnet50", "mobilenetv2", "efficientnetb0", "vgg19", "inceptionv3", "xception"):
        assert name in listing.stdout
    layers = cli("layers", "vgg16", "--image-size", "32")
    assert layers.exit_code == 0 and "block5_pool" in layers.stdout and "block3_conv2" in layers.stdout
    assert "fc1" not in layers.stdout  # the classifier top takes 224 px only
    at_224 = cli("layers", "vgg16")
    assert at_224.exit_code == 0 and "fc1" in at_224.stdout and "fc2" in at_224.stdout


def test_mobilenetv2_averages_three_sizes_by_default_where_codes_can_be_averaged():
    def sizes(**choices) -> tuple[int, list[int] | None]:
        spec = cnncodes.ExtractorSpec.create(weights="none", **choices)
        return spec.image_size, spec.scales

    assert sizes() == (384, [224, 288, 384])  # decoded at the largest, shrunk in the network for the others
    assert sizes(pooling="flatten") == (224, None)  # flattened maps of several sizes have several lengths
    assert sizes(image_size=160) == (160, None)
    assert sizes(backbone="vgg16") == (224, None)  # heavy networks keep one size
    with pytest.raises(cnncodes.CnnCodesError, match="multiples of 32 px only"):  # its padding follows the size
        sizes(image_size=[200, 240])
    assert "224,288,384" in cli("backbones").stdout


@needs_real_weights
def test_real_mobilenet_codes_group_flowers_by_class(tmp_path, monkeypatch):
    data = tmp_path / "flowers"
    for name in ("Sunflower", "Bluebell", "Pansy"):
        for src in sorted((FLOWERS / name).glob("*.jpg"))[:6]:
            (data / name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, data / name / src.name)
    spec = cnncodes.ExtractorSpec.create(backbone="mobilenetv2", image_size=128)
    result = cnncodes.extract(data, tmp_path / "f", spec, progress=False)
    codes = np.load(result.out / "features.npy")
    labels = np.load(result.out / "labels.npy")
    unit = codes / np.linalg.norm(codes, axis=1, keepdims=True)
    distance = 1 - unit @ unit.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert distance[same & off_diagonal].mean() < 0.8 * distance[~same].mean()
    nearest = np.where(off_diagonal, distance, np.inf).argmin(axis=1)
    assert (labels[nearest] == labels).mean() >= 0.9


@pytest.mark.slow
def test_run_killed_while_publishing_never_lends_its_rows_to_other_settings(dataset, tmp_path, monkeypatch):
    out = tmp_path / "f"
    cnncodes.extract(dataset, out, fast_spec(layer="block4_pool"), progress=False)

    def killed(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Split, "write_csv", killed)  # dies after features.npy was replaced
    with pytest.raises(KeyboardInterrupt):
        cnncodes.extract(dataset, out, fast_spec(layer="block4_pool", pooling="max"), progress=False)
    monkeypatch.undo()
    again = cnncodes.extract(dataset, out, fast_spec(layer="block4_pool"), progress=False)
    fresh = cnncodes.extract(dataset, tmp_path / "fresh", fast_spec(layer="block4_pool"), progress=False)
    assert again.computed == 24
    np.testing.assert_array_equal(np.load(out / "features.npy"), np.load(fresh.out / "features.npy"))


def test_paths_with_brackets_and_unwritable_outputs_are_one_line_errors(dataset, tmp_path):
    odd = tmp_path / "data[/tmp]"
    result = cli("extract", odd, "--out", tmp_path / "f", *FAST_ARGS)
    assert result.exit_code == 2 and "data[/tmp]" in result.stderr and "Traceback" not in result.output
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = cli("extract", dataset, "--out", a_file, *FAST_ARGS)
    assert result.exit_code == 2 and result.stderr.startswith("Error:") and "Traceback" not in result.output


def test_file_ids_read_as_the_id_strings_and_hash_and_dump_as_their_json(tmp_path: Path):
    """FileIds keeps numbers, not strings; every reader sees the same ids, keys and rows.json text as with a list."""
    from cnncodes.core import files as artifacts

    write_image(tmp_path / "a" / "x.png")
    write_image(tmp_path / "a" / "ü y.png")
    dataset = Dataset(tmp_path, ["a/x.png", "a/ü y.png", "a/gone.png"], ["a", "a", "a"])
    ids = file_ids(dataset)
    st = (tmp_path / "a" / "x.png").stat()
    expected = [f"a/x.png|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}", ids[1], "a/gone.png|missing"]
    assert list(ids) == expected and ids[1].startswith("a/ü y.png|") and ids[0:2] == expected[:2]
    for obj in (["key", ids, ["a"] * 3, {"n": [1.5, None, True]}], {"file_ids": ids, "seconds": 2.0}):
        plain = json.loads(json.dumps(obj, default=list))
        assert artifacts.sha256_json(obj) == hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()
        assert "".join(artifacts.json_pieces(obj, (",", ":"))) == json.dumps(plain, separators=(",", ":"))


def test_out_inside_the_image_folder_or_on_a_file_is_refused_before_anything_is_written(dataset: Path, tmp_path: Path):
    for out, words in ((dataset / "features", "is inside DATA"), (dataset / "stripes" / "f", "is inside DATA")):
        result = cli("extract", dataset, "--out", out, *FAST_ARGS)
        assert result.exit_code == 2 and words in result.stderr and not out.exists(), result.output
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    result = cli("extract", dataset, "--out", a_file, *FAST_ARGS)
    assert result.exit_code == 2 and "is a file: give a folder" in result.stderr, result.output


def test_a_folder_whose_row_index_lists_file_ids_keeps_its_rows_when_files_are_added(dataset: Path, tmp_path: Path):
    """Folders published before rows-ids.npy (a JSON list of every file id) still give their rows to the next run."""
    data = tmp_path / "copy"
    shutil.copytree(dataset, data)
    out = tmp_path / "f"
    cnncodes.extract(data, out, fast_spec(), progress=False)
    before = load_features(out)
    cache = out / ".cache"
    index = json.loads((cache / "rows.json").read_text())
    ids = file_ids(Dataset(data, before.paths, [before.classes[i] for i in before.y]))
    (cache / "rows.json").write_text(json.dumps({**index, "file_ids": list(ids)}))
    (cache / "rows-ids.npy").unlink()
    write_image(data / "squares" / "new.png", "squares", seed=77)
    again = cnncodes.extract(data, out, fast_spec(), progress=False)
    assert (again.computed, again.reused) == (1, 24)
    after = load_features(out)
    rows = {p: i for i, p in enumerate(after.paths)}
    np.testing.assert_array_equal(after.X[[rows[p] for p in before.paths]], before.X)
    assert not (json.loads((cache / "rows.json").read_text())).get("file_ids")  # the index is small again


def test_a_library_argument_of_the_wrong_type_is_refused_not_taken_as_true(dataset: Path, tmp_path: Path):
    out = tmp_path / "f"
    with pytest.raises(cnncodes.CnnCodesError, match="flip must be True or False"):
        fast_spec(flip="no")
    for wrong, words in (
        ({"seed": "1"}, "seed must be an integer"),
        ({"spec": "vgg16"}, "spec must be ExtractorSpec or None"),  # the choices go to ExtractorSpec.create
    ):
        with pytest.raises(cnncodes.CnnCodesError, match=words):
            cnncodes.extract(dataset, out, **({"spec": fast_spec(), "progress": False} | wrong))
    assert not out.exists()


def test_loading_codes_never_imports_the_extraction_stack():
    """`fit-svm` and `load_features` read a features folder with its file names and its spec alone."""
    code = "import sys, cnncodes.codes.features; print(sorted(m for m in sys.modules if m.startswith('cnncodes.')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.strip()
    assert "cnncodes.codes.spec" in loaded and "cnncodes.codes.layout" in loaded
    for module in ("cnncodes.codes.extract", "cnncodes.codes.plan", "cnncodes.codes.resume", "cnncodes.codes.engines"):
        assert f"'{module}" not in loaded, loaded


def test_other_split_settings_that_split_the_folder_again_are_named_in_a_warning(dataset: Path, tmp_path: Path):
    out = tmp_path / "f"
    assert cli("extract", dataset, "--out", out, *FAST_ARGS, "--dup-threshold", "6").exit_code == 0
    same = cli("extract", dataset, "--out", out, *FAST_ARGS, "--dup-threshold", "6")
    assert same.exit_code == 0 and "split again" not in same.stderr
    again = cli("extract", dataset, "--out", out, *FAST_ARGS, "--seed", "1", "--split", "0.6,0.2,0.2")
    said = " ".join(again.stderr.split())
    assert again.exit_code == 0 and f"{out} is split again (" in said
    assert "--split 0.7,0.15,0.15 before, 0.6,0.2,0.2 now; --seed 0 before, 1 now" in said
    assert "--dup-threshold 6 before, 4 now" in said  # the default changed between versions
