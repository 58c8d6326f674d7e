"""`finetune --preview-augmentation`: the pipeline's own augmentation drawn on a few images, and no training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnncodes.finetuning.preview import GAP

from .helpers import cli, make_dataset

SIZE = 32
PREVIEW = ["--backbone", "smallcnn", "--weights", "none", "--image-size", SIZE, "--quiet"]


def tiles(png: Path, rows: int, columns: int) -> list[list[np.ndarray]]:
    """The grid's tiles, row by row, after checking the PNG is exactly that grid's size."""
    sheet = np.asarray(Image.open(png).convert("RGB"))
    step = SIZE + GAP
    assert sheet.shape == (rows * step - GAP, columns * step - GAP, 3)
    return [
        [sheet[r * step : r * step + SIZE, c * step : c * step + SIZE] for c in range(columns)] for r in range(rows)
    ]


def test_the_preview_draws_the_pipeline_s_augmentation_and_stops(tmp_path: Path):
    data = make_dataset(tmp_path / "data", per_class=3)
    done = cli("finetune", data, "--out", tmp_path / "models", "--preview-augmentation", tmp_path / "seen", *PREVIEW)
    assert done.exit_code == 0, done.output
    png = tmp_path / "seen" / "augmentation.png"
    assert str(png) in " ".join(done.stdout.split())
    assert not (tmp_path / "models").exists()  # nothing trained, nothing written there

    grid = tiles(png, rows=4, columns=7)
    for row in grid:
        draws = row[1:]
        assert all(not np.array_equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1 :])
        assert all(not np.array_equal(row[0], d) for d in draws)
    assert not np.array_equal(grid[0][0], grid[1][0])  # the rows are different images (one class, then the next)

    plain = cli(
        "finetune",
        data,
        "--out",
        tmp_path / "models",
        "--preview-augmentation",
        tmp_path / "plain",
        "--no-augment",
        *PREVIEW,
    )
    assert plain.exit_code == 0, plain.output
    for row in tiles(tmp_path / "plain" / "augmentation.png", rows=4, columns=7):
        assert all(np.array_equal(row[0], tile) for tile in row[1:])
