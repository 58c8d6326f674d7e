"""`cnncodes.data.split`: the seeded, stable, duplicate-aware train / val / test split.

Most tests use fake paths with made-up perceptual hashes; the last one runs on the real
Oxford 17 flowers images and their known duplicate pairs. No TensorFlow here.
"""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pytest

from cnncodes.core.errors import CnnCodesError
from cnncodes.data import split as split_module
from cnncodes.data.decode import check_images
from cnncodes.data.ingest import discover
from cnncodes.data.split import (
    DEFAULT_DUP_THRESHOLD,
    Split,
    duplicate_warnings,
    group_duplicates,
    make_split,
    parse_fractions,
    read_split_csv,
)

from .helpers import FLOWERS

DUPLICATES_TSV = FLOWERS.parent / "DUPLICATES.tsv"
SUBSETS = {"train", "val", "test"}


def random_hashes(n: int, seed: int) -> list[str]:
    """`n` distinct 64-bit hashes, pairwise far apart (random bits: about 32 differ)."""
    rng = np.random.default_rng(seed)
    return [rng.bytes(8).hex() for _ in range(n)]


def flip_bits(h: str, bits) -> str:
    v = int(h, 16)
    for b in bits:
        v ^= 1 << int(b)
    return f"{v:016x}"


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def fake_dataset(classes=("ant", "bee", "cat"), per_class=200, seed=0, prefix="img"):
    paths, labels = [], []
    for c in classes:
        for i in range(per_class):
            paths.append(f"{c}/{prefix}_{i:04d}.jpg")
            labels.append(c)
    return paths, labels, random_hashes(len(paths), seed)


def subset_of(split: Split) -> dict[str, str]:
    return dict(zip(split.paths, split.subsets))


# --------------------------------------------------------------------------- parse_fractions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("0.7,0.15,0.15", (0.7, 0.15, 0.15)),
        (" 0.8, 0.1 ,0.1 ", (0.8, 0.1, 0.1)),
        ("0.8,0,0.2", (0.8, 0.0, 0.2)),
        ("0.5,0.25,0.25", (0.5, 0.25, 0.25)),
        ([0.6, 0.2, 0.2], (0.6, 0.2, 0.2)),
    ],
)
def test_parse_fractions_accepts(text, expected):
    got = parse_fractions(text)
    assert isinstance(got, tuple) and len(got) == 3
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "abc",
        "0.7;0.15;0.15",
        "",
        "0.7,0.15,x",
        "70%,15%,15%",  # not numbers
        "0.7,0.3",
        "1",
        "0.5,0.2,0.2,0.1",  # wrong counts
        "-0.1,0.6,0.5",
        "0.8,-0.1,0.3",  # negative
        "0.5,0.2,0.2",
        "0.7,0.2,0.2",
        "70,15,15",  # sums != 1
        "0,0.5,0.5",  # zero train
        "0.8,0.2,0",  # zero test
    ],
)
def test_parse_fractions_rejects(text):
    with pytest.raises(CnnCodesError, match="split"):
        parse_fractions(text)


@pytest.mark.parametrize("text", ["nan,0.5,0.5", "0.5,nan,0.5"])
def test_parse_fractions_rejects_nan(text):
    """NaN passes every comparison, so the check must ask for finite numbers."""
    with pytest.raises(CnnCodesError):
        parse_fractions(text)


# --------------------------------------------------------------------------- make_split basics


def test_make_split_deterministic_and_seeded():
    paths, labels, hashes = fake_dataset(per_class=60)
    a = make_split(paths, labels, hashes, seed=0)
    b = make_split(list(paths), list(labels), list(hashes), seed=0)
    assert a.subsets == b.subsets and a.fingerprint == b.fingerprint
    assert a.paths == paths and a.labels == labels
    assert set(a.subsets) == SUBSETS
    c = make_split(paths, labels, hashes, seed=1)
    moved = sum(x != y for x, y in zip(a.subsets, c.subsets))
    assert moved > len(paths) // 10
    assert c.fingerprint != a.fingerprint


