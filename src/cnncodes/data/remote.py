"""Datasets in an object store (`s3://bucket/prefix`, `gs://…`), read through pyarrow's file systems.

The same rules as for a local folder: one sub-folder (key prefix) per class under the
prefix, or a CSV of `path,label` rows whose paths are URIs. A file's identity for the
caches is its path under the prefix, size and modification time. Each file is fetched into
a temporary file and decoded by the same code as a local file, so both give the same pixels.

S3 credentials and region come from the usual AWS variables and files; an S3-compatible
server (MinIO, Ceph, moto) is reached through `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL`,
which pyarrow itself does not read.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cnncodes.core.errors import CnnCodesError
from cnncodes.data.decode import BadImage
from cnncodes.data.ingest import Dataset, is_uri, read_listing


class UriRoot(str):
    """The root of a remote dataset: `root / relative_path` gives the file's URI, as `Path` does locally."""

    def __truediv__(self, rel: str) -> str:
        return rel if is_uri(rel) else f"{self.rstrip('/')}/{rel}"


def discover_uri(uri: str) -> Dataset:
    """List the candidate images under an object-store prefix, or those of a CSV of URIs stored there."""
    if uri.lower().endswith(".csv"):
        return _discover_csv(uri)
    fs, prefix = _filesystem(uri)
    FileSelector, FileType = _pyarrow_fs().FileSelector, _pyarrow_fs().FileType
    try:
        listing = fs.get_file_info(FileSelector(prefix.rstrip("/"), recursive=True))
    except (OSError, ValueError) as e:
        raise CnnCodesError(f"cannot list {uri}: {e}") from None
    found, skipped = [], []
    for info in listing:
        rel = info.path[len(prefix.rstrip("/")) + 1 :]
        parts = rel.split("/")
        if info.type != FileType.File:
            continue
        if any(p.startswith(".") for p in parts):
            skipped.append((rel, "hidden file", "hidden"))
        elif len(parts) == 1:
            skipped.append((rel, "not in a class folder", "outside classes"))
        else:  # whatever its name: the check reads every candidate and tells images by their bytes, as on disk
            found.append((parts[0], rel))
    if not found:
        raise CnnCodesError(
            f"{uri} holds no images in class folders: put the images of each class under a prefix "
            f"of its own, e.g. {uri.rstrip('/')}/cat/1.jpg"
        )
    found.sort()
    root = UriRoot(uri.rstrip("/"))
    return Dataset(root, [rel for _, rel in found], [label for label, _ in found], skipped)  # type: ignore[arg-type]


def _discover_csv(uri: str) -> Dataset:
    text = read_bytes(uri).decode("utf-8-sig", errors="replace")
    rows, skipped = read_listing(io.StringIO(text, newline=""), uri)
    base = uri.rsplit("/", 1)[0]
    return Dataset(UriRoot(base), [p for p, _ in rows], [label for _, label in rows], skipped)  # type: ignore[arg-type]


def file_ids(dataset: Dataset) -> list[str]:
    """Path, size and modification time of every file: one listing of the root, one request per file outside it."""
    FileType = _pyarrow_fs().FileType
    listed = _listing(str(dataset.root)) if is_uri(str(dataset.root)) else {}  # a local CSV of URIs has no root
    ids = []
    for rel in dataset.paths:
        try:
            fs, path = _filesystem(str(dataset.root / rel))
            info = listed.get(path) or fs.get_file_info(path)
        except (OSError, ValueError, CnnCodesError):  # ValueError: pyarrow's ArrowInvalid, e.g. `s3://bucket//key`
            info = None  # the check reads it, and rejects it with the store's reason
        if info is None or info.type != FileType.File:
            ids.append(f"{rel}|missing")
        else:
            ids.append(f"{rel}|{info.size}|{info.mtime_ns}")
    return ids


def _listing(root: str) -> dict[str, Any]:
    """Every file under `root` by its path in the bucket, in one request (empty if it cannot be listed)."""
    fs, prefix = _filesystem(root)
    try:
        return {
            info.path: info for info in fs.get_file_info(_pyarrow_fs().FileSelector(prefix.rstrip("/"), recursive=True))
        }
    except (OSError, ValueError):
        return {}


class MissingObject(CnnCodesError):
    """No object at that address (a bucket that does not answer is another error)."""


def read_bytes(uri: str) -> bytes:
    fs, path = _filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except FileNotFoundError:
        raise MissingObject(f"cannot read {uri}: no such object") from None
    except (OSError, ValueError) as e:
        raise CnnCodesError(f"cannot read {uri}: {e}") from None


@contextmanager
def local_file(path: Path | str) -> Iterator[Path]:
    """A local path for a file or an object: an object is fetched into a temporary file, removed afterwards.

    The store's failures are the file's: `BadImage`, "missing" for no such object and
    "unreadable" for a store that does not answer, as for a file on disk.
    """
    if not is_uri(str(path)):
        yield Path(path)
        return
    try:
        data = read_bytes(str(path))
    except MissingObject:
        raise BadImage("object not found", "missing") from None
    except CnnCodesError as e:
        raise BadImage(str(e), "unreadable") from None
    with tempfile.NamedTemporaryFile(suffix=Path(str(path)).suffix) as f:
        f.write(data)
        f.flush()
        yield Path(f.name)


def joined(root: str, rel: str) -> Path | str:
    """Where a file of a dataset is, from the root and relative path its records keep: a path or a URI."""
    return UriRoot(root) / rel if is_uri(root) or is_uri(rel) else Path(root) / rel


def _filesystem(uri: str):
    """pyarrow's file system for `uri` and the path within it; one file system per bucket and endpoint, reused.

    Not parsed as a URL: `#` and `?` are characters of object keys, not a fragment and a query.
    """
    scheme, _, path = uri.partition("://")
    scheme = scheme.lower()  # pyarrow knows `s3`, not `S3`
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") if scheme == "s3" else None
    return bucket_filesystem(scheme, path.split("/", 1)[0], endpoint), path


@lru_cache(maxsize=64)
def bucket_filesystem(scheme: str, bucket: str, endpoint: str | None):
    """One pyarrow filesystem per bucket and endpoint, kept: opening one resolves credentials and the region.

    Args:
        scheme: `s3`, `gs` or another scheme pyarrow knows.
        bucket: the bucket's name.
        endpoint: an S3-compatible endpoint (`AWS_ENDPOINT_URL`), or None.

    Returns:
        The filesystem.

    Raises:
        CnnCodesError: when pyarrow cannot open the bucket.
    """
    query = f"?{urlencode({'endpoint_override': endpoint})}" if endpoint else ""
    try:
        return _pyarrow_fs().FileSystem.from_uri(f"{scheme}://{bucket}{query}")[0]
    except (OSError, ValueError) as e:
        raise CnnCodesError(f"cannot open {scheme}://{bucket}: {e}") from None


def _pyarrow_fs():
    try:
        import pyarrow.fs
    except ImportError:
        raise CnnCodesError("reading images from an object store needs pyarrow: pip install 'cnncodes[ray]'") from None
    return pyarrow.fs
