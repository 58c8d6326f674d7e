"""The duplicate groups of a features folder, for a user to see and judge: `duplicates.csv` and `duplicates.png`.

`groups.npy` tells cross-validation which rows belong together; these two files tell a person.
The CSV lists every image that has a copy (so it grows with the duplicates, not with the data),
with its hash distance to its group's first image; the sheet shows a few groups as thumbnails,
those spanning classes first (a labelling mistake or a threshold too high), then the largest,
at most `SHEET_GROUPS` of `SHEET_MEMBERS` images each, so it stays small at any size of data.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnncodes.codes.reading import Files, decode
from cnncodes.core import files as artifacts

DUPLICATES_FILE, SHEET_FILE = "duplicates.csv", "duplicates.png"
DUPLICATES_COLUMNS = ("group", "path", "label", "distance")
SHEET_GROUPS = 20
SHEET_MEMBERS = 8
_THUMB = 96  # pixels of a thumbnail's side
_GAP = 8
_HEADER = 150  # the width of the column naming each group
_LINE = 14  # the height of a caption line


def duplicate_members(groups: np.ndarray, bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows that have a copy, by group (in the order of their first row), and each one's distance to its first.

    Args:
        groups: each row's duplicate group (`groups.npy`).
        bits: each row's perceptual hash (`split.hash_bits`).

    Returns:
        The rows, group after group, each group's first row first; and each one's Hamming distance in bits to that
        first row (0 for the first itself). Only rows with copies are touched: memory follows the duplicates.
    """
    groups = np.asarray(groups, dtype=np.int64)
    if not len(groups):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(np.bincount(groups)[groups] > 1)
    first = np.full(groups.max() + 1, len(groups), dtype=np.int64)
    np.minimum.at(first, groups[rows], rows)
    rows = rows[np.lexsort((rows, first[groups[rows]]))]
    distance = np.bitwise_count(bits[rows] ^ bits[first[groups[rows]]]).astype(np.int64)
    return rows, distance


def write_duplicates(out: Path, *, files: Files, labels: Sequence[str], groups: np.ndarray, bits: np.ndarray) -> None:
    """Write `duplicates.csv` and `duplicates.png` into a features folder (each atomically).

    Args:
        out: the features folder.
        files: each row's image (its path under the dataset's root is the CSV's `path`).
        labels: each row's class.
        groups: each row's duplicate group, as `groups.npy` numbers it (the CSV's `group`).
        bits: each row's perceptual hash (`split.hash_bits`).
    """
    rows, distance = duplicate_members(groups, bits)
    listed = rows.tolist()
    artifacts.write_csv_atomic(
        out / DUPLICATES_FILE,
        DUPLICATES_COLUMNS,
        zip(groups[rows].tolist(), (files.names[i] for i in listed), (labels[i] for i in listed), distance.tolist()),
    )
    shown = sheet_groups(groups[rows], [labels[i] for i in listed])
    buffer = io.BytesIO()
    _sheet(files, labels, rows, distance, groups[rows], shown).save(buffer, format="PNG")
    artifacts.write_bytes_atomic(out / SHEET_FILE, buffer.getvalue())


def sheet_groups(member_groups: np.ndarray, member_labels: Sequence[str]) -> list[int]:
    """The groups `duplicates.png` shows: those spanning classes first (to be judged), then the largest.

    Args:
        member_groups: the group of each row `duplicate_members` returns, in its order.
        member_labels: the class of each of those rows.

    Returns:
        At most `SHEET_GROUPS` group ids, in the sheet's order.
    """
    ids, starts, sizes = np.unique(member_groups, return_index=True, return_counts=True)
    mixed = [len(set(member_labels[s : s + n])) > 1 for s, n in zip(starts.tolist(), sizes.tolist())]
    order = sorted(range(len(ids)), key=lambda k: (not mixed[k], -sizes[k], starts[k]))
    return [int(ids[k]) for k in order[:SHEET_GROUPS]]


def _sheet(
    files: Files,
    labels: Sequence[str],
    rows: np.ndarray,
    distance: np.ndarray,
    member_groups: np.ndarray,
    shown: list[int],
) -> Image.Image:
    """One line per shown group: its number and size, then its first `SHEET_MEMBERS` images with label and distance."""
    font = ImageFont.load_default(size=11)
    cell = _THUMB + 3 * _LINE + _GAP
    widest = max((int(np.sum(member_groups == g)) for g in shown), default=0)
    width = _HEADER + min(widest, SHEET_MEMBERS) * (_THUMB + _GAP)
    sheet = Image.new("RGB", (width, _GAP + max(1, len(shown)) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    if not shown:
        draw.text((_GAP, _GAP), "no duplicate groups", fill="black", font=font)
    for line, group in enumerate(shown):
        top = _GAP + line * cell
        members = np.flatnonzero(member_groups == group)
        classes = sorted({labels[i] for i in rows[members].tolist()})
        header = [f"group {group}", f"{len(members)} images"]
        header += ["classes differ" if len(classes) > 1 else _plain(classes[0], 22)]
        for k, text in enumerate(header):
            colour = "firebrick" if len(classes) > 1 and k == 2 else "black"
            draw.text((_GAP, top + k * _LINE), text, fill=colour, font=font)
        for slot, m in enumerate(members[:SHEET_MEMBERS].tolist()):
            left, row = _HEADER + slot * (_THUMB + _GAP), int(rows[m])
            pixels = decode(files[row], _THUMB, "pad")
            if isinstance(pixels, np.ndarray):
                sheet.paste(Image.fromarray(pixels), (left, top))
            else:
                draw.rectangle((left, top, left + _THUMB - 1, top + _THUMB - 1), outline="gray")
                draw.text((left + 4, top + 4), "unreadable", fill="gray", font=font)
            caption = (_plain(Path(files.names[row]).name, 16), _plain(labels[row], 16), f"{distance[m]} bits")
            for k, text in enumerate(caption):
                draw.text((left, top + _THUMB + 2 + k * _LINE), text, fill="black", font=font)
    return sheet


def _plain(text: str, limit: int) -> str:
    """Text the sheet's font can draw: characters outside ASCII escaped, cut in the middle to `limit` characters."""
    text = text.encode("ascii", "backslashreplace").decode().replace("\r", "\\r").replace("\n", "\\n")
    head = (limit - 2) // 2
    return text if len(text) <= limit else f"{text[:head]}..{text[head + 2 - limit :]}"