def test_make_split_does_not_depend_on_input_order():
    paths, labels, hashes = fake_dataset(per_class=40)
    a = subset_of(make_split(paths, labels, hashes))
    order = np.random.default_rng(3).permutation(len(paths))
    b = subset_of(make_split([paths[i] for i in order], [labels[i] for i in order], [hashes[i] for i in order]))
    assert a == b


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.5, 0.25, 0.25)])
def test_make_split_follows_fractions(fractions):
    paths, labels, hashes = fake_dataset(per_class=200, seed=5)
    split = make_split(paths, labels, hashes, fractions=fractions)
    counts = split.counts()
    assert sum(counts.values()) == 600
    for subset, frac in zip(("train", "val", "test"), fractions):
        assert abs(counts[subset] / 600 - frac) < 0.1, (subset, counts)
    # and per class too, roughly
    for c in ("ant", "bee", "cat"):
        per = Counter(s for s, label in zip(split.subsets, labels) if label == c)
        assert abs(per["train"] / 200 - fractions[0]) < 0.12, (c, per)
    assert split.warnings == [] and split.n_duplicate_groups == 0


def test_make_split_without_val():
    paths, labels, hashes = fake_dataset(per_class=30, seed=2)
    split = make_split(paths, labels, hashes, fractions=(0.8, 0.0, 0.2))
    assert set(split.subsets) == {"train", "test"}
    assert split.counts()["val"] == 0
    assert split.warnings == []


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("n", [3, 4, 5])
def test_every_class_with_three_images_gets_every_subset(seed, n):
    paths, labels, hashes = fake_dataset(classes=("a", "b", "c", "d"), per_class=n, seed=seed)
    split = make_split(paths, labels, hashes, seed=seed)
    for c in "abcd":
        got = Counter(s for s, label in zip(split.subsets, labels) if label == c)
        assert set(got) == SUBSETS, (c, got)
    assert split.warnings == []


# --------------------------------------------------------------------------- stability


@pytest.mark.parametrize("seed", range(5))
def test_adding_images_never_moves_existing_ones(seed):
    paths, labels, hashes = fake_dataset(per_class=50, seed=seed)
    before = subset_of(make_split(paths, labels, hashes, seed=seed))
    # 20 new images per class whose names sort between, before and after the old ones
    new_paths, new_labels = [], []
    for c in ("ant", "bee", "cat"):
        for i in range(20):
            new_paths.append(f"{c}/{['a', 'img_0010b', 'zz'][i % 3]}_{i:02d}.jpg")
            new_labels.append(c)
    new_hashes = random_hashes(len(new_paths), seed + 100)
    order = np.random.default_rng(seed).permutation(len(paths) + len(new_paths))
    all_paths = [(paths + new_paths)[i] for i in order]
    all_labels = [(labels + new_labels)[i] for i in order]
    all_hashes = [(hashes + new_hashes)[i] for i in order]
    after = subset_of(make_split(all_paths, all_labels, all_hashes, seed=seed))
    assert len(after) == 210
    moved = [p for p in before if before[p] != after[p]]
    assert moved == []
    assert {after[p] for p in new_paths} == SUBSETS


def test_removing_images_never_moves_the_others():
    paths, labels, hashes = fake_dataset(per_class=50, seed=9)
    full = subset_of(make_split(paths, labels, hashes))
    keep = [i for i in range(len(paths)) if i % 4]
    part = subset_of(make_split([paths[i] for i in keep], [labels[i] for i in keep], [hashes[i] for i in keep]))
    assert all(part[p] == full[p] for p in part)


# --------------------------------------------------------------------------- duplicates


def test_duplicates_within_threshold_share_a_subset():
    rng = np.random.default_rng(4)
    base = random_hashes(150, seed=4)
    paths, labels, hashes, pairs = [], [], [], []
    for i, h in enumerate(base):
        label = f"class{i % 3}"
        a, b = f"{label}/orig_{i:03d}.jpg", f"{label}/copy_{i:03d}.png"
        distance = i % (DEFAULT_DUP_THRESHOLD + 1)  # 0 (exact copy) .. the default threshold
        paths += [a, b]
        labels += [label, label]
        hashes += [h, flip_bits(h, rng.choice(64, distance, replace=False))]
        pairs.append((a, b))
    split = make_split(paths, labels, hashes)
    where = subset_of(split)
    assert all(where[a] == where[b] for a, b in pairs)
    assert split.n_duplicate_groups == 150
    assert set(split.subsets) == SUBSETS
    # with grouping off, so many pairs cannot all happen to agree
    off = make_split(paths, labels, hashes, dup_threshold=-1)
    where_off = subset_of(off)
    assert sum(where_off[a] != where_off[b] for a, b in pairs) > 10
    assert off.n_duplicate_groups == 0


