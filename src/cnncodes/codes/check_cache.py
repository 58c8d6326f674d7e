"""`CheckCache`: what checking each file found, kept so that the next run, or the resumed one, checks only new files."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from cnncodes.core.errors import CnnCodesError


class CheckCache:
    """What checking each file found, in SQLite (standard library): a save costs the new rows only.

    Keyed by the file's identity (`plan.file_ids`), stored as bytes so that any file name,
    even one that is not UTF-8, round-trips.

    Args:
        path: the database file; a damaged one is rebuilt.
    """

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        with self._failures():
            try:
                self.db = self._open(path)
            except sqlite3.OperationalError:  # locked, disk full: not the cache's fault, keep it
                raise
            except sqlite3.DatabaseError:  # a damaged cache is rebuilt, never trusted
                path.unlink(missing_ok=True)
                self.db = self._open(path)

    @contextmanager
    def _failures(self) -> Iterator[None]:
        """SQLite's I/O errors (a full disk, a read-only folder) become one error line that keeps the cache."""
        try:
            yield
        except sqlite3.OperationalError as e:
            raise CnnCodesError(
                f"cannot write the check cache {self.path} ({e}): free some space or make "
                f"{self.path.parent} writable, then run the same command again"
            ) from None

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        db = sqlite3.connect(path)
        db.execute("PRAGMA journal_mode=WAL")  # a commit appends, and a crash loses at most the last ones
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("DROP TABLE IF EXISTS checks")  # version 1, without the category of bad files
        db.execute("CREATE TABLE IF NOT EXISTS checks2 (id BLOB PRIMARY KEY, reason BLOB, category TEXT, phash TEXT)")
        return db

    def get(self, ids: Sequence[str]) -> tuple[list[str | None], list[str | None], list[str | None]]:
        """What checking found of each file; all None for a file not checked yet.

        Args:
            ids: the files' identities.

        Returns:
            Each file's reason to be rejected (None if usable), its category and perceptual hash.
        """
        reasons: list[str | None] = []
        categories: list[str | None] = []
        phashes: list[str | None] = []
        for start in range(0, len(ids), 500):
            keys = [_bytes(i) for i in ids[start : start + 500]]
            rows = self.db.execute(
                f"SELECT id, reason, category, phash FROM checks2 WHERE id IN ({','.join('?' * len(keys))})", keys
            )
            known = {k: (None if r is None else _text(r), c, h) for k, r, c, h in rows}
            for k in keys:
                reason, category, phash = known.get(k, (None, None, None))
                reasons.append(reason)
                categories.append(category)
                phashes.append(phash)
        return reasons, categories, phashes

    def keep_only(self, ids: Sequence[str]) -> None:
        """Forget files gone or changed (an old identity): the cache grows with the data, not with each edit.

        Args:
            ids: the identities of the files there are now.
        """
        with self._failures():
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS listed (id BLOB PRIMARY KEY)")
            self.db.execute("DELETE FROM listed")
            for start in range(0, len(ids), 10_000):
                self.db.executemany(
                    "INSERT OR IGNORE INTO listed VALUES (?)", [(_bytes(i),) for i in ids[start : start + 10_000]]
                )
            self.db.execute("DELETE FROM checks2 WHERE id NOT IN (SELECT id FROM listed)")
            self.db.commit()

    def put(
        self,
        ids: Sequence[str],
        reasons: Sequence[str | None],
        categories: Sequence[str | None],
        phashes: Sequence[str | None],
    ) -> None:
        """Record what checking found of each file, in one commit.

        Args:
            ids: the files' identities.
            reasons: why each cannot be used; None if it can.
            categories: the category of each reason.
            phashes: the perceptual hash of each usable file.
        """
        with self._failures():
            self.db.executemany(
                "INSERT OR REPLACE INTO checks2 VALUES (?, ?, ?, ?)",
                [
                    (_bytes(i), None if r is None else _bytes(r), c, h)
                    for i, r, c, h in zip(ids, reasons, categories, phashes)
                ],
            )
            self.db.commit()

    def close(self) -> None:
        """Close the database; what was put is committed already."""
        self.db.close()


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")
