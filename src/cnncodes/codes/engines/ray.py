"""The Ray engine: checking and forward passes on the actors of a Ray cluster, through Ray Data.

The driver (where `cnncodes extract --engine ray` runs) plans, keeps every cache and
writes every output, exactly as the local engine does; only the work in between moves.
Ray Data streams (row, path) items through `map_batches`: checking in tasks, decoding
and the forward pass in a callable class on a fixed-size actor pool. The ONNX model is
converted once, on the driver, and its bytes shipped to the actors, which never import
TensorFlow. A file that cannot be decoded comes back as a row with its reason, so one
corrupt file never fails a block; rows carry their index and may arrive in any order.

Every node must see the files under the same paths (a shared file system) and have
cnncodes installed (`pip install 'cnncodes[ray]'`).
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import ray

from cnncodes.codes.engines.job import CodeBatch, CodeJob
from cnncodes.codes.reading import Batch, check_file, decode
from cnncodes.core.errors import CnnCodesError
from cnncodes.data.decode import BadImage, Check
from cnncodes.runtime.runners import MirrorAveraged, OnnxRunner, onnx_cache_path

# Items per block of the input dataset at most: the unit Ray Data schedules onto a worker.
BLOCK_ROWS = 512


def _check_reachable(address: str | None, timeout: float = 10.0) -> None:
    """Ray retries an address that does not answer for minutes, printing native warnings: one line instead."""
    host, sep, port = (address or "").removeprefix("ray://").rpartition(":")
    if not (sep and host and port.isdigit()):
        return  # None or "auto": Ray's own choice
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise CnnCodesError(
            f"cannot reach the Ray cluster at {address} ({e}): give the head node's address "
            "(host:6379 by default, as `ray start --head` prints it) and check that the cluster is up"
        ) from None


class RayEngine:
    """Checks and computes codes on the actors of a Ray cluster; connects to it on creation.

    Args:
        workers: actors (default: one per CPU of the cluster).
        address: the cluster (else Ray's own choice: `RAY_ADDRESS`, else the cluster `ray start`
            last started on this machine, else a new local one).
    """

    name: ClassVar[str] = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None):
        address = address or os.environ.get("RAY_ADDRESS") or None
        _check_reachable(address)
        if not ray.is_initialized():
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.ERROR,
                log_to_driver=False,
            )
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # cnncodes shows its own
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        self.cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or self.cpus

    def describe(self) -> dict[str, Any]:
        """The cluster's live nodes, CPUs and the actors used, for meta.json."""
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        return {"name": self.name, "nodes": nodes, "cpus": self.cpus, "workers": self.workers}

    def check(
        self, files: Sequence[Path | str], advance: Callable[[int], None]
    ) -> Iterator[tuple[list[int], list[Check]]]:
        """`check_file` of every file, in Ray Data tasks, as the batches come back.

        Args:
            files: the files to check, under the same paths on every node.
            advance: called with how many more files were checked.

        Yields:
            (positions in `files`, their checks) per batch, in any order.
        """
        if not files:
            return
        checked = _items(np.arange(len(files)), files, self.workers).map_batches(
            _check_batch,
            batch_size=64,
            batch_format="numpy",
            compute=ray.data.TaskPoolStrategy(size=self.workers),
            runtime_env=_object_store_settings(),
        )
        for batch in checked.iter_batches(batch_size=None, batch_format="numpy"):
            found = [
                Check(r or None, h or None, c or None)
                for r, h, c in zip(batch["reason"].tolist(), batch["phash"].tolist(), batch["category"].tolist())
            ]
            advance(len(found))
            yield batch["row"].tolist(), found

    def codes(self, job: CodeJob, rows: np.ndarray) -> Iterator[CodeBatch]:
        """Codes of `rows` from a pool of actors, each running the driver's ONNX model, as they come.

        Args:
            job: what to compute; its runner must be an ONNX model.
            rows: the rows to compute.

        Yields:
            A batch of codes, and the files that failed to decode, per block, in any order.

        Raises:
            CnnCodesError: when the model runs on Keras here.
        """
        model = [ray.put(_onnx_bytes(job))]  # in a list, so each actor fetches it from the object store itself
        coded = _items(rows, job.paths, self.workers).map_batches(
            _Coder,
            batch_size=job.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model": model,
                "size": job.spec.image_size,
                "resize": job.spec.resize,
                "flip": job.spec.flip,
            },
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=1,
            runtime_env=_object_store_settings(),
        )
        for batch in coded.iter_batches(batch_size=None, batch_format="numpy"):
            bad = batch["reason"] != ""
            failed = [
                (int(r), BadImage(str(why), str(category)))
                for r, why, category in zip(batch["row"][bad], batch["reason"][bad], batch["category"][bad])
            ]
            yield CodeBatch(batch["row"][~bad], np.asarray(batch["code"][~bad], dtype=np.float32), failed)