def test_duplicate_groups_of_three_and_custom_threshold():
    base = random_hashes(60, seed=8)
    paths, labels, hashes, triples = [], [], [], []
    for i, h in enumerate(base):
        names = [f"k/{i:02d}_{j}.jpg" for j in range(3)]
        paths += names
        labels += ["k"] * 3
        hashes += [h, flip_bits(h, [0, 1, 2, 3]), flip_bits(h, [60, 61, 62, 63, 59, 58, 57, 56, 55])]
        triples.append(names)
    # the second copy is 4 bits from the first; the third 9 bits from it and 13 from the second: too far by default
    default = subset_of(make_split(paths, labels, hashes))
    assert all(default[a] == default[b] for a, b, _ in triples)
    assert any(default[a] != default[c] for a, _, c in triples)
    wide = subset_of(make_split(paths, labels, hashes, dup_threshold=9))
    assert all(wide[a] == wide[b] == wide[c] for a, b, c in triples)


def test_group_duplicates_transitive():
    a = random_hashes(1, seed=1)[0]
    b = flip_bits(a, [0, 1, 2, 3])  # 4 from a
    c = flip_bits(b, [10, 11, 12, 13])  # 4 from b, 8 from a
    d = flip_bits(a, range(20, 50))  # far from all
    e = d  # exact copy of d
    assert hamming(a, c) == 8
    groups = group_duplicates([a, d, b, c, e], 4)
    assert len(groups) == 5
    assert groups[0] == groups[2] == groups[3]
    assert groups[1] == groups[4]
    assert groups[0] != groups[1]
    # chained the other way round too (c listed before a)
    groups = group_duplicates([c, d, b, a], 4)
    assert groups[0] == groups[2] == groups[3] != groups[1]
    # at a threshold of 3, b is no longer within reach of a or c
    groups = group_duplicates([a, b, c], 3)
    assert len(set(groups.tolist())) == 3


def test_group_duplicates_threshold_off_and_exact():
    hashes = ["00000000000000ff"] * 4 + ["ffffffffffffffff"]
    assert len(set(group_duplicates(hashes, -1).tolist())) == 5
    g = group_duplicates(hashes, 0)
    assert len(set(g[:4].tolist())) == 1 and g[4] != g[0]
    assert group_duplicates([], 6).tolist() == []
    assert group_duplicates(["0123456789abcdef"], 6).tolist() == [0]


def test_group_duplicates_large_input_across_blocks():
    base = random_hashes(1500, seed=12)
    hashes = base + [flip_bits(h, [5]) for h in base[:300]]  # copies land in another 1024-block
    groups = group_duplicates(hashes, 6)
    for i in range(300):
        assert groups[i] == groups[1500 + i]
    assert len(set(groups.tolist())) == 1500


def exhaustive_groups(hashes: list[str], threshold: int) -> list[int]:
    """The reference: compare every pair, and give each image the first index of its connected group."""
    values = [int(h, 16) for h in hashes]
    group = list(range(len(values)))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    for i in range(len(values)):
        for j in range(i):
            if (values[i] ^ values[j]).bit_count() <= threshold:
                a, b = root(i), root(j)
                group[max(a, b)] = min(a, b)
    return [root(i) for i in range(len(values))]


def planted_near_duplicates(seed: int, reach: int, n: int = 300) -> list[str]:
    """Random hashes, plus copies (and copies of copies) up to `reach` bits away from earlier ones."""
    rng = np.random.default_rng(seed)
    hashes = random_hashes(n, seed)
    for _ in range(n):
        source = hashes[rng.integers(len(hashes))]
        hashes.append(flip_bits(source, rng.choice(64, rng.integers(0, reach + 1), replace=False)))
    return [hashes[i] for i in rng.permutation(len(hashes))]


