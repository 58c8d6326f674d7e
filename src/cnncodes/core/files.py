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
import re
import secrets
import socket
import zlib
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import numpy as np
from filelock import FileLock, Timeout

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.writes import NO_SPACE, NOT_WRITABLE, cannot_write, says_where

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

# Items of a long list encoded at a time by `json_pieces`.
_JSON_CHUNK = 4096
# Bytes read at a time when a file is hashed.
_READ_BYTES = 1 << 20


def _process_space() -> str:
    """Where a process id means one process: this machine's name, PID namespace (containers) and boot."""
    parts = [socket.gethostname()]
    with suppress(OSError):  # Linux's; elsewhere the host name alone
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
    return f"{zlib.crc32('|'.join(parts).encode()):08x}"


# Temporaries are `.<target>.<space>-<pid>.<random>.tmp<target's suffixes>` (`temporary_beside`): hidden,
# ending as their target does (Keras checks `.weights.h5`), and saying which process writes them.
_SPACE = _process_space()
_TEMPORARY = re.compile(r"^\..+\.([0-9a-f]{8})-(\d{1,10})\.[0-9a-f]{8}\.tmp")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either the old or the new content, never a mix."""
    with _atomic_file(path, needed=len(data)) as f:
        f.write(data)


@contextmanager
def exclusive(lock_path: Path, busy: str) -> Iterator[None]:
    """One process at a time in what `lock_path` guards (two would interleave their writes); `busy` says so.

    The lock is the operating system's (it dies with its process), so a killed run never
    leaves a stale lock behind. A folder where the lock cannot be made (read-only, full) is named.
    """
    make_folder(lock_path.parent)
    lock = FileLock(lock_path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CnnCodesError(busy) from None
    except OSError as e:
        raise cannot_write(e, lock_path.parent, folder=lock_path.parent) from None
    try:
        yield
    finally:
        lock.release()


def make_folder(folder: Path) -> None:
    """Create `folder` and its parents; a file in the way is one clear error, not "[Errno 17] File exists"."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CnnCodesError(f"{folder} cannot be made a folder: a file is in the way; give another path") from None
    except OSError as e:
        if e.errno not in NO_SPACE + NOT_WRITABLE:
            raise
        raise cannot_write(e, folder) from None


def check_file_target(path: Path, read: Iterable[Path] = ()) -> None:
    """Refuse an output file name that is a folder, or one of the files the command `read`."""
    if path.is_dir():
        raise CnnCodesError(f"{path} is a folder: give the name of a file to write")
    if path.exists() and any(path.resolve() == Path(other).resolve() for other in read):
        raise CnnCodesError(f"{path} is one of the files this command reads: give the output another name")


