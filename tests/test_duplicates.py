"""Duplicate groups a user can see and judge: duplicates.csv, the cross-class warning, the capped thumbnail sheet."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

import cnncodes
from cnncodes.codes.duplicates import SHEET_GROUPS, SHEET_MEMBERS, duplicate_members, sheet_groups, write_duplicates
from cnncodes.codes.reading import Files

from .helpers import FAST_ARGS, cli, fast_spec, write_image


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_extract_lists_each_duplicate_group_and_warns_about_one_spanning_classes(dataset: Path, tmp_path: Path):
    shutil.copy(dataset / "stripes" / "stripes_01.png", dataset / "circles" / "also_circles.png")
    near = np.asarray(Image.open(dataset / "squares" / "squares_02.jpg")).astype(np.int16)
    Image.fromarray(np.clip(near + 12, 0, 255).astype(np.uint8)).save(dataset / "squares" / "brighter.png")
    out = tmp_path / "f"
    result = cli("extract", dataset, "--out", out, *FAST_ARGS)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "circles/also_circles.png (circles) and stripes/stripes_01.png (stripes)" in said
    assert "give a lower --dup-threshold than 4" in said and f"listed in {out / 'duplicates.csv'}" in said
    assert "the first ones drawn in duplicates.png" in said

    rows = read_rows(out / "duplicates.csv")
    split = read_rows(out / "split.csv")
    groups = np.load(out / "groups.npy")
    group_of = {r["path"]: int(g) for r, g in zip(split, groups)}
    assert {r["path"] for r in rows} == {
        "circles/also_circles.png",
        "stripes/stripes_01.png",
        "squares/brighter.png",
        "squares/squares_02.jpg",
    }
    assert all(int(r["group"]) == group_of[r["path"]] for r in rows)  # the ids of groups.npy, to join on
    assert {r["path"]: r["label"] for r in rows}["circles/also_circles.png"] == "circles"
    by_group: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r)
    assert sorted(len(members) for members in by_group.values()) == [2, 2]
    assert all(members[0]["distance"] == "0" for members in by_group.values())  # the first member
    squares = next(m for m in by_group.values() if m[0]["label"] == "squares")
    assert 0 <= int(squares[1]["distance"]) <= 4
    with Image.open(out / "duplicates.png") as sheet:
        assert sheet.format == "PNG" and sheet.height > 2 * 96 and sheet.width > 2 * 96

    (out / "duplicates.csv").unlink()  # a folder published before these files: an up-to-date run adds them
    assert cnncodes.extract(dataset, out, fast_spec(), progress=False).up_to_date
    assert read_rows(out / "duplicates.csv") == rows

    models, report = tmp_path / "models", tmp_path / "report.html"
    assert cli("fit-svm", out, "--out", models, "--classifier", "logreg").exit_code == 0
    assert cli("compare", models, "--html", report).exit_code == 0
    page = report.read_text()
    section = page[page.index("<h2>Near-duplicate groups</h2>") :]
    assert str(out / "duplicates.csv") in section and "src='data:image/png;base64," in section


def test_a_folder_without_duplicates_lists_none_and_says_so_on_its_sheet(dataset: Path, tmp_path: Path):
    assert cli("extract", dataset, "--out", tmp_path / "f", *FAST_ARGS, "--dup-threshold", "0").exit_code == 0
    assert read_rows(tmp_path / "f" / "duplicates.csv") == []
    assert (tmp_path / "f" / "duplicates.csv").read_text() == "group,path,label,distance\n"
    assert Image.open(tmp_path / "f" / "duplicates.png").width > 0


def test_distances_are_to_the_group_s_first_image_even_along_a_chain():
    a, b, c, alone = 0x0, 0b111, 0b111111, 0xFFFF0000  # a–b 3 bits, b–c 3 bits, so a–c is 6
    bits = np.array([alone, c, a, b], dtype=np.uint64)
    groups = np.array([0, 1, 1, 1])
    rows, distance = duplicate_members(groups, bits)
    assert rows.tolist() == [1, 2, 3] and distance.tolist() == [0, 6, 3]  # the first of the group is row 1 (c)


def test_the_sheet_shows_groups_spanning_classes_first_then_the_largest():
    groups = np.repeat(np.arange(30), 2)
    groups[:5] = 99  # group 99: the largest, 5 images
    labels = ["x"] * len(groups)
    labels[-1] = "y"  # the last group spans classes
    rows, _ = duplicate_members(np.unique(groups, return_inverse=True)[1], np.zeros(len(groups), np.uint64))
    member_groups = np.unique(groups, return_inverse=True)[1][rows]
    shown = sheet_groups(member_groups, [labels[i] for i in rows.tolist()])
    assert len(shown) == SHEET_GROUPS
    assert shown[0] == member_groups[-1] and shown[1] == member_groups[0]


def test_at_a_million_images_the_listing_holds_only_the_copies_and_the_sheet_stays_capped(tmp_path: Path):
    n = 1_000_000
    write_image(tmp_path / "data" / "a.png")
    groups = np.arange(n, dtype=np.int64)
    groups[1:40] = 0  # one group of 40
    groups[500_000 : 500_000 + 2 * 30 : 2] = groups[500_001 : 500_001 + 2 * 30 : 2]  # 30 pairs
    groups = np.unique(groups, return_inverse=True)[1]
    bits = np.arange(n, dtype=np.uint64)
    started = time.perf_counter()
    write_duplicates(
        tmp_path, files=Files(tmp_path / "data", ["a.png"] * n), labels=["a"] * n, groups=groups, bits=bits
    )
    assert time.perf_counter() - started < 20
    assert len(read_rows(tmp_path / "duplicates.csv")) == 40 + 2 * 30
    with Image.open(tmp_path / "duplicates.png") as sheet:  # a line per shown group, capped in both directions
        assert SHEET_MEMBERS * 96 < sheet.width < 200 + SHEET_MEMBERS * 110
        assert SHEET_GROUPS * 96 < sheet.height < 10 + SHEET_GROUPS * 150
