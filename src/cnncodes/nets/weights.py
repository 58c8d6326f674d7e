"""Finding the weight file a backbone should load, offline first.

`--weights imagenet` looks for the backbone's canonical Keras file name in
`$CNNCODES_WEIGHTS_DIR`, then in Keras's cache (`$KERAS_HOME/models`, default
`~/.keras/models`), and only then asks Keras to download it. The file found is loaded by
path into a model built without weights, so one file serves every input size.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import sha256_file

WEIGHTS_DIR_ENV = "CNNCODES_WEIGHTS_DIR"
# `--weights none` builds the network with this Keras seed, so the same "untrained"
# extractor can be rebuilt later (by `predict`, or to resume a run).
UNTRAINED_SEED = 0


@dataclass(frozen=True)
class Weights:
    """The weights an extractor is built with. `kind` is imagenet, none or file."""

    kind: str
    path: Path | None = None
    sha256: str | None = None


@dataclass(frozen=True, kw_only=True)
class ImagenetFile:
    """A backbone's ImageNet weights as Keras publishes them.

    Attributes:
        backbone: the network's registry name, for messages.
        name: Keras's canonical file name, the one looked for offline.
        url: where Keras downloads it from.
        md5: the MD5 Keras checks the download against; None where Keras publishes none.
    """

    backbone: str
    name: str
    url: str
    md5: str | None = None


def keras_cache_dir() -> Path:
    """Keras's own download cache, as `keras.utils.get_file` computes it."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"


def search_places() -> dict[str, Path]:
    """The folders searched for canonical weight files, in order, by the names users know them by."""
    places = {"the Keras cache": keras_cache_dir()}
    if os.environ.get(WEIGHTS_DIR_ENV):
        places = {f"${WEIGHTS_DIR_ENV}": Path(os.environ[WEIGHTS_DIR_ENV]).expanduser(), **places}
    return places


def search_dirs() -> list[Path]:
    """Folders searched for canonical weight files, in order."""
    return list(search_places().values())


def place_of(file_name: str) -> str | None:
    """Which of `search_places` `--weights imagenet` finds `file_name` in, without downloading it.

    Args:
        file_name: a canonical Keras file name (`ImagenetFile.name`).

    Returns:
        The place's name, or None when the file would be downloaded.
    """
    return next((place for place, folder in search_places().items() if (folder / file_name).is_file()), None)


def resolve_weights(choice: str, *, imagenet: ImagenetFile, tried: str = "", advice: str | None = None) -> Weights:
    """Turn `--weights imagenet|none|PATH` into a file on disk (or none), with its SHA-256.

    A file found or downloaded under Keras's canonical name must have the MD5 that Keras
    publishes for it (`md5`, when Keras has one): the name promises those exact weights.

    Args:
        choice: `imagenet`, `none` or the path of a Keras weights file.
        imagenet: the backbone's ImageNet file, for `imagenet`.
        tried: where the caller looked already, said first when the file is not found ("X is gone; ").
        advice: what to do when no file is found, for a command that rebuilds a recorded extractor
            (there other weights are refused); None: the advice for a command that chooses them.

    Returns:
        The weights, with the file's resolved path and SHA-256.

    Raises:
        CnnCodesError: when the file is not there (and for imagenet, cannot be downloaded), or
            a canonical file is not the one Keras publishes.
    """
    if choice == "none":
        return Weights("none")
    if choice == "imagenet":
        path = find_file(imagenet.name) or _download(imagenet, tried, advice)
        return Weights("imagenet", path, _published(path, imagenet.md5))
    path = Path(choice).expanduser()
    if not path.is_file():
        advice = advice or "use imagenet, none, or the path of a Keras .h5 weights file"
        raise CnnCodesError(f"--weights {choice}: no such file; {advice}")
    return Weights("file", path.resolve(), sha256_file(path))


def _published(path: Path, md5: str | None) -> str:
    """The file's SHA-256, once its MD5 is checked against Keras's published one (both in one read)."""
    sha256, found = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            found.update(chunk)
    if md5 is not None and found.hexdigest() != md5:
        raise CnnCodesError(
            f"{path} is not the file Keras publishes under that name (MD5 {found.hexdigest()}, "
            f"expected {md5}): delete it to download it again, or load it on purpose with "
            f"--weights {path}"
        )
    return sha256.hexdigest()


def find_file(file_name: str) -> Path | None:
    """A canonical Keras file in the first of `search_dirs` that holds it, resolved; None if none does.

    Args:
        file_name: a canonical Keras file name (`ImagenetFile.name`).

    Returns:
        The file's path, or None (nothing is downloaded).
    """
    for folder in search_dirs():
        candidate = folder / file_name
        if candidate.is_file():
            return candidate.resolve()
    return None


def download(imagenet: ImagenetFile) -> Path:
    """Keras's download of a published file into its cache, checked against the published MD5.

    Args:
        imagenet: the file, its URL and MD5.

    Returns:
        Where Keras saved it (under `keras_cache_dir`).

    Raises:
        Exception: whatever Keras raises when the file cannot be downloaded (offline, a wrong MD5).
    """
    from keras.utils import get_file

    return Path(get_file(imagenet.name, imagenet.url, cache_subdir="models", file_hash=imagenet.md5))


def _download(imagenet: ImagenetFile, tried: str, advice: str | None) -> Path:
    try:
        return download(imagenet)
    except Exception as e:
        searched = [f"{place} ({folder})" for place, folder in search_places().items()]
        if not os.environ.get(WEIGHTS_DIR_ENV):
            searched.insert(0, f"${WEIGHTS_DIR_ENV} (not set)")
        choosing = (
            f"put the file in ${WEIGHTS_DIR_ENV} or {keras_cache_dir()}, pass --weights PATH, "
            "or use --weights none for untrained weights"
        )
        raise CnnCodesError(
            f"ImageNet weights for {imagenet.backbone} not found: {tried}{imagenet.name} is in neither "
            f"{' nor '.join(searched)}, and downloading it failed ({str(e).strip() or type(e).__name__}): "
            f"{advice or choosing}"
        ) from None
