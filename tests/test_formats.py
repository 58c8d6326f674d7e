"""Artifacts made by another version of cnncodes: refused in one line, never misread."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cnncodes import CnnCodesError, ExtractorSpec
from cnncodes.cli import app

from .conftest import make_dataset

runner = CliRunner()


def spec_dict() -> dict:
    return ExtractorSpec.create("vgg16", image_size=32, weights="none")[0].to_dict()


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
    ):
        (out / "meta.json").write_text(json.dumps(broken))
        result = runner.invoke(app, ["fit-svm", str(out), "--out", str(tmp_path / "m"), "--quiet"])
        assert result.exit_code == 2 and words in result.stderr and "Traceback" not in result.output
        assert len(result.stderr.strip().splitlines()) == 1
