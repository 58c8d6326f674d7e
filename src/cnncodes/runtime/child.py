"""`python -m cnncodes.runtime.child CALL RESULT`: one pickled call in a fresh interpreter, for `runtime.in_child`.

A fresh interpreter started this way imports only what the call needs. multiprocessing's
`spawn` would import the caller's own script again as well, and a notebook user's script
without an `if __name__ == "__main__":` guard would run a second time inside the child.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

from cnncodes.core.errors import first_line
from cnncodes.core.files import write_bytes_atomic


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
