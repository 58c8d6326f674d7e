"""Folders that defend themselves: fit-svm runs published as pairs under a lock, features folders checked and repaired.

Two fit-svm runs never interleave in one folder, a run killed between its renames leaves the
old pair (which readers use and the next run restores), and a features folder cut short,
edited or missing a file is written again by `extract`, never called up to date.
"""

from __future__ import annotations

import errno
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

import cnncodes
from cnncodes.classify.fit import FIT_LOCK
from cnncodes.core.writes import human_bytes
from cnncodes.runs.bundle import load_record_for
from cnncodes.runs.records import previous_model, sidecar

from .helpers import CLASSES, cli, fast_spec, make_dataset

RUN = "vgg16-block5_pool-knn"
EXTRACT_ARGS = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32"]  # not --quiet: the counts
# A fit-svm in a child process, through the CLI, with `publish` standing in for the module's `publish_bundle`.
CHILD = """
import os, pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with Ctrl-C ignored
import cnncodes.classify.fit as fit
from cnncodes.cli.main import app
{setup}
app(sys.argv[1:], prog_name="cnncodes")
"""
# Holds the lock: publishes only once the file `go` exists, after making `holding`.
HOLD = """
holding, go = pathlib.Path(os.environ["HOLDING"]), pathlib.Path(os.environ["GO"])
publish = fit.publish_bundle
def held(*args, **kwargs):
    holding.touch()
    while not go.exists():
        time.sleep(0.05)
    return publish(*args, **kwargs)
fit.publish_bundle = held
"""
# Dies by SIGKILL at one step of the publish: a rename onto REPLACED, or removing UNLINKED.
KILL = """
replace, unlink = os.replace, pathlib.Path.unlink
def dead(path, at):
    if str(path) == os.environ.get(at):
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = lambda src, dst: (dead(dst, "REPLACED"), replace(src, dst))
pathlib.Path.unlink = lambda self, *a, **k: (dead(self, "UNLINKED"), unlink(self, *a, **k))
"""


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("defending")
    data = make_dataset(root / "data", per_class=8)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    return {"root": root, "data": data, "features": root / "features"}


def fit(features: Path, out: Path, *options: object):
    return cli("fit-svm", features, "--out", out, "--classifier", "knn", "--n-jobs", "1", "--quiet", *options)


def fit_in_child(features: Path, out: Path, setup: str, env: dict[str, str], *options: str) -> subprocess.Popen:
    args = ["fit-svm", str(features), "--out", str(out), "--classifier", "knn", "--n-jobs", "1", "--quiet", *options]
    code = CHILD.format(setup=setup)
    return subprocess.Popen([sys.executable, "-c", code, *args], env={**os.environ, **env})


def model_sha(out: Path) -> str:
    return json.loads(sidecar(out / f"{RUN}.joblib").read_text())["model_sha256"]


def test_a_second_fit_svm_into_the_same_folder_is_refused_while_the_first_runs(codes, tmp_path):
    out, holding, go = tmp_path / "models", tmp_path / "holding", tmp_path / "go"
    first = fit_in_child(
        codes["features"], out, HOLD, {"HOLDING": str(holding), "GO": str(go)}, "--normalize", "standard"
    )
    try:
        deadline = time.monotonic() + 120
        while not holding.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holding.exists(), "the first fit-svm never got to publishing"
        second = fit(codes["features"], out, "--normalize", "l2")
        assert second.exit_code == 2 and "Traceback" not in second.output, second.output
        assert len(second.stderr.strip().splitlines()) == 1
        assert f"another cnncodes fit-svm is writing to {out}" in " ".join(second.stderr.split())
        go.touch()
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
        first.wait()
    record = json.loads((out / f"{RUN}.json").read_text())
    assert record["origin"]["normalize"] == "standard" and (out / FIT_LOCK).exists()
    assert load_record_for(out / f"{RUN}.joblib")[0]["model_sha256"] == record["model_sha256"]
    after = fit(codes["features"], out, "--normalize", "l2")  # one after the other: refused, not replaced
    assert after.exit_code == 2 and "--name" in after.stderr, after.output
    assert json.loads((out / f"{RUN}.json").read_text()) == record


