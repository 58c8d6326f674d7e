"""`python -m cnncodes.child CALL RESULT`: one pickled call in a fresh interpreter, for `runtime.in_child`.

A fresh interpreter started this way imports only what the call needs. multiprocessing's
`spawn` would import the caller's own script again as well, and a notebook user's script
without an `if __name__ == "__main__":` guard would run a second time inside the child.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from .artifacts import write_bytes_atomic


def main(call: Path, result: Path) -> None:
    function, args = pickle.loads(call.read_bytes())
    try:
        outcome: tuple[bool, object] = (True, function(*args))
    except Exception as error:  # handed back to the caller, which raises it there
        outcome = (False, error)
    try:
        data = pickle.dumps(outcome)
    except Exception as error:  # e.g. an exception holding an unpicklable object: its type and text
        data = pickle.dumps((False, RuntimeError(f"{type(error).__name__}: {outcome[1]}")))
    write_bytes_atomic(result, data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
