"""The one train / val / test split every method is scored on.

A file's subset comes from a seeded hash of its relative path (as TensorFlow's retrain.py
did), so adding images never moves existing ones between subsets. Exact and near
duplicates (perceptual hash within a few bits) are grouped and the whole group follows
the hash of its first path: a copy of a test image can never sit in the training set.
(So the one exception to stability: a new near-copy of an existing image whose path sorts
first moves that image's group, which is what keeps the copies together.)
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnncodes.core.errors import CnnCodesError
from cnncodes.core.files import sha256_json, write_csv_atomic

SUBSETS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
# Hamming distance between 64-bit pHashes at or below which two images count as copies: one step
# beyond the 2 bits that find every listed pair of ../shared/datasets; 6 joined 90 of the demo's
# handwritten sixes into one group (scripts/bench_duplicates.py, docs/benchmarks.md).
DEFAULT_DUP_THRESHOLD = 4
MAX_DUP_THRESHOLD = 16
# Duplicate groups larger than this (and than 1% of the images) are worth a warning.
_HUGE_GROUP = 20
# Edges kept before they are folded into components: 64 MB of pairs.
_EDGES_IN_MEMORY = 4_000_000
# Subsets a small class is given first when it cannot have all three.
_FILL_ORDER = ("train", "test", "val")


@dataclass
class Split:
    """The subset of each image, with what a user should know about it."""

    paths: list[str]
    labels: list[str]
    subsets: list[str]
    n_duplicate_groups: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Identifies the split itself: runs with equal fingerprints share a test set."""
        return sha256_json(sorted(zip(self.paths, self.labels, self.subsets)))

    def counts(self) -> dict[str, int]:
        counted = Counter(self.subsets)
        return {s: counted.get(s, 0) for s in SUBSETS}

    def write_csv(self, path: Path) -> None:
        write_csv_atomic(path, ("path", "label", "subset"), zip(self.paths, self.labels, self.subsets))


def parse_fractions(text: str | Sequence[float]) -> tuple[float, float, float]:
    """Read '0.7,0.15,0.15' (train, val, test); they must be non-negative and sum to 1."""
    try:
        parts = [float(p) for p in text.split(",")] if isinstance(text, str) else [float(p) for p in text]
    except ValueError:
        raise CnnCodesError(f"--split must be three numbers like 0.7,0.15,0.15 (got {text!r})") from None
    if (
        len(parts) != 3
        or not all(math.isfinite(p) for p in parts)
        or min(parts) < 0
        or abs(sum(parts) - 1) > 1e-6
        or parts[0] <= 0
        or parts[2] <= 0
    ):
        raise CnnCodesError(
            f"--split takes train,val,test fractions that sum to 1, with train and test above 0 (got {text!r})"
        )
    return parts[0], parts[1], parts[2]


def format_fractions(fractions: Sequence[float]) -> str:
    """The fractions as `--split` takes them (`parse_fractions` reads them back): 0.7,0.15,0.15."""
    return ",".join(f"{f:g}" for f in fractions)


def make_split(
    paths: Sequence[str],
    labels: Sequence[str],
    phashes: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    dup_threshold: int = DEFAULT_DUP_THRESHOLD,
) -> Split:
    """Assign each image a subset; duplicates share one, and every class gets each subset when it can."""
    return assign_subsets(paths, labels, group_duplicates(phashes, dup_threshold), fractions, seed)


