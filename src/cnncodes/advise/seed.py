"""The codes of the advised commands, stored where their `extract` finds them: it publishes without a forward pass.

A candidate's codes are the tapped rows' columns (`candidates`), equal to what `extract` with
the candidate's options computes. `advise` writes them into the cache of the features folder
each printed `extract` command names, as the rows of an interrupted run of that very command:
the same key (the extractor's `key` and the files' ids), one stored view per size. Running
the command then finds every row done and only publishes the folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cnncodes.advise.candidates import Candidate
from cnncodes.advise.network import TapLayout
from cnncodes.codes.layout import CACHE_DIR
from cnncodes.codes.resume import id_digests, writer_key
from cnncodes.codes.spec import ExtractorSpec
from cnncodes.codes.store import FeatureWriter


def stored_rows(candidate: Candidate, rows: np.ndarray, layout: TapLayout) -> np.ndarray:
    """The rows `extract` stores for the candidate: each size's code side by side (its views), or the one code.

    Args:
        candidate: the setting.
        rows: (n, width) tapped rows.
        layout: their layout.

    Returns:
        (n, sizes × dimensions) float32.
    """
    per_size = Candidate(backbone=candidate.backbone, layers=candidate.layers, pooling=candidate.pooling, sizes="kept")
    return per_size.codes(rows, layout).astype(np.float32)


def seed_features(
    folder: Path, spec: ExtractorSpec, file_ids: Sequence[str], positions: np.ndarray, stored: np.ndarray
) -> bool:
    """Store rows as those of an interrupted `extract` of `spec` into `folder`, a folder nothing else has written.

    Args:
        folder: the features folder the command writes.
        spec: the extractor the command makes (`ExtractorSpec.create` with its options).
        file_ids: every usable image's id, in the plan's order (`plan.file_ids`).
        positions: the rows given, as positions in `file_ids`.
        stored: (len(positions), dim) their rows (`stored_rows`).

    Returns:
        Whether rows were stored: a folder that exists already (features, rows of another run, or
        of an earlier advice, which stay valid for any split) is left as it is.
    """
    if folder.exists() and any(folder.iterdir()):
        return False
    ids = id_digests(file_ids)
    writer = FeatureWriter(folder / CACHE_DIR, writer_key(spec.key, ids), len(ids), stored.shape[1], ids, spec.key)
    writer.write(positions, stored)
    writer.sync()
    writer.save_clock()
    return True
