"""The tapped model's rows of the chosen images, computed as `extract` computes codes: resumable, stored by rows.

`TapsJob` is an extract job whose runner is the tapped model, so the same engine reads and
decodes the images, the same writer keeps the rows on disk as they come, and an interrupted
`advise` resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cnncodes.advise.network import TapLayout, taps_runner
from cnncodes.codes.engines.job import CodeJob
from cnncodes.codes.engines.local import LocalEngine
from cnncodes.codes.resume import compute_codes
from cnncodes.core import files as artifacts
from cnncodes.data.decode import BadImage
from cnncodes.runtime.runners import Runner


@dataclass(kw_only=True)
class TapsJob(CodeJob):
    """Rows of the tapped model of `layout`, at the extractor `spec`'s input size, resize and weights."""

    layout: TapLayout

    @cached_property
    def runner(self) -> Runner:
        """Built on first use only: a resumed run with every row stored never loads it."""
        return taps_runner(
            self.layout, self.spec.recorded_weights, identity=self.spec.network_key, runtime=self.runtime
        )

    @property
    def dim(self) -> int:
        """Numbers per row, from the layout: a resumed run with every row stored never loads the model."""
        return self.layout.width

    @property
    def key(self) -> str:
        """Equal keys mean equal rows: the layout and the extractor whose weights and pixels it uses."""
        return artifacts.sha256_json([self.layout.key, self.spec.network_key])

    @property
    def label(self) -> str:
        """What the progress bar says is computed."""
        return f"{self.layout.backbone} at {len(self.layout.layers)} depths"


class TappedRows(NamedTuple):
    """The rows computed, which images they belong to, and the images that failed."""

    rows: np.ndarray  # (kept, width), memory-mapped from the work folder
    kept: np.ndarray  # index into the images given of each row
    failed: list[tuple[int, BadImage]]
    seconds: float


def tapped_rows(
    work: Path, job: TapsJob, file_ids: Sequence[str], *, workers: int | None = None, progress: bool = True
) -> TappedRows:
    """Compute (or find, from an interrupted or earlier run) the tapped rows of every image of `job`.

    Args:
        work: the folder whose cache keeps the rows.
        job: the tapped model and the images.
        file_ids: each image's identity (`plan.file_ids`), which finds its row again.
        workers: decoding threads.
        progress: a progress bar.

    Returns:
        The rows of the images that decoded, memory-mapped.
    """
    done = compute_codes(work, job, file_ids, LocalEngine(workers=workers), progress=progress)
    path, kept = done.writer.finished_file()
    rows = np.load(path, mmap_mode="r")
    return TappedRows(rows, kept, done.failed, done.seconds)
