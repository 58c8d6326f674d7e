"""The local engine, threads of this machine, and `make_engine`, which picks the engine a run asked for."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, get_args

import numpy as np

from cnncodes.codes.engines.job import CodeBatch, CodeJob, Engine
from cnncodes.codes.reading import ImageReader, check_file
from cnncodes.core.choices import EngineName
from cnncodes.core.errors import CnnCodesError
from cnncodes.data.decode import Check

ENGINES: tuple[str, ...] = get_args(EngineName)
# Files checked at a time: the local engine yields its checks, and the plan saves its check cache, per chunk.
CHECK_CHUNK = 4096


@dataclass(kw_only=True)
class LocalEngine:
    """Threads of this machine decode; ONNX Runtime (or Keras) uses all its cores for the forward pass.

    Args:
        workers: decoding and checking threads (default: one per core).
    """

    workers: int | None = None
    name: ClassVar[str] = "local"

    def describe(self) -> dict[str, Any]:
        """This machine and its cores, for meta.json."""
        return {"name": self.name, "nodes": 1, "cpus": os.cpu_count()}

    def check(
        self, files: Sequence[Path | str], advance: Callable[[int], None]
    ) -> Iterator[tuple[list[int], list[Check]]]:
        """`check_file` of every file, a chunk at a time (Pillow decodes without the GIL).

        Args:
            files: the files to check.
            advance: called as each file is checked.

        Yields:
            (positions in `files`, their checks) per chunk of CHECK_CHUNK files.
        """
        with ThreadPoolExecutor(self.workers or os.cpu_count() or 2) as pool:
            for start in range(0, len(files), CHECK_CHUNK):
                chunk = files[start : start + CHECK_CHUNK]
                found = []
                for check in pool.map(check_file, chunk):
                    found.append(check)
                    advance(1)
                yield list(range(start, start + len(chunk))), found

    def codes(self, job: CodeJob, rows: np.ndarray) -> Iterator[CodeBatch]:
        """Codes of `rows`, decoded a few batches ahead of the forward pass.

        Args:
            job: what to compute.
            rows: the rows to compute.

        Yields:
            A batch of codes, and the files that failed to decode, per forward pass.
        """
        reader = ImageReader(job.paths, job.spec.image_size, job.spec.resize, job.batch_size, self.workers)
        for batch in reader(rows):
            yield CodeBatch(batch.rows, job.runner(batch.pixels), batch.failed)


def make_engine(name: str = "local", workers: int | None = None, address: str | None = None) -> Engine:
    """The engine called `name`; Ray is an optional extra, imported only when asked for.

    Args:
        name: `local` or `ray`.
        workers: decoding threads locally, actors on Ray.
        address: the Ray cluster to join (Ray only).

    Returns:
        The engine, connected to its cluster.

    Raises:
        CnnCodesError: for an unknown engine, an address without Ray, or Ray not installed.
    """
    if name == "local":
        if address:
            raise CnnCodesError("--address names a Ray cluster: use it with --engine ray")
        return LocalEngine(workers=workers)
    if name != "ray":
        raise CnnCodesError(f"unknown engine {name!r}: use one of {', '.join(ENGINES)}")
    try:
        from cnncodes.codes.engines.ray import RayEngine
    except ImportError as e:
        raise CnnCodesError(f"--engine ray needs Ray ({e}): install it with pip install 'cnncodes[ray]'") from None
    return RayEngine(workers, address)
