"""Keeping TensorFlow's native start-up lines off the user's terminal.

TensorFlow's C++ code writes "All log messages before absl::InitializeLog() …" and
"oneDNN custom operations are on …" straight to file descriptor 2 while it loads, whatever
`TF_CPP_MIN_LOG_LEVEL` says, and they bury the progress bars. When TensorFlow is about to be
imported, descriptor 2 is pointed at /dev/null and Python's `sys.stderr` moves to a copy of
the original, so everything Python prints (progress, warnings, errors) still shows. Set
`CNNCODES_VERBOSE=1` (the CLI's `--verbose`) to keep the native lines, e.g. to see why
TensorFlow's own code crashed. Nothing happens where `sys.stderr` is not descriptor 2
(notebooks, captured output), whose native output the user does not see anyway. TensorFlow's
Python-side warning that a function was traced again is dropped too, unless verbose.
"""

from __future__ import annotations

import importlib.abc
import io
import logging
import os
import sys

VERBOSE_ENV = "CNNCODES_VERBOSE"


class _BeforeTensorFlow(importlib.abc.MetaPathFinder):
    """Runs once, just before the first `import tensorflow` is resolved; then steps aside."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "tensorflow":
            sys.meta_path.remove(self)
            if not os.environ.get(VERBOSE_ENV):
                _native_stderr_to_devnull()
        return None


class _NoRetracingNotes(logging.Filter):
    """TensorFlow's warning that a function was traced again, a paragraph per phase or repeat that builds a new
    model, as `finetune` does on purpose: it buried the progress bars (kept with `CNNCODES_VERBOSE=1`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(os.environ.get(VERBOSE_ENV)) or "triggered tf.function retracing" not in record.getMessage()


def silence_tensorflow_start_up() -> None:
    """Arrange for TensorFlow's native start-up lines to be dropped (idempotent; no-op once it is imported)."""
    tf_logger = logging.getLogger("tensorflow")  # TensorFlow's Python-side logger, the same before its import
    if not any(isinstance(f, _NoRetracingNotes) for f in tf_logger.filters):
        tf_logger.addFilter(_NoRetracingNotes())
    if "tensorflow" in sys.modules or any(isinstance(f, _BeforeTensorFlow) for f in sys.meta_path):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the Python-side levels
    sys.meta_path.insert(0, _BeforeTensorFlow())


def _native_stderr_to_devnull() -> None:
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return
    sys.stderr.flush()
    original = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = io.TextIOWrapper(
        os.fdopen(original, "wb", buffering=0),
        encoding=sys.stderr.encoding,
        errors=sys.stderr.errors,
        line_buffering=True,
        write_through=True,
    )