@pytest.mark.parametrize("step", ["aside", "model", "record", "forget"])
def test_a_publish_killed_at_any_step_leaves_one_pair_which_the_next_run_settles(codes, tmp_path, step):
    """The old model moves aside, the new one in, then its record (a reader's old pair until then); the old goes."""
    out = tmp_path / "models"
    assert fit(codes["features"], out, "--cv", "2").exit_code == 0
    old_sha = model_sha(out)
    model = out / f"{RUN}.joblib"
    at = {
        "aside": ("REPLACED", previous_model(model)),
        "model": ("REPLACED", model),
        "record": ("REPLACED", sidecar(model)),
        "forget": ("UNLINKED", previous_model(model)),
    }[step]
    killed = fit_in_child(codes["features"], out, KILL, {at[0]: str(at[1])}, "--cv", "3")  # a model of other bytes
    assert killed.wait(timeout=120) == -9
    record, data = load_record_for(model)  # what predict and serve load: a pair, whichever
    assert hashlib.sha256(data).hexdigest() == record["model_sha256"]
    assert record["params"]["cv"] == (3 if step == "forget" else 2)
    assert (record["model_sha256"] == old_sha) == (step != "forget")
    image = sorted((codes["data"] / CLASSES[0]).iterdir())[0]
    predicted = cli("predict", model, image)
    assert predicted.exit_code == 0, predicted.output
    compared = cli("compare", out)
    assert compared.exit_code == 0 and RUN in compared.stdout, compared.output

    again = fit(codes["features"], out, "--cv", "2")  # the next run settles the pair, then publishes its own
    assert again.exit_code == 0, again.output
    left = sorted(p.name for p in out.iterdir())
    assert left == [FIT_LOCK, f"{RUN}.joblib", f"{RUN}.json"]
    assert load_record_for(model)[0]["model_sha256"] == model_sha(out)


def test_the_first_publish_killed_before_its_record_leaves_no_run_and_the_next_run_clears_it(codes, tmp_path):
    out = tmp_path / "models"
    model = out / f"{RUN}.joblib"
    killed = fit_in_child(codes["features"], out, KILL, {"REPLACED": str(sidecar(model))})
    assert killed.wait(timeout=120) == -9
    assert model.exists() and not sidecar(model).exists()  # a model no record vouches for: never loaded
    assert cli("predict", model, codes["data"]).exit_code == 2
    assert fit(codes["features"], out).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [FIT_LOCK, f"{RUN}.joblib", f"{RUN}.json"]
    assert load_record_for(model)[0]["model_sha256"] == model_sha(out)


@pytest.fixture
def features(tmp_path, monkeypatch) -> dict[str, Path]:
    """A fresh features folder whose features.npy is digested in parts of 4 rows."""
    layout = importlib.import_module("cnncodes.codes.layout")
    monkeypatch.setattr(layout, "PART_BYTES", 4 * 512 * 4)
    data = make_dataset(tmp_path / "data", per_class=8)
    made = cli("extract", data, "--out", tmp_path / "features", *EXTRACT_ARGS, "--quiet")
    assert made.exit_code == 0, made.output
    return {"data": data, "features": tmp_path / "features", "fresh": tmp_path / "fresh"}


def extract_again(features: dict[str, Path]):
    result = cli("extract", features["data"], "--out", features["features"], *EXTRACT_ARGS)
    assert result.exit_code == 0, result.output
    return result


def assert_as_a_fresh_extraction(features: dict[str, Path]) -> None:
    fresh = cnncodes.extract(features["data"], features["fresh"], fast_spec(), progress=False)
    for name in ("features.npy", "labels.npy", "groups.npy", "split.csv"):
        assert (features["features"] / name).read_bytes() == (fresh.out / name).read_bytes(), name


