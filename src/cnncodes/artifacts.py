"""Writing and fingerprinting the files cnncodes leaves behind.

Every output is written to a temporary file in the same folder, synced, and moved into place
with `os.replace`, so a reader never sees half a file, whatever interrupts the run.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np

_PACKAGES = (
    "cnncodes",
    "tensorflow-cpu",
    "tensorflow",
    "keras",
    "numpy",
    "pillow",
    "scikit-learn",
    "onnxruntime",
    "onnx",
    "tf2onnx",
)

# JSON pieces hashed at a time by `sha256_json`: a few MB of text, few calls.
_HASH_PIECES = 65536

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either the old or the new content, never a mix."""
    with _atomic_file(path) as f:
        f.write(data)


@contextmanager
def _atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A temporary file beside `path` to write, moved into place once the block ends without an error.

    The file is synced before the rename and its folder after it, so even a power loss
    leaves the old or the new content, not an empty file under the new name. Writers stream
    into it, so a large output never exists as one string in memory as well.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs should be like any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: by syncing the folder itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV that round-trips any file name (see `_csv_writer`)."""
    buf = io.StringIO()
    writer = _csv_writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _csv_writer(text: TextIO) -> Any:
    """A CSV writer whose lines end in CRLF (RFC 4180).

    The csv module quotes a field holding any character of the line terminator: with a bare
    "\n" terminator, Python before 3.11.9 and 3.12.3 left a carriage return in a name unquoted
    and the file split the row in two.
    """
    return csv.writer(text, lineterminator="\r\n")


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file whose file names keep the bytes they have on disk, UTF-8 or not (surrogateescape).

    Rows are encoded into the file as they come: a million of them never become one string.
    """
    with _atomic_file(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        writer = _csv_writer(text)
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # the file is the atomic writer's to sync and close


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    with _atomic_file(path) as f:
        np.save(f, array)


def read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """A stable fingerprint of JSON-able data (key order does not matter).

    It is the SHA-256 of `json.dumps(obj, sort_keys=True)`, hashed piece by piece as it is
    encoded, so fingerprinting a million file ids never holds their whole JSON (and its
    bytes) in memory at once.
    """
    digest = hashlib.sha256()
    pieces: list[str] = []
    for piece in json.JSONEncoder(sort_keys=True).iterencode(obj):
        pieces.append(piece)
        if len(pieces) >= _HASH_PIECES:
            digest.update("".join(pieces).encode())
            pieces.clear()
    digest.update("".join(pieces).encode())
    return digest.hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what a model computes, for the record."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
