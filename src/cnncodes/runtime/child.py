"""One call in a fresh interpreter that exits afterwards: `in_child`, and the child side (`python -m` this module).

A fresh interpreter started this way imports only what the call needs. multiprocessing's
`spawn` would import the caller's own script again as well, and a notebook user's script
without an `if __name__ == "__main__":` guard would run a second time inside the child.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnncodes.core.errors import first_line
from cnncodes.core.files import write_bytes_atomic


def in_child(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a fresh process that exits afterwards, so its memory goes back to the system.

    It runs here instead when TensorFlow is loaded already (a fine-tune, a notebook): a child
    would add only its own start-up, several seconds. So does a closure, which cannot be pickled.
    """
    if "tensorflow" in sys.modules:
        return function(*args)
    try:
        call = pickle.dumps((function, args))
    except (pickle.PicklingError, AttributeError, TypeError):
        return function(*args)
    with tempfile.TemporaryDirectory(prefix="cnncodes-child-") as scratch:
        call_file, result_file = Path(scratch) / "call.pickle", Path(scratch) / "result.pickle"
        call_file.write_bytes(call)
        # the child finds modules where this process does (a notebook's sys.path changes included)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        command = [sys.executable, "-m", "cnncodes.runtime.child", str(call_file), str(result_file)]
        done = subprocess.run(command, env=env, stdout=2, check=False)  # stdout may carry the command's JSON
        if not result_file.is_file():
            raise ChildDied(done.returncode)
        ok, value = pickle.loads(result_file.read_bytes())
    if ok:
        return value
    raise value


class ChildDied(RuntimeError):
    """The child process ended without an answer: killed (the kernel's OOM killer) or crashed."""

    def __init__(self, returncode: int):
        killed = returncode < 0
        super().__init__(
            "the conversion process was killed, perhaps for lack of memory"
            if killed
            else f"the conversion process ended with exit code {returncode} and no answer"
        )
        self.killed = killed


def main(call: Path, result: Path) -> None:
    function, args = pickle.loads(call.read_bytes())
    try:
        outcome: tuple[bool, object] = (True, function(*args))
    except Exception as error:  # handed back to the caller, which raises it there
        outcome = (False, error)
    try:
        data = pickle.dumps(outcome)
        pickle.loads(data)  # many exceptions pickle but cannot be rebuilt: the caller would get that error
    except Exception as unsendable:
        what = outcome[1] if isinstance(outcome[1], BaseException) else unsendable
        data = pickle.dumps((False, RuntimeError(f"{type(what).__name__}: {first_line(what)}")))
    write_bytes_atomic(result, data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