def test_a_features_file_cut_short_or_edited_is_computed_again_from_its_intact_rows(features, tmp_path):
    codes = features["features"] / "features.npy"
    whole = codes.read_bytes()
    codes.write_bytes(whole[: len(whole) // 2])  # rows 0-10 whole: parts 0 and 1 (rows 0-7) intact
    refused = fit(features["features"], tmp_path / "m")
    assert refused.exit_code == 2 and "incomplete or damaged" in refused.stderr, refused.output
    result = extract_again(features)
    assert "16 computed, 8 reused" in " ".join(result.stdout.split()), result.output
    assert "features.npy changed" in result.stderr and "reusing the 8 intact rows" in " ".join(result.stderr.split())
    assert_as_a_fresh_extraction(features)

    data = bytearray(codes.read_bytes())
    data[-4:] = np.float32(123.0).tobytes()  # the last row's last number, the file's size kept
    codes.write_bytes(bytes(data))
    result = extract_again(features)
    assert "4 computed, 20 reused" in " ".join(result.stdout.split()), result.output
    assert_as_a_fresh_extraction(features)
    assert "up to date" in extract_again(features).stdout
    assert fit(features["features"], tmp_path / "m").exit_code == 0


def test_labels_or_a_split_row_changed_are_written_again_without_computing_a_code(features, tmp_path):
    labels = features["features"] / "labels.npy"
    np.save(labels, np.load(labels)[:-1])
    refused = fit(features["features"], tmp_path / "m")
    assert refused.exit_code == 2 and "run `cnncodes extract` again" in refused.stderr, refused.output
    result = extract_again(features)
    assert "0 computed, 24 reused" in " ".join(result.stdout.split()) and "labels.npy changed" in result.stderr

    split = features["features"] / "split.csv"
    rows = split.read_text().splitlines()
    moved = next(i for i, row in enumerate(rows) if row.endswith(",test"))
    rows[moved] = rows[moved][: -len("test")] + "train"  # a test image moved into training
    split.write_text("\n".join(rows) + "\n")
    refused = fit(features["features"], tmp_path / "m")
    assert refused.exit_code == 2 and "split.csv" in refused.stderr, refused.output
    tiny = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32", "--head-epochs", "1", "--quiet"]
    tuned = cli("finetune", features["data"], "--out", tmp_path / "ft", "--split-from", features["features"], *tiny)
    assert tuned.exit_code == 2 and "split.csv" in tuned.stderr and "extract" in tuned.stderr, tuned.output
    assert not (tmp_path / "ft" / "split.csv").exists()
    result = extract_again(features)
    assert "0 computed, 24 reused" in " ".join(result.stdout.split()) and "split.csv changed" in result.stderr
    assert_as_a_fresh_extraction(features)
    assert fit(features["features"], tmp_path / "m").exit_code == 0


def with_copies(data: Path) -> Path:
    """Two exact copies of three images of each class: duplicate groups k-NN would find across folds."""
    for kind in CLASSES:
        for i in range(3):
            for copy in ("a", "b"):
                shutil.copy(data / kind / f"{kind}_{2 * i + 1:02d}.png", data / kind / f"{kind}_{i}{copy}.png")
    return data


def test_a_folder_without_its_groups_file_is_refused_by_fit_svm_and_repaired_by_extract(tmp_path):
    data = with_copies(make_dataset(tmp_path / "data", per_class=8))
    features = {"data": data, "features": tmp_path / "features", "fresh": tmp_path / "fresh"}
    extract_again(features)
    meta = json.loads((features["features"] / "meta.json").read_text())
    assert meta["split"]["duplicate_groups"] == 9
    (features["features"] / "groups.npy").unlink()
    refused = fit(features["features"], tmp_path / "m")
    assert refused.exit_code == 2 and "groups.npy" in refused.stderr, refused.output
    assert len(refused.stderr.strip().splitlines()) == 1
    result = extract_again(features)
    assert "0 computed, 42 reused" in " ".join(result.stdout.split()) and "groups.npy changed" in result.stderr
    assert_as_a_fresh_extraction(features)
    assert fit(features["features"], tmp_path / "m").exit_code == 0


def test_a_folder_published_before_the_digests_is_checked_for_what_it_can_be(features, tmp_path):
    folder = features["features"]
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    assert "up to date" in extract_again(features).stdout  # nothing to say it changed: nothing redone
    (folder / "groups.npy").unlink()
    refused = fit(folder, tmp_path / "m")
    assert refused.exit_code == 2 and "groups.npy" in refused.stderr, refused.output
    result = extract_again(features)
    assert "0 computed, 24 reused" in " ".join(result.stdout.split()), result.output
    assert "its files do not belong together" in result.stderr
    assert json.loads((folder / "meta.json").read_text())["files"].keys() == meta["files"].keys()
    (folder / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "files"}))
    codes = folder / "features.npy"
    codes.write_bytes(codes.read_bytes()[:-4])
    result = extract_again(features)
    assert "24 computed, 0 reused" in " ".join(result.stdout.split()), result.output
    assert_as_a_fresh_extraction(features)


