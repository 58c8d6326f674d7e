"""File names as users' disks hold them: not UTF-8, with line breaks, behind symbolic links."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cnncodes.cli.main import app
from cnncodes.codes.features import load_features
from cnncodes.core.errors import CnnCodesError
from cnncodes.data.split import read_split_csv

from .helpers import make_dataset, runner, write_image

ODD = (os.fsdecode(b"caf\xe9.png"), "carriage\rreturn.png", "new\nline.png", 'comma, "quote".png')


def test_odd_file_names_round_trip_and_every_file_is_a_row_or_a_rejection(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=4)
    for i, name in enumerate(ODD):
        write_image(data / "stripes" / name, "stripes", seed=700 + i)
    (data / "circles" / os.fsdecode(b"bad\xff.jpg")).write_bytes(b"not a jpeg")
    (data / "squares" / "readme.txt").write_text("notes")
    out = tmp_path / "features"
    result = runner.invoke(
        app,
        [
            "extract",
            str(data),
            "--out",
            str(out),
            "--backbone",
            "mobilenetv2",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    split = read_split_csv(out / "split.csv")
    assert split.paths == load_features(out).paths
    for name in ODD:
        assert f"stripes/{name}" in split.paths
    with open(out / "rejected.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        rejected = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert set(rejected) == {os.fsdecode(b"circles/bad\xff.jpg"), "squares/readme.txt"}
    on_disk = {p.relative_to(data).as_posix() for p in data.rglob("*") if p.is_file()}
    assert on_disk == set(split.paths) | set(rejected)
    assert np.load(out / "features.npy").shape[0] == len(split.paths)
    lines = (out / "split.csv").read_bytes().split(b"\n")
    assert b"\r\n" not in (out / "rejected.csv").read_bytes()  # "\n" line ends, as pandas writes them
    assert sum(line.endswith(b",test") for line in lines) == int((np.array(split.subsets) == "test").sum())


def test_a_class_folder_whose_name_is_not_utf8_reaches_the_report_and_compares_output(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=6)
    os.rename(data / "circles", data / os.fsdecode(b"caf\xe9 <b>"))
    features, models = tmp_path / "features", tmp_path / "models"
    small = ["--backbone", "mobilenetv2", "--weights", "none", "--image-size", "32", "--quiet"]
    assert runner.invoke(app, ["extract", str(data), "--out", str(features), *small]).exit_code == 0
    fit = runner.invoke(app, ["fit-svm", str(features), "--out", str(models), "--classifier", "logreg", "--quiet"])
    assert fit.exit_code == 0, fit.output
    page, listing = tmp_path / "report.html", tmp_path / "runs.json"
    result = runner.invoke(app, ["compare", str(models), "--html", str(page), "--format", "json", "-o", str(listing)])
    assert result.exit_code == 0, result.output
    assert "caf\ufffd &lt;b&gt;" in page.read_text(encoding="utf-8")  # shown, escaped, and the page is UTF-8
    assert os.fsdecode(b"caf\xe9 <b>") in json.loads(listing.read_text())[0]["classes"]  # as the disk has it


def test_a_listing_csv_may_name_files_that_are_not_utf8_but_must_itself_be_utf8(tmp_path: Path):
    from cnncodes.data.ingest import discover

    data = make_dataset(tmp_path / "data", per_class=3)
    odd = data / "stripes" / os.fsdecode(b"caf\xe9.png")
    write_image(odd, "stripes", seed=800)
    rows = [f"{p.relative_to(data).as_posix()},{p.parent.name}" for p in sorted(data.rglob("*.*"))]
    listing = data / "list.csv"
    listing.write_bytes("\n".join(["path,label", *rows, ""]).encode("utf-8", "surrogateescape"))
    assert os.fsdecode(b"stripes/caf\xe9.png") in discover(listing).paths
    listing.write_text("\n".join(["path,label", *rows[:3], ""]), encoding="utf-16")
    with pytest.raises(CnnCodesError, match="not a readable UTF-8 CSV"):
        discover(listing)
