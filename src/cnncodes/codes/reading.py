"""Reading images for the forward pass: a file (a path or a URI) to the pixels a network sees, in batches.

Every engine decodes with the same `decode`, so a file gives the same pixels, and the same
reason when it cannot be used, wherever it is read.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes.data.decode import BadImage, Check, check_image, load_square
from cnncodes.data.remote import local_file


def decode(path: Path | str, size: int, resize: str = "crop") -> np.ndarray | BadImage:
    """The pixels a network sees for one file, or why it cannot be used: never raises.

    Args:
        path: a local path or a URI.
        size: the side of the square the image is resized to.
        resize: `crop`, `squash` or `pad`.

    Returns:
        `size`×`size`×3 uint8 pixels, or the `BadImage` that says why the file cannot be used.
    """
    try:
        with local_file(path) as local:
            return load_square(local, size, resize)
    except BadImage as e:
        return e


def check_file(path: Path | str) -> Check:
    """`check_image` of a path or a URI: usable or not, and the perceptual hash.

    Args:
        path: a local path or a URI.

    Returns:
        The check: the reason it cannot be used and its category, or the perceptual hash.
    """
    try:
        with local_file(path) as local:
            return check_image(local)
    except BadImage as e:
        return Check(str(e), None, e.category)


@dataclass
class Batch:
    """Decoded images of one batch; files that failed to decode are in `failed`."""

    rows: np.ndarray
    pixels: np.ndarray
    failed: list[tuple[int, BadImage]] = field(default_factory=list)

    @classmethod
    def of(cls, rows: Sequence[int], decoded: Sequence[np.ndarray | BadImage], size: int) -> Batch:
        """Sort what `decode` returned into pixels and the reasons of the files that failed.

        Args:
            rows: the row of each file.
            decoded: what `decode` returned for each.
            size: the side of the images, for an empty batch's shape.

        Returns:
            The batch.
        """
        good = [(row, d) for row, d in zip(rows, decoded) if isinstance(d, np.ndarray)]
        failed = [(int(row), d) for row, d in zip(rows, decoded) if isinstance(d, BadImage)]
        pixels = np.stack([d for _, d in good]) if good else np.empty((0, size, size, 3), np.uint8)
        return cls(np.array([row for row, _ in good], dtype=np.int64), pixels, failed)


class ImageReader:
    """Decodes files into batches of `size`×`size` pixels on worker threads, a few batches ahead.

    Pillow releases the GIL while it decodes and resizes, so threads overlap with each
    other and with the forward pass that consumes the batches.

    Args:
        paths: the files by row.
        size: the side of the square images.
        resize: `crop`, `squash` or `pad`.
        batch_size: images per batch.
        workers: decoding threads (default: one per core).
    """

    AHEAD = 2  # batches decoded ahead of the one being consumed

    def __init__(
        self,
        paths: Sequence[Path | str],
        size: int,
        resize: str = "crop",
        batch_size: int = 32,
        workers: int | None = None,
    ):
        self.paths = paths
        self.size = size
        self.resize = resize
        self.batch_size = batch_size
        self.workers = workers or os.cpu_count() or 2

    def __call__(self, rows: Sequence[int] | np.ndarray) -> Iterator[Batch]:
        pool = ThreadPoolExecutor(max_workers=self.workers)
        pending: deque = deque()
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                pending.append((chunk, [pool.submit(decode, self.paths[r], self.size, self.resize) for r in chunk]))
                if len(pending) > self.AHEAD:
                    yield self._collect(*pending.popleft())
            while pending:
                yield self._collect(*pending.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _collect(self, chunk: Sequence[int], futures: list) -> Batch:
        return Batch.of(chunk, [f.result() for f in futures], self.size)


class Files(Sequence[str]):
    """The files of a dataset by row, joined to its root on demand: a million rows hold no million paths.

    Args:
        root: the dataset's root (a folder or an object-store prefix).
        names: each row's path under the root.
    """

    def __init__(self, root: Path | str, names: Sequence[str]):
        self.root, self.names = root, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return Files(self.root, self.names[index])
        return str(self.root / self.names[index])