# The worker pool's shutdown made slow (as many workers are), EXITING made when it begins.
SLOW_EXIT = """
from joblib.externals.loky.process_executor import ProcessPoolExecutor
shutdown = ProcessPoolExecutor.shutdown
def slow(self, *args, **kwargs):
    pathlib.Path(os.environ["EXITING"]).touch()
    time.sleep(10)
    return shutdown(self, *args, **kwargs)
ProcessPoolExecutor.shutdown = slow
"""


def test_ctrl_c_while_fit_svm_stops_its_workers_exits_130_saying_what_was_saved(codes, tmp_path):
    out, exiting = tmp_path / "models", tmp_path / "exiting"
    args = ["fit-svm", str(codes["features"]), "--out", str(out), "--classifier", "knn", "--n-jobs", "2", "--quiet"]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(setup=SLOW_EXIT), *args],
        env={**os.environ, "EXITING": str(exiting)},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not exiting.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert exiting.exists(), "fit-svm ended without stopping its workers where Ctrl-C is handled"
        child.send_signal(signal.SIGINT)
        _, stderr = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 130, stderr
    assert "Exception ignored" not in stderr and "Traceback" not in stderr, stderr
    assert f"Interrupted: {RUN} saved in {out}" in " ".join(stderr.split())
    record, data = load_record_for(out / f"{RUN}.joblib")
    assert hashlib.sha256(data).hexdigest() == record["model_sha256"]


def one_line(result) -> str:
    """The one error line of a command that failed (progress lines aside), its wrapping undone."""
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = result.stderr[result.stderr.index("Error:") :]
    assert error.count("Error:") == 1 and "Warning:" not in error, result.stderr
    return " ".join(error.split())


def test_a_read_only_models_folder_is_named_not_its_lock(codes, tmp_path, monkeypatch):
    out = tmp_path / "models"
    out.mkdir()
    os_open = os.open

    def read_only(path, flags, *args, **kwargs):  # as on a read-only mount, where even root cannot write
        if Path(path).parent == out and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    said = one_line(fit(codes["features"], out))
    assert f"Read-only file system: '{out}'; make {out} writable, or write somewhere else" in said
    assert FIT_LOCK not in said


def test_a_rename_refused_in_a_read_only_folder_names_the_output_not_the_hidden_temporary(codes, tmp_path, monkeypatch):
    out = tmp_path / "models"
    replace = os.replace

    def read_only(src, dst):
        if not Path(dst).name.startswith("."):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), None, str(dst))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", read_only)
    said = one_line(fit(codes["features"], out))
    assert f"Read-only file system: '{out / RUN}.joblib'; make {out} writable" in said
    assert ".tmp" not in said
    monkeypatch.undo()
    assert fit(codes["features"], out).exit_code == 0  # the next run settles what was left


def test_a_full_disk_at_publish_names_the_output_and_the_space_it_needs(codes, tmp_path, monkeypatch):
    """NumPy's short write ("320 requested and 248 written") and a sync's bare ENOSPC, each one line."""
    out = tmp_path / "features"
    save = np.save

    def short_write(file, array, *args, **kwargs):
        if Path(getattr(file, "name", "")).name.startswith(".labels.npy."):
            raise OSError(f"{array.size} requested and {array.size // 2} written")
        save(file, array, *args, **kwargs)

    monkeypatch.setattr(np, "save", short_write)
    said = one_line(cli("extract", codes["data"], "--out", out, *EXTRACT_ARGS, "--quiet"))
    needed = human_bytes(24 * 8)  # a label per image, int64
    assert f"No space left on device: '{out / 'labels.npy'}' (at least {needed} needed); free some space in " in said
    assert "requested and" not in said and ".tmp" not in said
    assert not list(out.glob(".*.tmp*"))
    monkeypatch.undo()

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdatasync", no_space)
    said = one_line(cli("extract", codes["data"], "--out", tmp_path / "other", *EXTRACT_ARGS, "--quiet"))
    assert f"No space left on device: '{tmp_path / 'other' / '.cache'}" in said and "[Errno" not in said
    assert " KB needed); free some space in " in said  # the rows that were to be synced
    monkeypatch.undo()
    assert cli("extract", codes["data"], "--out", out, *EXTRACT_ARGS).exit_code == 0
    assert cnncodes.load_features(out).X.shape[0] == 24
