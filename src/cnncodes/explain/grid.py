"""Pictures of a layer's channels side by side, each captioned: one PNG, written atomically."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cnncodes.core.files import write_bytes_atomic

# The most tiles a row holds: 64 channels make an 8 x 8 grid.
MAX_COLUMNS = 8
# Pixels under each tile for its caption, and between tiles.
_CAPTION = 14
_GAP = 2


def write_grid(path: Path, tiles: Sequence[np.ndarray], captions: Sequence[str], *, cell: int) -> list[tuple[int, int]]:
    """Write `tiles` as a grid PNG at `path`, row by row, as square as it can be up to `MAX_COLUMNS` wide.

    A tile of another size than `cell` is resized with nearest neighbours, so a 7 x 7 feature
    map shows its 49 cells rather than a blur that suggests detail the network never had.

    Args:
        path: the PNG to write.
        tiles: uint8 RGB pictures, (height, width, 3) each.
        captions: one short line under each tile (a channel index).
        cell: the side of each tile in the grid, in pixels.

    Returns:
        Each tile's (row, column) in the grid, in the order given.
    """
    columns = min(MAX_COLUMNS, math.ceil(math.sqrt(len(tiles))))
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (cell + _GAP) + _GAP, rows * (cell + _CAPTION + _GAP) + _GAP), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    places = [divmod(i, columns) for i in range(len(tiles))]
    for (row, column), tile, caption in zip(places, tiles, captions):
        x, y = _GAP + column * (cell + _GAP), _GAP + row * (cell + _CAPTION + _GAP)
        picture = Image.fromarray(tile)
        if picture.size != (cell, cell):
            picture = picture.resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(picture, (x, y))
        draw.text((x + 2, y + cell + 1), caption, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(path, buffer.getvalue())
    return places
