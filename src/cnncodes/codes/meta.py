"""The features folder's `meta.json` and the extractor a bundle records: one typed definition each.

`publish_folder` writes meta.json through `FeaturesMeta`; `load_features`, `extract`'s check
of what it would skip and everything that reads a folder's meta (fit-svm, finetune) read it
through the same definition, so a damaged or hand-edited meta.json is one error line naming
the file and the field, never a traceback downstream. `RecordedExtractor` is the extractor as
meta.json and a bundle record it (`ExtractorSpec.to_dict`). Fields this version does not know
are kept; folders of format 1 (rows listed in meta.json) still read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, model_validator

from cnncodes.core.typed import Count, Finite, Name, NonNegative, Positive, Sha256, Strict, Unit, validated
from cnncodes.data.split import MAX_DUP_THRESHOLD, SUBSETS
from cnncodes.nets.backbones import REGISTRY

# Format 2 keeps the rows' paths and subsets in split.csv only; format 1 listed them in meta.json too.
FEATURES_FORMAT = "cnncodes.features/2"
FORMAT_1 = "cnncodes.features/1"
# What to do about a meta.json that is not valid: its codes cannot be trusted without it.
EXTRACT_AGAIN = ": run `cnncodes extract` again"
# An image size no backbone can take is damage (`Backbone.min_size` checks each one's own when it is built).
ImageSize = Annotated[StrictInt, Field(ge=min(backbone.min_size for backbone in REGISTRY.values()))]


class RecordedExtractor(Strict):
    """Everything that decides the code of an image (`ExtractorSpec`), as meta.json and bundles record it.

    Its format and unknown fields are `ExtractorSpec.from_dict`'s to refuse, with what to do.
    """

    backbone: Name
    layer: Name
    pooling: Name
    image_size: ImageSize
    resize: Name
    preprocessing: str
    weights: Name
    weights_sha256: Sha256 | None = None
    weights_file: str | None = None
    flip: StrictBool = False
    scales: Annotated[list[ImageSize], Field(min_length=1)] | None = None
    views: Positive | None = None
    keep_sizes: StrictBool = False
    precision: Name = "fp32"
    calibration: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    probe: list[Finite] | None = None
    format: Positive = 1


class SplitRecord(Strict):
    """The split's settings (which decide groups.npy) and what it made."""

    fractions: Annotated[list[Unit], Field(min_length=3, max_length=3)]
    seed: StrictInt
    dup_threshold: Annotated[StrictInt, Field(ge=-1, le=MAX_DUP_THRESHOLD)]
    fingerprint: Sha256
    duplicate_groups: Count = 0
    counts: dict[str, Count]

    @model_validator(mode="after")
    def _subsets(self) -> SplitRecord:
        if abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError("fractions do not sum to 1")
        if not set(self.counts) <= set(SUBSETS):
            raise ValueError(f"counts names other subsets than {', '.join(SUBSETS)}")
        return self


class FileDigest(Strict):
    """One output as published: its size and SHA-256; features.npy's also per part of `part_rows` rows."""

    bytes: Count
    sha256: Sha256
    part_rows: Positive | None = None
    parts_sha256: list[Sha256] = Field(default_factory=list)


class FeaturesMeta(Strict):
    """What a features folder holds and how it was made: meta.json, written last by `extract`."""

    format: Literal["cnncodes.features/2", "cnncodes.features/1"]  # FEATURES_FORMAT, FORMAT_1
    data: str
    classes: Annotated[list[Name], Field(min_length=1)]
    n_images: Count
    dim: Positive
    extractor: RecordedExtractor
    runtime: Name = "onnx"
    engine: dict[str, Any] = Field(default_factory=dict)
    split: SplitRecord
    run_key: Name
    versions: dict[str, str] = Field(default_factory=dict)
    created: str = ""
    elapsed_seconds: NonNegative
    images_per_second: NonNegative | None = None  # None: no code was computed
    stage_seconds: dict[str, NonNegative] = Field(default_factory=dict)
    files: dict[str, FileDigest] = Field(default_factory=dict)  # absent in folders published before the digests
    paths: list[str] | None = None  # format 1
    subsets: list[str] | None = None  # format 1

    @model_validator(mode="after")
    def _consistent(self) -> FeaturesMeta:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("classes names a class twice")
        if self.format == FORMAT_1:
            for rows in ("paths", "subsets"):
                if getattr(self, rows) is None:
                    raise ValueError(f"it lacks {rows}, which a folder of {FORMAT_1} lists in meta.json")
                if len(getattr(self, rows)) != self.n_images:
                    raise ValueError(f"{rows} does not list n_images = {self.n_images} rows")
        return self


def validate_meta(meta: Any, path: Path | str, *, advice: str = EXTRACT_AGAIN) -> dict[str, Any]:
    """A features folder's meta.json checked against `FeaturesMeta`, as the plain dict it was (nothing added).

    Args:
        meta: what meta.json holds (or is about to hold).
        path: the file, named in the error.
        advice: what the error tells the user to do; `extract`, which repairs the folder itself, says nothing.

    Returns:
        The same fields, their values checked.

    Raises:
        CnnCodesError: one line naming the file and the first field that is missing, of the wrong kind or out
            of range, and `advice`.
    """
    validated(FeaturesMeta, meta, path, what="features record", advice=advice)
    return meta
