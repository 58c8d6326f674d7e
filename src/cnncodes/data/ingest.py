"""Finding the images of a dataset, before any of them is decoded (`cnncodes.data.decode` decodes them).

A dataset is a folder with one sub-folder per class (nested folders under a class belong
to it) or a CSV file with `path,label` columns. Files are recognised by content, not by
name.
"""

from __future__ import annotations

import csv
import os
import posixpath
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cnncodes.core.errors import CnnCodesError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")


@dataclass(frozen=True)
class Dataset:
    """The images of a dataset before any of them is decoded.

    `paths` are relative to `root` (POSIX form), in a stable order: by class, then path.
    `skipped` lists every other file found as (path, reason, category), so no file
    disappears without a word.
    """

    root: Path
    paths: list[str]
    labels: list[str]
    skipped: list[tuple[str, str, str]] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def __len__(self) -> int:
        return len(self.paths)


def discover(source: Path | str) -> Dataset:
    """List the candidate images of a class-per-folder directory or a `path,label` CSV."""
    source = Path(source)
    if not source.exists():
        raise CnnCodesError(
            f"{source} does not exist: give a folder with one sub-folder per class, or a CSV with path,label columns"
        )
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise CnnCodesError(
                f"{source} is a file: give a folder with one sub-folder per class, or a .csv with path,label columns"
            )
        return _discover_csv(source)
    return _discover_folders(source)


def _discover_folders(root: Path) -> Dataset:
    entries = sorted(root.iterdir())
    class_dirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    if not class_dirs:
        raise CnnCodesError(
            f"{root} has no class sub-folders: put the images of each class in a folder of its own, "
            f"e.g. {root}/cat/1.jpg"
        )
    skipped = [(e.name, *_outside_reason(e)) for e in entries if e not in class_dirs]
    paths: list[str] = []
    labels: list[str] = []
    seen = {_identity(d) for d in class_dirs}  # a link to another class's folder is not read as this class
    for class_dir in class_dirs:
        found, passed_over = scan(class_dir, root, seen)
        if not found:
            raise CnnCodesError(f"class folder {class_dir} has no image files: add images or remove the folder")
        paths += found
        labels += [class_dir.name] * len(found)
        skipped += passed_over
    return Dataset(root.resolve(), paths, labels, skipped)


def _outside_reason(entry: Path) -> tuple[str, str]:
    if entry.name.startswith("."):
        return ("hidden folder, not read" if entry.is_dir() else "hidden file"), "hidden"
    return ("not in a class folder", "outside classes") if entry.exists() else ("broken symbolic link", "broken link")