@contextmanager
def _atomic_file(path: Path, needed: int | None = None) -> Iterator[BinaryIO]:
    """A temporary file beside `path` to write, moved into place once the block ends without an error.

    The file is synced before the rename and its folder after it, so even a power loss
    leaves the old or the new content, not an empty file under the new name. Writers stream
    into it, so a large output never exists as one string in memory as well.
    """
    check_file_target(path)
    make_folder(path.parent)
    with temporary_beside(path) as tmp, says_where(path, tmp, needed):
        with open(tmp, "xb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    sync_folder(path.parent)


@contextmanager
def temporary_beside(path: Path) -> Iterator[Path]:
    """A free name beside `path` to write and then move there; removed if it was not moved.

    A writer killed before it could remove its temporary (a model can be gigabytes) leaves an
    orphan: the orphans in the folder are removed first.
    """
    _remove_orphans(path.parent)
    tmp = path.with_name(f".{path.name}.{_SPACE}-{os.getpid()}.{secrets.token_hex(4)}.tmp{''.join(path.suffixes)}")
    try:
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _remove_orphans(folder: Path) -> None:
    """Remove the temporaries whose writer, a process of this PID space, is no longer running.

    Best effort: a temporary that cannot be removed (another user's, in a shared folder) is left.
    """
    for tmp in folder.glob(".*.tmp*"):
        made = _TEMPORARY.match(tmp.name)
        if made and made[1] == _SPACE and not _running(int(made[2])):
            with suppress(OSError):
                tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    """Whether process `pid` exists (another user's too: signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        pass
    return True


def sync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: by syncing the folder itself).

    Args:
        folder: the folder whose entries changed.
    """
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV that round-trips any file name (see `_LfCsvWriter`)."""
    buf = io.StringIO()
    writer = _LfCsvWriter(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


class _LfCsvWriter:
    """A CSV writer whose lines end in "\n", as pandas and scikit-learn write them, so `grep ',test$'` finds rows.

    The csv module quotes a field holding a character of the line terminator; Python before
    3.11.9 and 3.12.3 did not count a carriage return as one with a bare "\n" terminator, so a
    row with "\r" in a file name is written with every field quoted, which every reader reads back.
    """

    def __init__(self, text: TextIO):
        self._plain = csv.writer(text, lineterminator="\n")
        self._quoted = csv.writer(text, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row: Sequence[Any]) -> None:
        (self._quoted if any("\r" in str(field) for field in row) else self._plain).writerow(row)

    def writerows(self, rows: Iterable[Sequence[Any]]) -> None:
        for row in rows:
            self.writerow(row)


def write_csv_atomic(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV file whose file names keep the bytes they have on disk, UTF-8 or not (surrogateescape).

    Rows are encoded into the file as they come: a million of them never become one string.
    """
    with _atomic_file(path) as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
        writer = _LfCsvWriter(text)
        writer.writerow(header)
        writer.writerows(rows)
        text.flush()
        text.detach()  # the file is the atomic writer's to sync and close


def write_npy_atomic(path: Path, array: np.ndarray) -> None:
    with _atomic_file(path, needed=array.nbytes) as f:
        np.save(f, array)


def read_json(path: Path) -> Any:
    """A JSON file's value; JSON nested too deeply to parse (a damaged file) is a ValueError like any bad JSON."""
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except RecursionError:
            raise ValueError(f"{path} is nested too deeply to be a cnncodes file") from None


def read_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (a record, meta.json): anything else is a ValueError, like bad JSON."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_READ_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_parts(path: Path, *, offset: int, part_bytes: int) -> tuple[str, list[str]]:
    """The SHA-256 of a file and of each `part_bytes` piece after its first `offset` bytes, in one read.

    A file damaged in one place (cut short, a block overwritten) then has its intact pieces
    told from the others, so whatever they hold can still be used.

    Args:
        path: the file.
        offset: bytes before the first piece (a header), hashed with the whole file only.
        part_bytes: the length of each piece; the last may be shorter.

    Returns:
        The whole file's digest, and each piece's, in order.
    """
    whole, parts = hashlib.sha256(), []
    with open(path, "rb") as f:
        whole.update(f.read(offset))
        while chunk := f.read(min(part_bytes, _READ_BYTES)):
            part, left = hashlib.sha256(), part_bytes
            while chunk:
                whole.update(chunk)
                part.update(chunk)
                left -= len(chunk)
                chunk = f.read(min(left, _READ_BYTES)) if left else b""
            parts.append(part.hexdigest())
    return whole.hexdigest(), parts


def sha256_json(obj: Any) -> str:
    """A stable fingerprint of JSON-able data (key order does not matter).

    It is the SHA-256 of `json.dumps(obj, sort_keys=True)`, hashed piece by piece
    (`json_pieces`), so fingerprinting a million file ids never holds their whole JSON in memory.
    """
    digest = hashlib.sha256()
    for piece in json_pieces(obj, sort_keys=True):
        digest.update(piece.encode())
    return digest.hexdigest()


def json_pieces(obj: Any, separators: tuple[str, str] = (", ", ": "), sort_keys: bool = False) -> Iterator[str]:
    """The text of `json.dumps(obj, separators=separators, sort_keys=sort_keys)`, in pieces.

    Lists are encoded `_JSON_CHUNK` items at a time, and so are lazy sequences (any `Sequence`
    but a list, tuple or string, such as `extract.FileIds`), which `json` itself cannot encode:
    a long list is never held whole as text, nor a lazy one as objects.
    """
    between, colon = separators
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        yield "{"
        for n, k in enumerate(sorted(obj) if sort_keys else obj):
            yield (between if n else "") + json.dumps(k) + colon
            yield from json_pieces(obj[k], separators, sort_keys)
        yield "}"
    elif isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        yield "["
        for start in range(0, len(obj), _JSON_CHUNK):
            chunk = list(obj[start : start + _JSON_CHUNK])
            if any(_lazy(item) or isinstance(item, dict) for item in chunk):
                for n, item in enumerate(chunk):
                    yield between if start or n else ""
                    yield from json_pieces(item, separators, sort_keys)
            else:
                yield (between if start else "") + json.dumps(chunk, separators=separators, sort_keys=sort_keys)[1:-1]
        yield "]"
    else:
        yield json.dumps(obj, separators=separators, sort_keys=sort_keys)


def _lazy(obj: Any) -> bool:
    return isinstance(obj, Sequence) and not isinstance(obj, (str, bytes, list, tuple))


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide what a model computes, for the record."""
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found
