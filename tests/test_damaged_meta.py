"""Damaged meta.json files and bundles, made by a generator over every field: one error line, or a repair.

The generator takes a real features folder's meta.json and, for each field (and each field of
its nested parts), removes it, gives it a value of the wrong kind (a float for an integer too),
puts it out of range or makes it NaN; a file of 100,000 `[` stands for JSON nested too deeply to
parse. `fit-svm` refuses each in one line naming meta.json and the field; `extract` writes the
folder again. A bundle's metadata is damaged the same way (and re-hashed into its record, as a
hand-edit would be): `predict` refuses it in one line.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import joblib
import pytest

import cnncodes
from cnncodes.codes.meta import FeaturesMeta, validate_meta
from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import sha256_file
from cnncodes.runs.bundle import BundleContents, load_bundle

from .helpers import FAST_ARGS, cli, fast_spec, make_dataset

# Free-form parts: their contents are the engine's and the quantizer's own.
FREE_FORM = ("engine", "calibration", "quantization")
# Damage that leaves a value in range: any integer is a seed, any finite number a probe output, any name a
# weights file's (it is looked for), and the probe may be unknown.
IN_RANGE = {"split.seed = -5", "extractor.probe.0 = -5", "extractor.weights_file = 'x'", "extractor.probe = None"}
SAVED = Path(__file__).parent / "data" / "before_packages"
RUN = "vgg16-block5_pool-knn"
IMAGE = SAVED / "images" / "circles" / "circles_00.jpg"


def _wrong_kinds(value: Any) -> list[Any]:
    if isinstance(value, bool) or value is None:
        return ["x", [1]]
    if isinstance(value, int):
        return ["x", [0.5], True, float(value)]
    if isinstance(value, float):
        return ["x", [0.5], True]
    if isinstance(value, str):
        return [5, ["x"], None]
    if isinstance(value, list):
        return ["x", 5, {}, None]
    return ["x", [], 5, None]


def _set(value: dict[str, Any], path: tuple, new: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(value))
    part = copy
    for key in path[:-1]:
        part = part[key]
    part[path[-1]] = new
    return copy


def _leaves(value: Any, path: tuple) -> Iterator[tuple[tuple, Any]]:
    """Every place below a field: the field itself, then its nested parts (first item of a list)."""
    yield path, value
    if path[-1] in FREE_FORM:
        return
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaves(inner, (*path, key))
    elif isinstance(value, list) and value:
        yield from _leaves(value[0], (*path, 0))


def damaged(good: dict[str, Any], model: type) -> Iterator[tuple[str, Any]]:
    """(what was done, the damaged value) for every field of `good`, a valid instance of `model`."""
    for key in good:
        if key in model.model_fields and model.model_fields[key].is_required():
            yield f"{key} missing", {k: v for k, v in good.items() if k != key}
        for path, value in _leaves(good[key], (key,)):
            where = ".".join(map(str, path))
            for wrong in _wrong_kinds(value):
                yield f"{where} = {wrong!r}", _set(good, path, wrong)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                yield f"{where} = -5", _set(good, path, -5)
                yield f"{where} = NaN", _set(good, path, math.nan)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("meta")
    data = make_dataset(root / "data", per_class=8)
    out = cnncodes.extract(data, root / "features", fast_spec(), progress=False).out
    return {"data": data, "features": out, "meta": json.loads((out / "meta.json").read_text())}


def meta_cases(good: dict[str, Any]) -> list[tuple[str, Any]]:
    cases = [c for c in damaged(good, FeaturesMeta) if c[0] not in IN_RANGE]
    multi = good | {"extractor": good["extractor"] | {"scales": [32, 24], "views": 2}}
    cases.append(("dim = a float, codes of two sizes", multi | {"dim": good["dim"] / 2}))
    cases.append(("split.fractions = not summing to 1", _set(good, ("split", "fractions"), [0.5, 0.5, 0.5])))
    cases.append(("classes = a class twice", good | {"classes": [good["classes"][0]] * 2}))
    cases.append(("paths missing from a format-1 folder", good | {"format": "cnncodes.features/1"}))
    cases.append(("nested too deeply", "[" * 100_000))
    return cases


def _copy_with(folder: dict[str, Any], tmp_path: Path, meta: Any) -> Path:
    copy = tmp_path / "features"
    shutil.copytree(folder["features"], copy)
    (copy / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    return copy


def test_the_generator_covers_every_field_and_only_the_in_range_damage_passes(folder):
    good = folder["meta"]
    assert validate_meta(good, "meta.json") is good
    cases = meta_cases(good)
    assert {what.split(" ")[0].split(".")[0] for what, _ in cases} >= set(good)
    assert len(cases) > 200
    passed = []
    for what, meta in cases + [c for c in damaged(good, FeaturesMeta) if c[0] in IN_RANGE]:
        try:
            validate_meta(meta, "meta.json")
        except CnnCodesError as e:
            assert str(e).startswith("meta.json: ") and "\n" not in str(e)
        else:
            passed.append(what)
    assert set(passed) == IN_RANGE


def test_fit_svm_refuses_every_damaged_meta_in_one_line_naming_the_file_and_field(folder, tmp_path):
    copy = folder["features"].parent / "damaged"
    shutil.copytree(folder["features"], copy, dirs_exist_ok=True)
    failures = []
    for what, meta in meta_cases(folder["meta"]):
        (copy / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
        result = cli("fit-svm", copy, "--out", tmp_path / "m", "--classifier", "knn", "--n-jobs", "1", "--quiet")
        lines = result.stderr.strip().splitlines()
        field = what.split(" ")[0].split(".")[0]
        named = "meta.json" in result.stderr and (field in result.stderr or what == "nested too deeply")
        if result.exit_code != 2 or len(lines) != 1 or "Traceback" in result.output or not named:
            failures.append(f"{what}: exit {result.exit_code}, {result.output[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").glob("*.json"))


# The audit's cases, and others across the fields: extract writes the folder again, in one warning.
REPAIRED = (
    "split = 'x'",
    "split = None",
    "classes = None",
    "extractor = 'x'",
    "split.seed = 'x'",
    "dim = a float, codes of two sizes",
    "files.features.npy.sha256 = 5",
    "n_images = -5",
    "format missing",
    "nested too deeply",
)


@pytest.mark.parametrize("what", REPAIRED)
def test_extract_writes_a_folder_with_a_damaged_meta_again(folder, tmp_path, what):
    (meta,) = [m for w, m in meta_cases(folder["meta"]) if w == what]
    copy = _copy_with(folder, tmp_path, meta)
    result = cli("extract", folder["data"], "--out", copy, *FAST_ARGS)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1 and "meta.json" in warnings[0], result.stderr
    repaired = json.loads((copy / "meta.json").read_text())
    assert validate_meta(repaired, "meta.json") and repaired["run_key"] == folder["meta"]["run_key"]
    assert cnncodes.load_features(copy).X.shape == cnncodes.load_features(folder["features"]).X.shape
    again = cli("extract", folder["data"], "--out", copy, *FAST_ARGS)
    assert again.exit_code == 0 and "Warning" not in again.stderr  # repaired: up to date now


@pytest.fixture(scope="module")
def bundle() -> dict[str, Any]:
    return load_bundle(SAVED / "models" / f"{RUN}.joblib")[1]


def _bundle_with(tmp_path: Path, contents: Any, record_changes: dict[str, Any] | None = None) -> Path:
    model = tmp_path / f"{RUN}.joblib"
    joblib.dump(contents, model)
    record = json.loads((SAVED / "models" / f"{RUN}.json").read_text())
    record |= {"model_sha256": sha256_file(model), "model_bytes": model.stat().st_size, **(record_changes or {})}
    (tmp_path / f"{RUN}.json").write_text(json.dumps(record))
    return model


def bundle_cases(contents: dict[str, Any]) -> list[tuple[str, Any]]:
    plain = {k: v for k, v in contents.items() if k not in ("model", "format")}
    cases = [
        (what, {"format": contents["format"], "model": contents["model"], **damage})
        for what, damage in damaged(plain, BundleContents)
        if what not in IN_RANGE
    ]
    cases.append(("model missing", {k: v for k, v in contents.items() if k != "model"}))
    cases.append(("classes = other classes", contents | {"classes": ["a", "b", "c"]}))
    return cases


def test_predict_refuses_every_damaged_bundle_in_one_line_naming_the_file_and_field(bundle, tmp_path):
    failures = []
    for n, (what, contents) in enumerate(bundle_cases(bundle)):
        (tmp_path / str(n)).mkdir()
        model = _bundle_with(tmp_path / str(n), contents)
        result = cli("predict", model, IMAGE)
        lines = result.stderr.strip().splitlines()
        field = what.split(" ")[0].split(".")[0]
        if result.exit_code != 2 or len(lines) != 1 or model.name not in result.stderr or field not in result.stderr:
            failures.append(f"{what}: exit {result.exit_code}, {result.output[-300:]!r}")
    assert not failures, "\n".join(failures)
    assert cli("predict", _bundle_with(tmp_path, bundle), IMAGE).exit_code == 0  # the undamaged one, re-saved


@pytest.mark.parametrize("versions", ["x", [], {"scikit-learn": 1.9}, {"numpy": "2.0"}])
def test_predict_refuses_a_record_whose_versions_are_damaged_in_one_line(bundle, tmp_path, versions):
    model = _bundle_with(tmp_path, bundle, {"versions": versions})
    result = cli("predict", model, IMAGE)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(result.stderr.strip().splitlines()) == 1 and RUN in result.stderr
