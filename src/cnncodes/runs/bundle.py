"""Model bundles: one self-describing `.joblib` file beside its run record.

Loading a joblib file runs code, so a bundle is only unpickled after its SHA-256 matches
the one in its sidecar run record (`<run>.json`), and only when the scikit-learn that
pickled it is the one installed (another version may unpickle into wrong answers).
"""

from __future__ import annotations

import hashlib
import importlib
import io
import sys
import types
from pathlib import Path
from typing import Annotated, Any

import joblib
from pydantic import Field

from cnncodes.codes.meta import RecordedExtractor
from cnncodes.core.errors import CnnCodesError, first_line
from cnncodes.core.files import package_versions, read_json
from cnncodes.core.typed import Name, Strict, validated
from cnncodes.runs.records import previous_model, publish_run, sidecar
from cnncodes.runs.schema import RECORD_FORMAT, validate_record

# 2: probabilities by temperature over informative scores (`CodesClassifier.temperature_`).
# 3: an SVM's probabilities couple its tempered one-vs-one margins (a format-2 temperature meant something else).
BUNDLE_FORMAT = "cnncodes.bundle/3"
# Bundles pickled before the sub-packages name their classes by the flat module each lived in.
# Bundles pickled before the sub-packages name their classes by the flat module each lived in:
# each former module, and each name pickled there with the `module:name` it is today.
_FORMER_MODULES = {
    "cnncodes.classifiers": {
        "CodesClassifier": "cnncodes.classify.estimator:CodesClassifier",
        "_WeightedNeighbors": "cnncodes.classify.kinds:WeightedNeighbors",
    }
}


class BundleContents(Strict):
    """What a bundle holds besides its format: the fitted model and what `predict` rebuilds around it."""

    run: Name
    model: Any
    classes: Annotated[list[Name], Field(min_length=2)]
    extractor: RecordedExtractor
    versions: dict[str, str]  # `package_versions()` where it was fitted: Keras draws untrained weights by its own


def publish_bundle(path: Path, contents: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Save a bundle and its run record together (see `records.publish`); returns the completed record."""

    bundle = {"format": BUNDLE_FORMAT, **contents, "versions": package_versions()}
    validated(BundleContents, bundle, path, what="model bundle")

    def write(tmp: Path) -> None:
        joblib.dump(bundle, tmp, compress=3)

    return publish_run(path, write, record)


def load_record_for(model_path: Path) -> tuple[dict[str, Any], bytes]:
    """The run record beside a model file and the file's bytes, checked to be the ones it describes.

    The bytes are returned so the caller loads exactly what was hashed, not a file that
    could be swapped between the check and the load.
    """
    # beside the name given, else beside the file it links to
    record_path = next(
        (p for p in (sidecar(model_path), sidecar(model_path.resolve())) if p.is_file()), sidecar(model_path)
    )
    replaced = previous_model(record_path.with_suffix(model_path.suffix))
    if not model_path.is_file() and not replaced.is_file():
        raise CnnCodesError(f"model {model_path} not found")
    try:
        data = model_path.read_bytes()
    except FileNotFoundError:  # moved aside by a publish under way: `replaced` is the model
        data = b""
    try:
        record = read_json(record_path)
    except (OSError, ValueError) as e:
        why = f" ({first_line(e)})" if isinstance(e, ValueError) else ""  # damaged, not missing
        raise CnnCodesError(
            f"{model_path} has no readable run record {record_path.name} beside it{why}, so it cannot be "
            "verified; load only bundles you made or trust, with their .json"
        ) from None
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT or "model_sha256" not in record:
        raise CnnCodesError(f"{record_path} is not a cnncodes run record")
    record = validate_record(record, record_path)
    made = str(record.get("model_file") or "")
    if Path(made).suffix != model_path.suffix:  # the loader follows the name: a renamed model would crash it
        raise CnnCodesError(
            f"{model_path} is, by its record {record_path.name}, the {Path(made).suffix or '?'} model "
            f"{made or '(not named)'} (method {record.get('method', '?')}): give it its own name"
        )
    if hashlib.sha256(data).hexdigest() != record["model_sha256"]:
        found = _replaced_model(replaced, record["model_sha256"])
        if found is None:
            raise CnnCodesError(
                f"{model_path} does not match the SHA-256 in {record_path.name}: the file was changed "
                "after it was made; refusing to load it"
            )
        data = found
    return record, data


def _replaced_model(path: Path, sha256: str) -> bytes | None:
    """The bytes of the model a publish moved aside (`previous_model`), if the record beside it still describes it.

    Between a publish's last two renames, or after a kill there, the record is still the old
    one and the old model is there: the reader gets the old pair, never the new model unverified.
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    return data if data and hashlib.sha256(data).hexdigest() == sha256 else None


def load_bundle(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Verify, then unpickle a bundle written by `fit-svm`; returns its run record and the bundle."""
    record, data = load_record_for(path)
    wanted, installed = record.get("versions", {}).get("scikit-learn"), package_versions().get("scikit-learn")
    if wanted is None:
        raise CnnCodesError(f"{path}'s run record does not say which scikit-learn made it: fit the model again")
    if _minor(wanted) != _minor(installed):
        raise CnnCodesError(
            f"{path} was made with scikit-learn {wanted} but {installed} is installed: "
            f"install scikit-learn=={wanted} or fit the model again"
        )
    try:
        bundle = _unpickle(data)
    except Exception as e:  # bytes its record vouches for, but not a pickle a bundle is made of
        raise CnnCodesError(f"{path} is not a cnncodes model bundle (it cannot be read: {first_line(e)})") from None
    if not isinstance(bundle, dict) or not str(bundle.get("format", "")).startswith("cnncodes.bundle/"):
        raise CnnCodesError(f"{path} is not a cnncodes model bundle")
    if bundle["format"] != BUNDLE_FORMAT:
        raise CnnCodesError(
            f"{path} was made by another version of cnncodes ({bundle['format']}, this one reads "
            f"{BUNDLE_FORMAT}): fit the model again with `cnncodes fit-svm`"
        )
    validated(BundleContents, bundle, path, what="model bundle", advice=": fit the model again")
    if bundle["classes"] != record["classes"]:
        raise CnnCodesError(f"{path} does not predict the classes its run record names: fit the model again")
    return record, bundle


def _unpickle(data: bytes) -> Any:
    """The bundle's objects, whichever module path (today's or a former one) their classes were pickled under."""
    aliased = [old for old in _FORMER_MODULES if old not in sys.modules]
    for old in aliased:
        sys.modules[old] = module = types.ModuleType(old)
        for name, now in _FORMER_MODULES[old].items():
            where, _, attribute = now.partition(":")
            setattr(module, name, getattr(importlib.import_module(where), attribute))
    try:
        return joblib.load(io.BytesIO(data))
    finally:
        for old in aliased:
            del sys.modules[old]


def _minor(version: str | None) -> tuple[str, ...]:
    return tuple((version or "").split(".")[:2])