def _discover_csv(csv_path: Path) -> Dataset:
    """A listing CSV is UTF-8, but a file name in it may not be (the disk's own bytes, as cnncodes writes them)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows, skipped = read_listing(f, str(csv_path))
    except UnicodeDecodeError as e:
        if _holds_nul(csv_path):  # a photo, UTF-16 text: not a CSV of file names
            raise CnnCodesError(f"{csv_path} is not a readable UTF-8 CSV file ({e})") from None
        with open(csv_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            rows, skipped = read_listing(f, str(csv_path))
    return Dataset(csv_path.parent.resolve(), [p for p, _ in rows], [label for _, label in rows], skipped)


def _holds_nul(path: Path, chunk: int = 1 << 20) -> bool:
    with open(path, "rb") as f:
        return any(b"\0" in block for block in iter(lambda: f.read(chunk), b""))


def read_listing(f: TextIO, name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """The (path, label) rows of a `path,label` CSV by label, and its unusable rows as skipped entries.

    A row without a usable path or label is listed, not dropped, so no image a user listed
    disappears without a word. `b.png` and `./b.png` are one image, so it cannot get two
    labels; it keeps its first spelling, which the split's hash and the caches are keyed by.
    """
    labels: dict[str, set[str]] = defaultdict(set)
    spelled: dict[str, str] = {}
    skipped: list[tuple[str, str, str]] = []
    try:
        reader = csv.DictReader(f, strict=True)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise CnnCodesError(
                f"{name} must have a header with 'path' and 'label' columns (found {reader.fieldnames})"
            )
        for row in reader:
            path, label = (row["path"] or "").strip(), (row["label"] or "").strip()
            problem = _bad_row(path, label, None in row)
            if problem:
                skipped.append((path or f"line {reader.line_num}", f"line {reader.line_num}: {problem}", "bad row"))
                continue
            image = path if is_uri(path) else posixpath.normpath(path)
            spelled.setdefault(image, path)
            labels[image].add(label)
    except csv.Error as e:
        raise CnnCodesError(f"{name} is not a well-formed CSV file (line {reader.line_num + 1}: {e})") from None
    if not labels:
        raise CnnCodesError(f"{name} lists no images")
    _refuse_conflicting_labels(name, {spelled[image]: names for image, names in labels.items()})
    rows = [(spelled[image], names.pop()) for image, names in labels.items()]  # one label each, checked above
    return sorted(rows, key=lambda row: (row[1], row[0])), skipped


def is_uri(source: object) -> bool:
    """An object-store address (s3://bucket/key), not a local path."""
    return isinstance(source, str) and "://" in source


def _bad_row(path: str, label: str, extra_fields: bool) -> str | None:
    """Why a CSV row cannot be used, if it cannot: a missing field, a stray comma, a NUL byte."""
    if not path or not label:
        return f"no {'path' if not path else 'label'}"
    if extra_fields:
        return "more fields than the header (an unquoted comma?)"
    for field_name, value in (("path", path), ("label", label)):
        if "\0" in value:
            return f"a NUL byte in the {field_name}"
    return None


def _refuse_conflicting_labels(name: str, labels: dict[str, set[str]]) -> None:
    """One image, one label: a path listed with two labels would train on a contradiction."""
    conflicts = sorted((path, sorted(names)) for path, names in labels.items() if len(names) > 1)
    if conflicts:
        path, names = conflicts[0]
        raise CnnCodesError(
            f"{name} gives {len(conflicts)} image(s) more than one label (e.g. {path}: "
            f"{', '.join(names)}): keep one row per image"
        )


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, recursively and sorted, hidden files and folders left out."""
    return [folder / p for p in scan(folder)[0]]


def scan(
    folder: Path, base: Path | None = None, seen: set[tuple[int, int]] | None = None
) -> tuple[list[str], list[tuple[str, str, str]]]:
    """The image files under `folder` and every other file with the reason and category it is passed over for.

    Paths are POSIX strings relative to `base` (default: `folder`), sorted part by part as
    `Path`s sort: a folder of a million images makes no million `Path` objects. Symbolic links
    are followed (a linked folder of images belongs to its class), each real folder once, so
    a link loop ends; unreadable folders and broken links are reported. `seen` holds the
    folders read already (by device and inode), shared across the classes of one dataset.
    """
    start = base or folder
    images: list[str] = []
    skipped: list[tuple[str, str, str]] = []
    seen = set() if seen is None else seen

    def unreadable(error: OSError) -> None:
        skipped.append((_relative(error.filename, start), f"folder not readable ({error.strerror})", "unreadable"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        here = _relative(dirpath, start)
        prefix = "" if here == "." else f"{here}/"
        identity = _identity(Path(dirpath))
        if identity in seen and dirpath != str(folder):
            skipped.append(
                (here, "symbolic link to a folder already read (a loop, or a second path to it)", "already read")
            )
            dirnames[:] = []
            continue
        seen.add(identity)
        skipped += [(prefix + d, "hidden folder, not read", "hidden") for d in dirnames if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            passed_over = _not_a_candidate(os.path.join(dirpath, name))
            if passed_over:
                skipped.append((prefix + name, *passed_over))
            else:
                images.append(prefix + name)
    images.sort(key=_by_parts)
    skipped.sort(key=lambda entry: (_by_parts(entry[0]), *entry[1:]))
    return images, skipped


def _identity(folder: Path) -> tuple[int, int]:
    st = folder.stat()
    return st.st_dev, st.st_ino


def _relative(path: str, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


def _by_parts(path: str) -> str:
    """A sort key that orders POSIX paths part by part, as `Path`s are ordered.

    No file name holds a NUL, so NUL sorts a separator below every character a name can hold.
    """
    return path.replace("/", "\0")


def _not_a_candidate(path: str) -> tuple[str, str] | None:
    """Why a file is no candidate, and the category summaries count; None for an image."""
    if os.path.basename(path).startswith("."):
        return "hidden file", "hidden"
    if not os.path.exists(path):
        return "broken symbolic link", "broken link"
    if not os.path.isfile(path):  # reading a named pipe's first bytes would wait for a writer for ever
        return "not a regular file (a pipe, socket or device)", "not an image"
    if not looks_like_image(path):
        return "not an image (neither its name nor its first bytes say so)", "not an image"
    return None


def looks_like_image(path: Path | str) -> bool:
    """True for files named like images and for files whose first bytes say they are one."""
    if os.path.splitext(path)[1].lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
