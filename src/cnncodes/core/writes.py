"""What a failed write tells the user: the file they asked for, and what to do (free space, make a folder writable).

Writes go through temporaries, so the system's error names a hidden file, or nothing at all
(a full disk seen by NumPy): these errors name the output instead, in one line.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

# Errors of a write that the user fixes by freeing space, or by making a folder writable.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
# What NumPy raises, with no errno, when a file takes fewer bytes than it was given: a full disk.
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


class WriteError(OSError):
    """A file that could not be written, named as the user knows it, with what to do about it, in one line.

    Args:
        code: the errno.
        strerror: what the system said.
        path: the file (or folder) the user asked for.
        needed: the bytes the write needed, when known.
        folder: where space is to be freed, or write permission given; default the file's folder.
    """

    def __init__(self, code: int, strerror: str, path: Path, *, needed: int | None = None, folder: Path | None = None):
        super().__init__(code, strerror, str(path))
        self.needed, self.folder = needed, folder or path.parent

    def __str__(self) -> str:
        if self.errno in NO_SPACE:
            space = f" (at least {human_bytes(self.needed)} needed)" if self.needed else ""
            return (
                f"{self.strerror}: '{self.filename}'{space}; free some space in {self.folder} and run the same "
                "command again"
            )
        if self.errno in NOT_WRITABLE:
            return f"{self.strerror}: '{self.filename}'; make {self.folder} writable, or write somewhere else"
        return super().__str__()


def cannot_write(error: OSError, path: Path, *, needed: int | None = None, folder: Path | None = None) -> WriteError:
    """`error`, met while writing `path` (through a temporary, say), as the `WriteError` that names `path`.

    Args:
        error: what the write raised; NumPy's "320 requested and 248 written" (no errno) is a full disk.
        path: the file (or folder) the user asked for.
        needed: the bytes the write needed, when known (an inner `WriteError` may know them).
        folder: where space is to be freed, or write permission given; default the file's folder.

    Returns:
        The error to raise.
    """
    code = error.errno if error.errno is not None else errno.ENOSPC
    return WriteError(
        code,
        error.strerror or os.strerror(code),
        path,
        needed=getattr(error, "needed", None) or needed,
        folder=folder,
    )


@contextmanager
def says_where(path: Path, temporary: Path | str, needed: int | Callable[[], int] | None = None) -> Iterator[None]:
    """An OSError that names no file (a full disk, a quota) or only `temporary` is a `WriteError` naming `path`.

    The command's one error line then says where the write failed, by the name the user knows,
    and what to do: free space (at least `needed` bytes, when known) or make the folder writable.
    `needed` may be a function, called only when a write fails: a hot path counts nothing.
    """
    try:
        yield
    except OSError as e:
        if e.filename is not None and str(e.filename) != str(temporary):
            raise
        if e.errno is None and not _SHORT_WRITE.match(str(e)):
            raise
        raise cannot_write(e, path, needed=needed() if callable(needed) else needed) from None


def human_bytes(n: float) -> str:
    """A size as people read it: 820 bytes, 1.5 KB, 2.3 GB (powers of 1000, as disks are sold).

    Args:
        n: bytes.

    Returns:
        The size in words.
    """
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