@pytest.mark.parametrize("threshold", range(11))
def test_group_duplicates_finds_exactly_the_groups_of_comparing_every_pair(threshold):
    hashes = planted_near_duplicates(seed=threshold, reach=threshold + 2)
    expected = exhaustive_groups(hashes, threshold)
    assert group_duplicates(hashes, threshold).tolist() == expected
    assert len(set(expected)) < len(hashes) - 50  # the planted copies did form groups


def test_group_duplicates_folding_many_edges_keeps_the_groups(monkeypatch):
    hashes = planted_near_duplicates(seed=99, reach=10)
    expected = exhaustive_groups(hashes, 8)
    monkeypatch.setattr(split_module, "_EDGES_IN_MEMORY", 5)  # fold the edges into components after every bucket
    assert group_duplicates(hashes, 8).tolist() == expected


@pytest.mark.parametrize("threshold", [17, 64, -2])
def test_dup_threshold_out_of_range_is_refused(threshold):
    with pytest.raises(CnnCodesError, match="between 0 and 16"):
        group_duplicates(random_hashes(3, seed=0), threshold)


def test_huge_and_cross_class_duplicate_groups_are_warned_about():
    base = random_hashes(200, seed=3)
    copies = [flip_bits(base[0], [i]) for i in range(30)]
    hashes = base + copies + [base[5]]
    paths = [f"p{i:03d}.jpg" for i in range(len(hashes))]
    labels = ["a"] * 230 + ["b"]
    warnings = duplicate_warnings(group_duplicates(hashes, 2), paths, labels, 2)
    assert len(warnings) == 2
    assert "1 duplicate group(s) are very large (the largest: 31 images" in warnings[0]
    assert "--dup-threshold 2" in warnings[0]
    assert "p005.jpg (a) and p230.jpg (b)" in warnings[1]
    assert duplicate_warnings(group_duplicates(base, 2), paths, labels, 2) == []


# --------------------------------------------------------------------------- tiny classes


@pytest.mark.parametrize("seed", range(8))
def test_class_with_one_image_warns_and_goes_to_train(seed):
    paths, labels, hashes = fake_dataset(classes=("big",), per_class=20, seed=seed)
    paths.append("solo/only.jpg")
    labels.append("solo")
    hashes.append(random_hashes(1, seed + 50)[0])
    split = make_split(paths, labels, hashes, seed=seed)
    assert subset_of(split)["solo/only.jpg"] == "train"
    assert len(split.warnings) == 1
    assert "'solo'" in split.warnings[0]
    assert "test" in split.warnings[0]


@pytest.mark.parametrize("seed", range(8))
def test_class_with_two_images_gets_train_and_test(seed):
    paths = ["pair/a.jpg", "pair/b.jpg"]
    split = make_split(paths, ["pair", "pair"], random_hashes(2, seed), seed=seed)
    assert sorted(split.subsets) == ["test", "train"]
    assert any("'pair'" in w and "val" in w for w in split.warnings)


def test_class_of_two_identical_images_is_one_distinct_image():
    h = random_hashes(1, 0)[0]
    split = make_split(["twin/a.jpg", "twin/b.jpg"], ["twin", "twin"], [h, h])
    assert split.subsets == ["train", "train"]
    assert split.n_duplicate_groups == 1
    assert len(split.warnings) == 1 and "'twin'" in split.warnings[0]


# --------------------------------------------------------------------------- split.csv


def test_write_csv_read_split_csv_round_trip(tmp_path):
    paths = ["a/1.jpg", "a/with,comma.png", 'b/quote"d.jpg', "b/ünïcødé/ß.jpg", "c/x y.jpg"]
    labels = ["a", "a", "b", "b", "c, the third"]
    split = Split(paths, labels, ["train", "val", "test", "train", "test"])
    out = tmp_path / "sub" / "split.csv"
    split.write_csv(out)
    assert out.read_text(encoding="utf-8").splitlines()[0] == "path,label,subset"
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label", "subset"] and len(rows) == 6
    back = read_split_csv(out)
    assert back.paths == split.paths and back.labels == split.labels and back.subsets == split.subsets
    assert back.fingerprint == split.fingerprint