def _items(rows: np.ndarray, files: Sequence[Path | str], workers: int) -> ray.data.Dataset:
    """A dataset of (row, file of that row) as Arrow tables, in enough blocks to keep every worker busy.

    Paths travel as bytes (`_paths` turns them back): a file name that is not UTF-8 is no Arrow string.
    """
    rows = np.asarray(rows, dtype=np.int64)
    size = max(1, min(BLOCK_ROWS, -(-len(rows) // (4 * workers))))
    tables = [
        pa.table(
            {
                "row": rows[i : i + size],
                "path": pa.array([os.fsencode(files[r]) for r in rows[i : i + size]], pa.binary()),
            }
        )
        for i in range(0, len(rows), size)
    ]
    return ray.data.from_arrow(tables)


def _paths(batch: dict[str, np.ndarray]) -> list[str]:
    return [os.fsdecode(p) for p in batch["path"].tolist()]


def _object_store_settings() -> dict[str, Any] | None:
    """The driver's AWS settings (endpoint, region, credentials), so workers read the same object store."""
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    return {"env_vars": aws} if aws else None


def _check_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    checks = [check_file(p) for p in _paths(batch)]
    return {
        "row": batch["row"],
        "reason": np.array([c.reason or "" for c in checks]),
        "category": np.array([c.category or "" for c in checks]),
        "phash": np.array([c.phash or "" for c in checks]),
    }


def _onnx_bytes(job: CodeJob) -> bytes:
    """The converted model, read once on the driver to be shipped to every actor."""
    runner = job.runner
    base = runner.runner if isinstance(runner, MirrorAveraged) else runner
    if not isinstance(base, OnnxRunner):
        raise CnnCodesError(
            f"the Ray engine runs models on ONNX Runtime, and {job.spec.backbone}/{job.spec.layer} "
            "runs on Keras here: use --engine local"
        )
    return onnx_cache_path(job.spec.model_key).read_bytes()  # the int8 model too, at its own key


class _Coder:
    """One actor: decodes its batch with the same `decode` as the local engine and runs the ONNX model."""

    def __init__(self, model: list[ray.ObjectRef], size: int, resize: str, flip: bool):
        with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
            f.write(ray.get(model[0]))
            f.flush()
            runner = OnnxRunner(Path(f.name), threads=1)  # the actor's one CPU
        self.runner = MirrorAveraged(runner) if flip else runner
        self.size, self.resize = size, resize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        decoded = Batch.of(batch["row"].tolist(), [decode(p, self.size, self.resize) for p in _paths(batch)], self.size)
        failed_rows = [row for row, _ in decoded.failed]
        codes = self.runner(decoded.pixels)
        return {
            "row": np.concatenate([decoded.rows, np.array(failed_rows, dtype=np.int64)]),
            "code": np.concatenate([codes, np.zeros((len(failed_rows), self.runner.dim), np.float32)]),
            "reason": np.array([""] * len(decoded.rows) + [str(bad) for _, bad in decoded.failed]),
            "category": np.array([""] * len(decoded.rows) + [bad.category for _, bad in decoded.failed]),
        }
