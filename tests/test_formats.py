"""Artifacts made by another version of cnncodes: refused in one line, never misread."""

from __future__ import annotations

import json

import pytest

import cnncodes
from cnncodes import CnnCodesError, ExtractorSpec
from cnncodes.cli.main import app
from cnncodes.codes.features import load_features

from .helpers import fast_spec, make_dataset, runner


def spec_dict() -> dict:
    return ExtractorSpec.create(backbone="vgg16", image_size=32, weights="none").to_dict()


def test_a_spec_records_its_format_and_one_from_another_version_is_refused():
    recorded = spec_dict()
    assert recorded["format"] == 1 and ExtractorSpec.from_dict(recorded).to_dict() == recorded
    assert ExtractorSpec.from_dict({k: v for k, v in recorded.items() if k != "format"}).format == 1  # older files
    for other in (recorded | {"format": 2}, recorded | {"colour_space": "lab"}):
        with pytest.raises(CnnCodesError, match="another version of cnncodes"):
            ExtractorSpec.from_dict(other)
    with pytest.raises(CnnCodesError, match="incomplete"):
        ExtractorSpec.from_dict({k: v for k, v in recorded.items() if k != "layer"})


def test_features_whose_meta_lacks_a_key_or_has_a_newer_spec_are_one_line_errors(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=6)
    out = tmp_path / "f"
    made = runner.invoke(
        app,
        [
            "extract",
            str(data),
            "--out",
            str(out),
            "--backbone",
            "vgg16",
            "--weights",
            "none",
            "--image-size",
            "32",
            "--quiet",
        ],
    )
    assert made.exit_code == 0, made.output
    meta = json.loads((out / "meta.json").read_text())
    for broken, words in (
        (meta | {"extractor": meta["extractor"] | {"format": 9}}, "another version"),
        ({k: v for k, v in meta.items() if k != "classes"}, "lacks classes"),
        ([meta], "incomplete or damaged"),  # valid JSON, but not an object
    ):
        (out / "meta.json").write_text(json.dumps(broken))
        result = runner.invoke(app, ["fit-svm", str(out), "--out", str(tmp_path / "m"), "--quiet"])
        assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1


def test_features_of_format_1_with_paths_and_subsets_in_meta_still_load(tmp_path):
    """Format 2 keeps the rows' paths and subsets in split.csv only; folders listing them in meta.json still load."""
    out = cnncodes.extract(
        make_dataset(tmp_path / "data", per_class=6), tmp_path / "f", fast_spec(), progress=False
    ).out
    new = load_features(out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "cnncodes.features/2" and "paths" not in meta
    old = meta | {"format": "cnncodes.features/1", "paths": new.paths, "subsets": new.subsets.tolist()}
    (out / "meta.json").write_text(json.dumps(old))
    (out / "split.csv").rename(tmp_path / "split.csv")  # format 1 needs only meta.json's lists
    loaded = load_features(out)
    assert loaded.paths == new.paths and loaded.subsets.tolist() == new.subsets.tolist()
    assert loaded.split_fingerprint == new.split_fingerprint == meta["split"]["fingerprint"]
    (out / "meta.json").write_text(json.dumps({k: v for k, v in old.items() if k != "paths"}))
    with pytest.raises(CnnCodesError, match="lacks paths"):
        load_features(out)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CnnCodesError, match=r"split\.csv"):  # format 2 without its split.csv
        load_features(out)
    (out / "split.csv").write_text("path,label,subset\r\nb/0.png,b,somewhere\r\n")
    with pytest.raises(CnnCodesError, match=r"incomplete or damaged .*split\.csv.*run `cnncodes extract` again"):
        load_features(out)
