"""Images in an object store: `extract s3://bucket/prefix` against moto's S3 server on a free loopback port.

The same class-folder rules and the same codes, split and rejections as for the same
files on a local disk; a CSV of URIs works too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

import cnncodes
from cnncodes.cli.main import app
from cnncodes.codes.features import load_features
from cnncodes.core.errors import CnnCodesError
from cnncodes.data import remote

from .helpers import FAST_ARGS, fast_spec, runner


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_extract_from_an_s3_prefix_equals_extract_from_the_same_files_on_disk(s3_data, tmp_path):
    uri, local = s3_data
    result = runner.invoke(app, ["extract", uri, "--out", str(tmp_path / "s3"), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    on_disk = cnncodes.extract(local, tmp_path / "disk", fast_spec(), progress=False)
    np.testing.assert_allclose(
        np.load(tmp_path / "s3" / "features.npy"), np.load(on_disk.out / "features.npy"), rtol=1e-6
    )
    for name in ("split.csv", "rejected.csv"):
        assert read(tmp_path / "s3" / name) == read(on_disk.out / name)
    assert [r["path"] for r in read(tmp_path / "s3" / "rejected.csv")] == ["squares/broken.png"]
    again = cnncodes.extract(uri, tmp_path / "s3", fast_spec(), progress=False)
    assert again.up_to_date


def test_an_object_the_store_failed_to_serve_is_checked_again_on_the_next_run(s3_data, tmp_path, monkeypatch):
    uri, _ = s3_data
    read_bytes, flaky = remote.read_bytes, f"{uri}/stripes/stripes_01.png"

    def slow_down_once(path):
        if path == flaky:
            raise CnnCodesError(f"cannot read {path}: AWS Error SLOW_DOWN")
        return read_bytes(path)

    monkeypatch.setattr(remote, "read_bytes", slow_down_once)
    first = cnncodes.extract(uri, tmp_path / "f", fast_spec(), progress=False)
    assert any(p.endswith("stripes_01.png") for p, *_ in first.rejected)
    monkeypatch.setattr(remote, "read_bytes", read_bytes)
    again = cnncodes.extract(uri, tmp_path / "f", fast_spec(), progress=False)
    assert again.n_images == first.n_images + 1 and again.computed == 1
    assert not any(p.endswith("stripes_01.png") for p, *_ in again.rejected)


def test_every_object_under_the_prefix_is_a_row_or_a_rejection_whatever_its_name(s3_data, tmp_path):
    uri, local = s3_data
    extra = {
        "stripes/noext": (local / "stripes" / "stripes_01.png").read_bytes(),  # an image, by its bytes
        "stripes/notes.txt": b"notes",
        "squares/.hidden.png": (local / "squares" / "squares_01.png").read_bytes(),
        "stray.png": (local / "squares" / "squares_01.png").read_bytes(),
    }
    upload(uri, extra)
    result = cnncodes.extract(uri, tmp_path / "f", fast_spec(), progress=False)
    rows, rejected = set(load_features(tmp_path / "f").paths), {p for p, *_ in result.rejected}
    assert "stripes/noext" in rows and {"stripes/notes.txt", "squares/.hidden.png", "stray.png"} <= rejected
    assert len(rows) + len(rejected) == 3 * 6 + 1 + len(extra)  # the dataset, its broken file, the objects above


def upload(uri: str, objects: dict[str, bytes]) -> None:
    """Objects written under the prefix `uri`, by key."""
    bucket_path = uri.removeprefix("s3://")
    fs = remote.bucket_filesystem("s3", bucket_path.split("/")[0], remote.os.environ["AWS_ENDPOINT_URL"])
    for key, data in objects.items():
        with fs.open_output_stream(f"{bucket_path}/{key}") as f:
            f.write(data)


def test_keys_with_hash_or_question_marks_are_read_as_listed(s3_data, tmp_path):
    uri, local = s3_data
    stripe, square = (local / c / f"{c}_01.png" for c in ("stripes", "squares"))
    # `squares/shot` would be read for `squares/shot#2.png` if the key were parsed as a URL with a fragment
    upload(uri, {"squares/shot#2.png": stripe.read_bytes(), "squares/shot": square.read_bytes()})
    upload(uri, {"squares/a?x=1.png": stripe.read_bytes()})
    result = cnncodes.extract(uri, tmp_path / "f", fast_spec(), progress=False)
    feats = load_features(tmp_path / "f")
    assert [p for p, *_ in result.rejected] == ["squares/broken.png"]
    code = dict(zip(feats.paths, feats.X))
    np.testing.assert_allclose(code["squares/shot#2.png"], code["stripes/stripes_01.png"], rtol=1e-6)
    np.testing.assert_allclose(code["squares/a?x=1.png"], code["stripes/stripes_01.png"], rtol=1e-6)
    np.testing.assert_allclose(code["squares/shot"], code["squares/squares_01.png"], rtol=1e-6)
    shouted = cnncodes.extract(
        uri.replace("s3://", "S3://"), tmp_path / "g", fast_spec(), progress=False
    )  # schemes know no case
    assert shouted.n_images == result.n_images


def test_malformed_or_missing_uris_in_a_csv_are_rejected_rows(s3_data, tmp_path):
    uri, local = s3_data
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png") if p.name != "broken.png")
    bucket = uri.removeprefix("s3://").split("/")[0]
    bad = [f"s3://{bucket}//data/{files[0]}", f"s3:///{files[0]}", f"{uri}/squares/gone.png"]
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,label\n" + "".join(f"{p},{p.split('/')[-2]}\n" for p in [*bad, *(f"{uri}/{r}" for r in files)])
    )
    result = runner.invoke(app, ["extract", str(listing), "--out", str(tmp_path / "f"), *FAST_ARGS])
    assert result.exit_code == 0, result.output
    rejected = {r["path"]: r["category"] for r in read(tmp_path / "f" / "rejected.csv")}
    assert rejected == dict.fromkeys(bad[:2], "unreadable") | {bad[2]: "missing"}  # as a missing file on disk
    assert len(load_features(tmp_path / "f").paths) == len(files)


def test_extract_from_a_csv_of_uris_in_the_bucket(s3_data, tmp_path):
    import pyarrow.fs

    uri, local = s3_data
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png"))
    listing = "path,label\n" + "".join(f"{uri}/{rel},{rel.split('/')[0]}\n" for rel in files) + "x.png,\n"
    bucket_path = uri.removeprefix("s3://").rsplit("/", 1)[0]
    fs = remote.bucket_filesystem("s3", bucket_path, remote.os.environ["AWS_ENDPOINT_URL"])
    with fs.open_output_stream(f"{bucket_path}/list.csv") as f:
        f.write(listing.encode())
    assert isinstance(fs, pyarrow.fs.S3FileSystem)
    result = cnncodes.extract(f"s3://{bucket_path}/list.csv", tmp_path / "f", fast_spec(), progress=False)
    assert result.n_images == len(files) - 1
    assert sorted(p for p, *_ in result.rejected) == sorted([f"{uri}/squares/broken.png", "x.png"])  # and a bad row
    (tmp_path / "list.csv").write_text(listing)  # the same list of URIs, on this machine
    local = cnncodes.extract(tmp_path / "list.csv", tmp_path / "g", fast_spec(), progress=False)
    assert local.n_images == result.n_images and sorted(local.rejected) == sorted(result.rejected)


def test_a_missing_bucket_is_one_clear_error(s3_data, tmp_path):
    result = runner.invoke(
        app, ["extract", "s3://no-such-bucket-here/data", "--out", str(tmp_path / "f"), "--quiet", "--weights", "none"]
    )
    assert result.exit_code == 2 and "s3://no-such-bucket-here/data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_reports_mistakes_show_images_read_from_the_store(s3_data, tmp_path):
    uri, local = s3_data
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*.png") if p.name != "broken.png")
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{uri}/{f},{f.split('/')[0]}\n" for f in files))
    for data, name in ((uri, "prefix"), (tmp_path / "list.csv", "listed")):
        cnncodes.extract(data, tmp_path / name, fast_spec(), progress=False)
        models = tmp_path / f"{name}-models"
        cnncodes.fit_classifiers(tmp_path / name, out=models, classifiers="knn", cv=2, n_jobs=1, progress=False)
        (record_path,) = models.glob("*.json")
        record = json.loads(record_path.read_text())
        first = record["test_predictions"][0]  # one mistake to show
        first["predicted"] = next(c for c in record["classes"] if c != first["label"])
        record_path.write_text(json.dumps(record))
        report = runner.invoke(app, ["compare", str(models), "--html", str(tmp_path / f"{name}.html")])
        assert report.exit_code == 0 and "cannot be read" not in report.stderr, report.output
        assert "data:image/jpeg;base64," in (tmp_path / f"{name}.html").read_text()
