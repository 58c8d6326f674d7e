"""What an engine is given and gives back: the job of computing codes, batches of codes, the `Engine` protocol.

The driver (where `extract` runs) plans, keeps every cache and writes every output; an
engine only checks files and computes codes, on this machine (`local.LocalEngine`) or on a
Ray cluster (`ray.RayEngine`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np

from cnncodes.codes.spec import ExtractorSpec
from cnncodes.data.decode import BadImage, Check
from cnncodes.runtime.runners import Runner


class CodeBatch(NamedTuple):
    """Codes of some rows, as an engine returns them (in any order), and the rows that failed."""

    rows: np.ndarray
    codes: np.ndarray
    failed: list[tuple[int, BadImage]]


@dataclass(kw_only=True)
class CodeJob:
    """What to compute: the extractor (its weights resolved), the files by row, and how many images per forward pass."""

    spec: ExtractorSpec
    runtime: str
    paths: Sequence[Path | str]
    batch_size: int = 32

    @cached_property
    def runner(self) -> Runner:
        """Built on first use only: a run that reuses every row never loads a network."""
        return self.spec.runner(self.spec.recorded_weights, self.runtime, per_view=True)

    @property
    def dim(self) -> int:
        """Numbers per stored row: the runner's, built for it."""
        return self.runner.dim

    @property
    def key(self) -> str:
        """Equal keys mean equal rows: the extractor's `key`."""
        return self.spec.key

    @property
    def label(self) -> str:
        """What the progress bar says is computed."""
        return f"{self.spec.backbone}/{self.spec.layer}"


class Engine(Protocol):
    """Where checking and the forward passes run; the driver keeps the caches and writes every output."""

    name: ClassVar[str]

    def describe(self) -> dict[str, Any]:
        """The engine and the size of its cluster, for meta.json."""
        ...

    def check(
        self, files: Sequence[Path | str], advance: Callable[[int], None]
    ) -> Iterator[tuple[list[int], list[Check]]]:
        """`check_file` of every file, as (positions in `files`, checks) in any order.

        Args:
            files: the files to check.
            advance: called with how many more files were checked.
        """
        ...

    def codes(self, job: CodeJob, rows: np.ndarray) -> Iterator[CodeBatch]:
        """Codes of `rows` of `job.paths`, as they come.

        Args:
            job: what to compute.
            rows: the rows to compute.
        """
        ...
