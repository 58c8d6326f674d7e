"""Run records: published together with their model, never silently replaced by a run made otherwise."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cnncodes
from cnncodes.runs.records import build_record, load_records, publish_run, sidecar

from .helpers import cli, fast_spec, make_dataset, record_fields, write_image


@pytest.fixture(scope="module")
def codes(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("records")
    data = make_dataset(root / "data", per_class=8)
    cnncodes.extract(data, root / "features", fast_spec(), progress=False)
    return {"root": root, "data": data, "features": root / "features"}


def fit(features: Path, out: Path, *options):
    return cli(
        "fit-svm", features, "--out", out, "--classifier", "knn", "--cv", "2", "--n-jobs", "1", "--quiet", *options
    )


def test_a_run_made_with_other_settings_or_codes_is_refused_not_replaced(codes, tmp_path):
    out = tmp_path / "models"
    assert fit(codes["features"], out).exit_code == 0
    record = json.loads((out / "vgg16-block5_pool-knn.json").read_text())
    again = fit(codes["features"], out)
    assert again.exit_code == 0, again.output  # the same command replaces its own run

    for options, named in (
        (["--normalize", "l2"], "normalize"),
        (["--pca", "4"], "pca"),
        (["--class-weight", "balanced"], "class_weight"),
    ):
        refused = fit(codes["features"], out, *options)
        assert refused.exit_code == 2 and named in refused.stderr and "--name" in refused.stderr, refused.output
    assert fit(codes["features"], out, "--normalize", "l2", "--name", "l2").exit_code == 0
    for outside in ("../escaped", "a/b", ".hidden"):  # run files stay in --out, where compare finds them
        refused = fit(codes["features"], out, "--name", outside)
        assert refused.exit_code == 2 and "cannot be part of a file name" in refused.stderr, refused.output
    assert not (tmp_path / "escaped-vgg16-block5_pool-knn.json").exists() and not (out / "a").exists()
    fast = ["--backbone", "vgg16", "--weights", "none", "--image-size", "32"]
    finetuned = cli("finetune", codes["data"], "--out", tmp_path / "ft", "--name", "x/y", *fast)
    assert finetuned.exit_code == 2 and "cannot be part of a file name" in finetuned.stderr, finetuned.output

    moved = tmp_path / "features"
    shutil.copytree(codes["features"], moved)
    shared = tmp_path / "shared"
    assert fit(moved, shared).exit_code == 0
    assert fit(codes["features"], shared).exit_code == 0  # the same codes in another folder: the same run
    meta = json.loads((moved / "meta.json").read_text())  # the same folder, as if re-extracted with --resize pad
    meta["extractor"]["resize"] = "pad"
    (moved / "meta.json").write_text(json.dumps(meta))
    refused = fit(moved, shared)
    assert refused.exit_code == 2 and "extractor" in refused.stderr, refused.output
    other = tmp_path / "other-data"  # the same file names, labels and split; one image's pixels differ
    shutil.copytree(codes["data"], other)
    image = sorted(other.rglob("*.png"))[0]
    write_image(image, image.parent.name, seed=999, size=48)
    cnncodes.extract(other, tmp_path / "other-features", fast_spec(), progress=False)
    refused = fit(tmp_path / "other-features", shared)
    assert refused.exit_code == 2 and "codes_fingerprint" in refused.stderr, refused.output
    assert json.loads((out / "vgg16-block5_pool-knn.json").read_text())["model_sha256"] == record["model_sha256"]


def test_publish_moves_model_and_record_together_or_not_at_all(tmp_path):
    model = tmp_path / "run.joblib"
    first = publish_run(model, lambda tmp: tmp.write_bytes(b"old model"), build_record(**record_fields(run="run")))
    assert model.read_bytes() == b"old model"
    assert json.loads(sidecar(model).read_text())["model_sha256"] == first["model_sha256"]

    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half a mod")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"No space left on device: '{model}'"):  # the file the user knows
        publish_run(model, full_disk, build_record(**record_fields(run="run")))
    assert model.read_bytes() == b"old model"
    assert json.loads(sidecar(model).read_text())["model_sha256"] == first["model_sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.joblib", "run.json"]


def test_a_bundle_of_an_older_format_is_refused_in_one_line(tmp_path):
    import joblib

    from cnncodes.core.files import package_versions
    from cnncodes.runs.bundle import load_bundle

    model = tmp_path / "old.joblib"
    publish_run(
        model,
        lambda tmp: joblib.dump({"format": "cnncodes.bundle/1", "model": None}, tmp),
        build_record(**record_fields(run="old")) | {"versions": package_versions()},
    )
    with pytest.raises(cnncodes.CnnCodesError, match="another version of cnncodes"):
        load_bundle(model)
    record = json.loads(sidecar(model).read_text())
    sidecar(model).write_text(json.dumps(record | {"versions": {"numpy": "2.0"}}))
    with pytest.raises(cnncodes.CnnCodesError, match="does not say which scikit-learn made it"):
        load_bundle(model)  # a record without scikit-learn's version: one line, not a KeyError
    sidecar(model).write_text(json.dumps({k: v for k, v in record.items() if k != "versions"}))
    with pytest.raises(cnncodes.CnnCodesError, match="lacks versions"):
        load_bundle(model)


def test_a_full_disk_while_saving_a_run_is_one_line_naming_the_file(codes, tmp_path, monkeypatch):
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    result = fit(codes["features"], tmp_path / "m")
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"No space left on device: '{tmp_path / 'm' / 'vgg16-block5_pool-knn.json'}'" in message
    assert [p.name for p in (tmp_path / "m").iterdir()] == [".fit-svm.lock"]  # no temporary file left behind


def test_a_writer_killed_while_publishing_leaves_no_second_run_and_its_temporaries_go(codes, tmp_path):
    out = tmp_path / "models"
    assert fit(codes["features"], out).exit_code == 0
    (model,) = out.glob("*.joblib")
    killed_while_renaming = f"""
import json, os, pathlib
from cnncodes.runs.records import publish_run
model = pathlib.Path({str(model)!r})
record = json.loads(model.with_suffix(".json").read_text())
os.replace = lambda *args: os._exit(9)
publish_run(model, lambda tmp: tmp.write_bytes(model.read_bytes()), record)
"""
    writer = subprocess.Popen([sys.executable, "-c", killed_while_renaming])
    assert writer.wait() == 9
    orphans = [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".fit-svm.lock"]
    assert len(orphans) == 2  # the model's and the record's temporaries
    assert [r["run"] for r in load_records([out])] == [model.stem]
    elsewhere = out / f".{model.name}.00000000-{writer.pid}.0123abcd.tmp.joblib"  # that pid in another container
    elsewhere.write_bytes(b"being written")
    assert fit(codes["features"], out).exit_code == 0  # the same run again: its file names are written
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([elsewhere.name, ".fit-svm.lock", model.name, f"{model.stem}.json"])