def test_round_trip_of_a_made_split(tmp_path):
    paths, labels, hashes = fake_dataset(per_class=30)
    split = make_split(paths, labels, hashes)
    split.write_csv(tmp_path / "split.csv")
    back = read_split_csv(tmp_path / "split.csv")
    assert list(zip(back.paths, back.labels, back.subsets)) == list(zip(paths, labels, split.subsets))
    assert back.counts() == split.counts()
    assert back.fingerprint == split.fingerprint


@pytest.mark.parametrize(
    "text, words",
    [
        ("path,label\na.jpg,x\n", "path,label,subset"),
        ("file,label,subset\na.jpg,x,train\n", "path,label,subset"),
        ("", "path,label,subset"),
        ("path,label,subset\n", "path,label,subset"),
        ("path,label,subset\na.jpg,x,train\nb.jpg,x,training\n", "training"),
        ("path,label,subset\na.jpg,x,TEST\n", "TEST"),
    ],
)
def test_read_split_csv_rejects(tmp_path, text, words):
    (tmp_path / "split.csv").write_text(text, encoding="utf-8")
    with pytest.raises(CnnCodesError, match=words):
        read_split_csv(tmp_path / "split.csv")


def test_read_split_csv_missing_file(tmp_path):
    with pytest.raises(CnnCodesError, match="cannot read"):
        read_split_csv(tmp_path / "nope.csv")


def test_read_split_csv_on_a_binary_file(tmp_path):
    """Giving the wrong file (features.npy, a photo) is a CnnCodesError, not a decoding traceback."""
    np.save(tmp_path / "features.npy", np.arange(10, dtype=np.float32))
    with pytest.raises(CnnCodesError):
        read_split_csv(tmp_path / "features.npy")


def test_fingerprint_identifies_the_split():
    paths, labels, hashes = fake_dataset(per_class=10)
    split = make_split(paths, labels, hashes)
    same = Split(list(reversed(split.paths)), list(reversed(split.labels)), list(reversed(split.subsets)))
    assert same.fingerprint == split.fingerprint  # row order does not matter
    for other in ("train", "val", "test"):
        if other == split.subsets[7]:
            continue
        changed = Split(split.paths, split.labels, [*split.subsets[:7], other, *split.subsets[8:]])
        assert changed.fingerprint != split.fingerprint
    relabelled = Split(split.paths, ["x", *split.labels[1:]], split.subsets)
    assert relabelled.fingerprint != split.fingerprint
    assert len(split.fingerprint) == 64


# --------------------------------------------------------------------------- real data


@pytest.mark.usefixtures("shared_data")
def test_real_flowers_duplicates_share_a_subset():
    with open(DUPLICATES_TSV, newline="", encoding="utf-8") as f:
        pairs = [(r["file_a"], r["file_b"]) for r in csv.DictReader(f, delimiter="\t") if r["dataset"] == FLOWERS.name]
    assert len(pairs) >= 50

    ds = discover(FLOWERS)
    assert len(ds) == 1360 and len(ds.classes) == 17
    checks = check_images([ds.root / p for p in ds.paths], workers=4)
    assert all(c.ok for c in checks)
    hashes = [c.phash for c in checks]
    split = make_split(ds.paths, ds.labels, hashes)
    where = subset_of(split)
    apart = [(a, b, where[a], where[b]) for a, b in pairs if where[a] != where[b]]
    assert apart == []
    groups = group_duplicates(hashes, DEFAULT_DUP_THRESHOLD)
    row = {p: i for i, p in enumerate(ds.paths)}
    assert [(a, b) for a, b in pairs if groups[row[a]] != groups[row[b]]] == []  # every listed pair is found
    listed = {p for pair in pairs for p in pair}
    unlisted = [p for p, g in zip(ds.paths, groups) if p not in listed and (groups == g).sum() > 1]
    assert len(unlisted) <= 4  # and almost nothing else
    assert split.warnings == []
    counts = split.counts()
    assert 0.6 <= counts["train"] / 1360 <= 0.8
    for label in ds.classes:
        assert {s for s, lab in zip(split.subsets, split.labels) if lab == label} == SUBSETS
