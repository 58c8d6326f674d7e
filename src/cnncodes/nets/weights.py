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


def keras_cache_dir() -> Path:
    """Keras's own download cache, as `keras.utils.get_file` computes it."""
    return Path(os.environ.get("KERAS_HOME", "~/.keras")).expanduser() / "models"


def search_dirs() -> list[Path]:
    """Folders searched for canonical weight files, in order."""
    dirs = [keras_cache_dir()]
    if os.environ.get(WEIGHTS_DIR_ENV):
        dirs.insert(0, Path(os.environ[WEIGHTS_DIR_ENV]).expanduser())
    return dirs


def resolve_weights(choice: str, file_name: str, url: str, backbone: str, md5: str | None = None) -> Weights:
    """Turn `--weights imagenet|none|PATH` into a file on disk (or none), with its SHA-256.

    A file found or downloaded under Keras's canonical name must have the MD5 that Keras
    publishes for it (`md5`, when Keras has one): the name promises those exact weights.
    """
    if choice == "none":
        return Weights("none")
    if choice == "imagenet":
        path = _find(file_name) or _download(file_name, url, backbone, md5)
        return Weights("imagenet", path, _published(path, md5))
    path = Path(choice).expanduser()
    if not path.is_file():
        raise CnnCodesError(
            f"--weights {choice}: no such file; use imagenet, none, or the path of a Keras .h5 weights file"
        )
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


def _find(file_name: str) -> Path | None:
    for folder in search_dirs():
        candidate = folder / file_name
        if candidate.is_file():
            return candidate.resolve()
    return None


def _download(file_name: str, url: str, backbone: str, md5: str | None) -> Path:
    from keras.utils import get_file

    try:
        return Path(get_file(file_name, url, cache_subdir="models", file_hash=md5))
    except Exception as e:
        searched = " nor ".join(str(d) for d in search_dirs())
        if not os.environ.get(WEIGHTS_DIR_ENV):
            searched = f"${WEIGHTS_DIR_ENV} (not set) nor {searched}"
        raise CnnCodesError(
            f"ImageNet weights for {backbone} not found: {file_name} is in neither {searched}, "
            f"and downloading it failed ({str(e).strip() or type(e).__name__}). "
            f"Put the file in ${WEIGHTS_DIR_ENV} or {keras_cache_dir()}, pass --weights PATH, "
            "or use --weights none for untrained weights."
        ) from None
