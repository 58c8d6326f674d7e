"""How many of the known duplicate pairs each `--dup-threshold` finds, and how many groups it adds beyond them.

`../shared/datasets/DUPLICATES.tsv` lists the exact and near-duplicate pairs inside each shared
dataset (found by a 32x32 correlation, independently of cnncodes); the demo's digits, which
hold no listed pair, show how far look-alike images drift into groups. For each threshold, in bits
of perceptual-hash distance, this script groups every dataset's images as `extract` does and
prints, side by side: the listed pairs it puts in one group (recall), the groups of two or more
images it makes, those holding no listed pair (likely false alarms), and the groups that span
two classes (which `extract` warns about).

    python scripts/bench_duplicates.py            # thresholds 0..12
    python scripts/bench_duplicates.py --max 8
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from cnncodes.data.decode import check_images
from cnncodes.data.ingest import discover
from cnncodes.data.split import group_duplicates
from cnncodes.demo import write_digits

# Every one of scikit-learn's 1,797 digits: 8x8 scans that look alike to a perceptual hash.
DIGITS_PER_CLASS = 500

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def listed_pairs() -> dict[str, list[tuple[str, str]]]:
    """The known pairs per dataset, paths relative to the dataset's folder."""
    pairs: dict[str, list[tuple[str, str]]] = defaultdict(list)
    with open(DATASETS / "DUPLICATES.tsv", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            pairs[row["dataset"]].append((row["file_a"], row["file_b"]))
    return pairs


def hashes(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Every usable image's path, label and perceptual hash, as `extract` computes them."""
    dataset = discover(folder)
    checks = check_images([dataset.root / p for p in dataset.paths], workers=os.cpu_count() or 1)
    kept = [(p, label, c.phash) for p, label, c in zip(dataset.paths, dataset.labels, checks) if c.ok]
    return [k[0] for k in kept], [k[1] for k in kept], [str(k[2]) for k in kept]


def row(threshold: int, paths: list[str], labels: list[str], phashes: list[str], pairs) -> dict[str, int]:
    groups = group_duplicates(phashes, threshold)
    where = {p: i for i, p in enumerate(paths)}
    known = [(where[a], where[b]) for a, b in pairs if a in where and b in where]
    found = sum(groups[a] == groups[b] for a, b in known)
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[int(g)].append(i)
    shared = [m for m in members.values() if len(m) > 1]
    with_pair = {int(groups[a]) for a, b in known if groups[a] == groups[b]}
    return {
        "threshold": threshold,
        "listed pairs": len(known),
        "found": int(found),
        "groups": len(shared),
        "groups with no listed pair": sum(int(groups[m[0]]) not in with_pair for m in shared),
        "cross-class groups": sum(len({labels[i] for i in m}) > 1 for m in shared),
        "images in groups": sum(len(m) for m in shared),
        "largest group": max(map(len, shared), default=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=12, help="largest threshold, in bits")
    args = parser.parse_args()
    pairs = listed_pairs()
    with tempfile.TemporaryDirectory() as scratch:
        folders = {name: DATASETS / name for name in sorted(pairs)}
        folders["digits (all 1,797 the demo draws from)"] = write_digits(per_class=DIGITS_PER_CLASS, root=Path(scratch))
        for name, folder in folders.items():
            paths, labels, phashes = hashes(folder)
            rows = [row(t, paths, labels, phashes, pairs.get(name, [])) for t in range(args.max + 1)]
            _print(name, rows, len(paths), len(pairs.get(name, [])))
    print(f"\n(np {np.__version__}; recall = found / listed pairs)")


def _print(name: str, rows: list[dict[str, int]], images: int, listed: int) -> None:
    """One dataset's table, in Markdown."""
    print(f"\n{name}: {images} images, {listed} listed pairs\n")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    main()