def assign_subsets(
    paths: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[int] | np.ndarray,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> Split:
    """The split of images whose duplicate groups are known: each group follows the hash of its first path.

    `fit-svm --repeats` calls it with the groups `extract` saved and other seeds, so every
    repeat keeps copies together exactly as the first split does. Groups are numbered in
    the order of their first image and held in arrays, so memory per image is a few numbers,
    not a dict entry and a list per group.
    """
    group_of, first = _number_groups(groups)
    position = _positions(paths, group_of, first, seed)
    highs = np.cumsum([0.0, *fractions])[1:]
    subset_of = np.minimum(np.searchsorted(highs, position, side="right"), len(SUBSETS) - 1)
    class_names = sorted(set(labels))
    class_of_row = label_indices(labels, class_names)
    warnings = _ensure_each_subset(class_names, class_of_row[first], position, subset_of, fractions)
    subsets = [SUBSETS[k] for k in subset_of[group_of].tolist()]
    n_dup = int((np.bincount(group_of) > 1).sum())
    return Split(list(paths), list(labels), subsets, n_dup, warnings)


def _number_groups(groups: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's group numbered by first appearance, and each group's first row (ascending)."""
    _, first, inverse = np.unique(np.asarray(groups, dtype=np.int64), return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)], np.sort(first)


def _positions(paths: Sequence[str], group_of: np.ndarray, first: np.ndarray, seed: int) -> np.ndarray:
    """Each group's place in [0, 1): the hash of its smallest path; only rows with copies are compared."""
    smallest = [paths[i] for i in first.tolist()]
    copies = np.flatnonzero(np.bincount(group_of)[group_of] > 1)
    for i, g in zip(copies.tolist(), group_of[copies].tolist()):
        smallest[g] = min(smallest[g], paths[i])
    return np.array([_hash_position(p, seed) for p in smallest], dtype=np.float64)


def label_indices(labels: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Each row's index among the class `names`, as an array (no int object per row)."""
    index = {name: i for i, name in enumerate(names)}
    return np.fromiter((index[label] for label in labels), dtype=np.int64, count=len(labels))


def check_dup_threshold(threshold: int) -> None:
    """-1 turns grouping off; above 16 bits apart, pHashes of unrelated images start to count as copies."""
    if not isinstance(threshold, int) or not -1 <= threshold <= MAX_DUP_THRESHOLD:
        raise CnnCodesError(
            f"--dup-threshold must be between 0 and {MAX_DUP_THRESHOLD} bits, or -1 to turn "
            f"duplicate grouping off (got {threshold!r})"
        )


def group_duplicates(phashes: Sequence[str], threshold: int) -> np.ndarray:
    """Group ids such that images within `threshold` bits of each other share one (the group's first index).

    Multi-index hashing instead of comparing every pair: the 64 bits are cut into m
    chunks, and two hashes at most `threshold` bits apart differ in at most `threshold`
    chunks, so they agree exactly on some m - threshold of them (pigeonhole; m = t + 1 is
    the classic case of one chunk). Hashes are bucketed by each such combination of
    chunks by sorting, and only hashes sharing a bucket are compared. The number of chunks
    is chosen for the number of hashes, so buckets stay small: near-linear time and
    memory, and exactly the groups of the exhaustive comparison.
    """
    check_dup_threshold(threshold)
    n = len(phashes)
    if threshold < 0 or n < 2:
        return np.arange(n, dtype=np.int64)
    unique, first_of = np.unique(hash_bits(phashes), return_inverse=True)
    edges = _Edges(len(unique))
    for mask in _chunk_keys(threshold, len(unique)):
        edges.add(*_close_pairs_sharing(unique & mask, unique, threshold))
    component = edges.components()[first_of.reshape(-1)]
    first = np.full(component.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, component, np.arange(n, dtype=np.int64))
    return first[component]


def hash_bits(phashes: Sequence[str]) -> np.ndarray:
    """64-bit hex hashes as unsigned integers; 16-digit ones (imagehash's) are parsed in one go.

    Args:
        phashes: perceptual hashes as hex strings.

    Returns:
        One uint64 per hash, whose XOR's bit count is the hashes' Hamming distance.
    """
    joined = "".join(phashes)
    if len(joined) == 16 * len(phashes):
        try:
            return np.frombuffer(bytes.fromhex(joined), dtype=">u8").astype(np.uint64)
        except ValueError:
            pass  # not all hex digits: let int() name the bad one
    return np.array([int(h, 16) for h in phashes], dtype=np.uint64)


def _chunk_keys(threshold: int, n: int) -> list[np.uint64]:
    """Bit masks of the chunk combinations to bucket by, for the cheapest number of chunks at `n` hashes."""

    def cost(m: int) -> float:
        agree = m - threshold  # chunks that must agree exactly
        keys = math.comb(m, agree)
        return keys * n * 40 + keys * n * n / 2 ** (64 * agree / m + 1)  # sorting + expected candidate pairs

    m = min(range(threshold + 1, min(64, threshold + 12) + 1), key=cost)
    edges = np.linspace(0, 64, m + 1).round().astype(int)
    chunks = [sum(1 << b for b in range(lo, hi)) for lo, hi in itertools.pairwise(edges)]
    return [np.uint64(sum(combo)) for combo in itertools.combinations(chunks, m - threshold)]


def _close_pairs_sharing(keys: np.ndarray, bits: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j) with equal `keys` whose `bits` are within `threshold`, walking each run of a sort."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    lengths = np.diff(np.r_[starts, len(keys)])
    left = np.repeat(starts + lengths, lengths) - 1 - np.arange(len(keys))  # later members of the same run
    found_a, found_b = [], []
    active, step = np.flatnonzero(left >= 1), 1
    while active.size:
        a, b = order[active], order[active + step]
        close = np.bitwise_count(bits[a] ^ bits[b]) <= threshold
        found_a.append(a[close])
        found_b.append(b[close])
        step += 1
        active = active[left[active] >= step]
    empty = np.empty(0, dtype=np.int64)
    return np.concatenate(found_a or [empty]), np.concatenate(found_b or [empty])


class _Edges:
    """Edges of the near-duplicate graph, folded into components whenever they pile up (bounded memory)."""

    def __init__(self, n: int):
        self.n = n
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.count = 0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a.append(a)
        self.b.append(b)
        self.count += len(a)
        if self.count > _EDGES_IN_MEMORY:
            labels = self.components()
            linked = np.flatnonzero(np.bincount(labels)[labels] > 1)
            first = np.full(self.n, self.n, dtype=np.int64)
            np.minimum.at(first, labels[linked], linked)
            self.a, self.b, self.count = [linked], [first[labels[linked]]], len(linked)

    def components(self) -> np.ndarray:
        from scipy.sparse import coo_array
        from scipy.sparse.csgraph import connected_components

        a = np.concatenate(self.a or [np.empty(0, dtype=np.int64)])
        b = np.concatenate(self.b or [np.empty(0, dtype=np.int64)])
        graph = coo_array((np.ones(len(a), dtype=np.int8), (a, b)), shape=(self.n, self.n))
        return connected_components(graph, directed=False)[1]


def duplicate_warnings(
    groups: np.ndarray,
    paths: Sequence[str],
    labels: Sequence[str],
    threshold: int,
    *,
    listing: str | Path | None = None,
) -> list[str]:
    """One line each for duplicate groups a user should look at: huge ones, and ones that span classes.

    A group that spans classes is either a labelling mistake or two different pictures the
    threshold joined: the line names two of its files and the lower threshold to try, so the
    user can tell which by looking.

    Args:
        groups: each image's duplicate group (`group_duplicates`).
        paths: each image's path.
        labels: each image's class.
        threshold: the `--dup-threshold` that made the groups.
        listing: the file that lists every group's members, named in the lines.

    Returns:
        The lines, none when no group needs a look.
    """
    see = ""
    if listing:  # the features folder's duplicates.csv, beside its sheet of thumbnails
        see = f" Every group is listed in {listing}, the first ones drawn in {Path(listing).with_suffix('.png').name}."
    sizes = np.bincount(groups) if len(groups) else np.zeros(0, dtype=np.int64)
    members: dict[int, list[int]] = defaultdict(list)
    for i in np.flatnonzero(sizes[groups] > 1).tolist():  # only rows with copies: memory follows the duplicates
        members[int(groups[i])].append(i)
    groups_of_many = list(members.values())
    warnings = []
    huge = [idx for idx in groups_of_many if len(idx) > max(_HUGE_GROUP, len(paths) // 100)]
    if huge:
        biggest = max(huge, key=len)
        warnings.append(
            f"{len(huge)} duplicate group(s) are very large (the largest: {len(biggest)} images, e.g. "
            f"{paths[biggest[0]]}): is --dup-threshold {threshold} too high for these images?{see}"
        )
    mixed = [idx for idx in groups_of_many if len({labels[i] for i in idx}) > 1]
    if mixed:
        i, j = min(mixed[0], key=labels.__getitem__), max(mixed[0], key=labels.__getitem__)
        warnings.append(
            f"{len(mixed)} duplicate group(s) hold images of different classes, e.g. {paths[i]} "
            f"({labels[i]}) and {paths[j]} ({labels[j]}): the same picture under two labels? If they are different "
            f"pictures, give a lower --dup-threshold than {threshold}.{see}"
        )
    return warnings


def _hash_position(path: str, seed: int) -> float:
    # surrogateescape: a file name that is not UTF-8 hashes as its own bytes instead of failing
    digest = hashlib.sha256(f"{seed}\0{path}".encode(errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _ensure_each_subset(
    class_names: list[str], class_of: np.ndarray, position: np.ndarray, subset_of: np.ndarray, fractions
) -> list[str]:
    """Move the nearest groups of a small class into subsets the hash left empty (`subset_of` is updated).

    Only classes with an empty subset are touched, so for classes large enough to have
    all three, adding images still never moves an existing one. A class is that of its
    groups' first images.
    """
    edges = np.cumsum([0.0, *fractions])
    wanted = [SUBSETS.index(s) for s in _FILL_ORDER if fractions[SUBSETS.index(s)] > 0]
    have = np.zeros((len(class_names), len(SUBSETS)), dtype=np.int64)
    np.add.at(have, (class_of, subset_of), 1)
    by_class = np.argsort(class_of, kind="stable")  # each class's groups in the order of their first image
    starts = np.searchsorted(class_of[by_class], np.arange(len(class_names) + 1))
    warnings = []
    for c, label in enumerate(class_names):
        class_groups = by_class[starts[c] : starts[c + 1]]
        if not len(class_groups):
            continue  # a label seen only among copies of another class's images
        targets = wanted[: len(class_groups)]
        for subset in targets:
            if have[c, subset]:
                continue
            # A donor keeps one group for itself if it is a target; pigeonholes say one exists.
            surplus = [s for s in range(len(SUBSETS)) if have[c, s] > (1 if s in targets else 0)]
            donor = max(surplus, key=lambda s: (have[c, s], -s))
            candidates = class_groups[subset_of[class_groups] == donor]
            places = position[candidates]
            distance = np.maximum(np.maximum(edges[subset] - places, places - edges[subset + 1]), 0.0)
            subset_of[candidates[np.argmin(distance)]] = subset
            have[c, donor] -= 1
            have[c, subset] += 1
        missing = [SUBSETS[s] for s in wanted if not have[c, s]]
        if missing:
            warnings.append(
                f"class {label!r} has only {len(class_groups)} distinct image(s): none in {', '.join(missing)}"
            )
    return warnings


def read_split_csv(path: Path) -> Split:
    """Read a `split.csv` written by `extract`, to score another method on the same test set.

    Rows are read one at a time into three lists, not into a dict each: a features folder of
    a million images loads its split in the memory of its strings.
    """
    paths: list[str] = []
    labels: list[str] = []
    subsets: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.reader(f)
            header = next(reader, [])
            if {"path", "label", "subset"} <= set(header):
                columns = [header.index(c) for c in ("path", "label", "subset")]
                for row in filter(None, reader):  # blank lines are no rows, as for csv.DictReader
                    paths.append(row[columns[0]])
                    labels.append(row[columns[1]])
                    subsets.append(row[columns[2]])
    except OSError as e:
        raise CnnCodesError(f"cannot read split file {path}: {e.strerror}") from None
    except (UnicodeDecodeError, csv.Error, IndexError):
        raise CnnCodesError(f"{path} is not a split file: it is not a UTF-8 CSV of path,label,subset rows") from None
    if not paths:
        raise CnnCodesError(f"{path} is not a split file: it needs path,label,subset columns")
    bad = set(subsets) - set(SUBSETS)
    if bad:
        raise CnnCodesError(f"{path} has unknown subsets {sorted(bad)}: use train, val or test")
    return Split(paths, labels, subsets)
