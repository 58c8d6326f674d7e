"""Decoding any image file into clean RGB pixels, or the reason it cannot be used.

Every decode goes through `load_rgb`, so every command sees exactly the same pixels for the
same file; `check_image` judges a file (and hashes it for duplicates) without keeping pixels.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
from PIL import Image, ImageOps

from cnncodes.core.errors import CnnCodesError

# Pillow format names we accept; MPO is the multi-picture JPEG some cameras write.
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP", "GIF", "WEBP", "TIFF"})
Resize = Literal["crop", "squash", "pad"]
RESIZE_MODES: tuple[str, ...] = get_args(Resize)
# Above this many pixels a file is refused as a likely decompression bomb (Pillow's limit).
MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 178_956_970
_WHITE = (255, 255, 255)


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason users see.

    `category` ("missing", "empty", "truncated", "corrupt", "not an image", "unsupported",
    "too large" or, for an object store that does not answer, "unreadable") is what summaries
    count, so no caller reads it back out of the reason's wording.
    """

    def __init__(self, reason: str, category: str):
        super().__init__(reason)
        self.category = category


@dataclass(frozen=True)
class Check:
    """What `check_image` learnt of one file: usable or not (and why: `BadImage`), and its perceptual hash."""

    reason: str | None
    phash: str | None
    category: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


def load_rgb(source: Path | str | bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode any supported image file (a path, or its bytes) into an RGB image, upright, first frame only.

    `draft_size` lets JPEG decode at a reduced scale that is still at least that size on
    both sides, which makes large photos several times cheaper to read. `max_pixels` caps
    the pixels decoded, after that reduction: a service sets it far below the decompression-bomb
    limit, which every decode keeps, because a 3.4-kB lossless WebP can hold 88 million pixels
    (measured: 0.8 GB while it decodes). A progressive JPEG is judged by its full size: libjpeg
    keeps its coefficients at full size whatever the reduction (measured: a 0.8-MB one of 9,400²
    pixels took a 224-px server's peak memory from 398 to 657 MiB). Raises `BadImage` with a reason a user can act on.
    """
    try:
        if (len(source) if isinstance(source, bytes) else Path(source).stat().st_size) == 0:
            raise BadImage("empty file", "empty")
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else Path(source)) as im:
            _check_header(im)
            full = _pixels(im)
            if _held(im, draft_size) > max_pixels:
                held = (
                    f"a progressive JPEG decodes at full size in memory: {full}"
                    if im.info.get("progressive")
                    else f"{_pixels(im)} to decode"
                )
                raise BadImage(f"too large: {held}, over the limit of {max_pixels:,}", "too large")
            im.load()
            return _to_rgb(ImageOps.exif_transpose(im))
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage("file not found", "missing") from None
    except IsADirectoryError:
        raise BadImage("a folder, not an image file", "not an image") from None
    except Image.DecompressionBombError:  # Pillow's own check, at twice MAX_PIXELS, before ours can run
        raise BadImage(
            f"too large: over the limit of {MAX_PIXELS:,} pixels (decompression bomb?)", "too large"
        ) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)", "not an image") from None
    except Exception as e:
        raise _damaged(e) from None


def pixels_held(source: bytes, *, draft_size: int | None = None) -> int:
    """How many pixels `load_rgb` holds in memory to decode `source`, read from its header alone.

    A service counts them against a request's budget before it decodes anything.

    Args:
        source: the image file's bytes.
        draft_size: as `load_rgb`'s.

    Returns:
        The pixels; 0 when the header cannot be read (`load_rgb` then says why).
    """
    try:
        with Image.open(io.BytesIO(source)) as im:
            return _held(im, draft_size)
    except Exception:
        return 0


def _held(im: Image.Image, draft_size: int | None) -> int:
    """Set the reduced scale a JPEG decodes at; the pixels it holds then (a progressive one: all of them)."""
    full = im.width * im.height
    if draft_size:
        im.draft(None, (draft_size, draft_size))
    return full if im.info.get("progressive") else im.width * im.height


def _check_header(im: Image.Image) -> None:
    if im.format not in IMAGE_FORMATS:
        raise BadImage(f"unsupported format {im.format}", "unsupported")
    width, height = im.size
    if width < 1 or height < 1:
        raise BadImage(f"invalid size {width}x{height}", "corrupt")
    if width * height > MAX_PIXELS:
        raise BadImage(f"too large: {_pixels(im)}, over the limit of {MAX_PIXELS:,} (decompression bomb?)", "too large")


def _pixels(im: Image.Image) -> str:
    return f"{im.width}x{im.height} pixels"


# Pillow's messages that name its internals, in the words a user sees instead.
_PILLOW_WORDS = {
    "MAX_TEXT_CHUNK": "a text chunk too large to read",
    "MAX_TEXT_MEMORY": "too much text in its chunks to read",
}


def _damaged(error: Exception) -> BadImage:
    """What Pillow's own error says about a damaged file, in the reason users see."""
    text = str(error).strip() or type(error).__name__
    text = next((words for internal, words in _PILLOW_WORDS.items() if internal in text), text)
    if "truncated" in text:
        return BadImage(f"truncated file ({text})", "truncated")
    return BadImage(f"corrupt or unreadable image ({text})", "corrupt")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency becomes white, 16-bit is scaled down."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _high_depth_to_rgb(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        background.alpha_composite(rgba)
        return background.convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError:
        raise BadImage(f"unsupported colour mode {im.mode}", "unsupported") from None


def _high_depth_to_rgb(im: Image.Image) -> Image.Image:
    """Integer modes hold 16-bit samples (Pillow's I and I;16); float images are 0–1 or 0–255."""
    values = np.asarray(im, dtype=np.float32)
    scale = (255.0 if values.size and float(np.nanmax(values)) <= 1.0 else 1.0) if im.mode == "F" else 255.0 / 65535.0
    gray = np.clip(np.nan_to_num(values * scale), 0, 255).round().astype(np.uint8)
    return Image.fromarray(gray, mode="L").convert("RGB")


def check_resize(resize: str) -> None:
    if resize not in RESIZE_MODES:
        raise CnnCodesError(f"unknown resize mode {resize!r}: use one of {', '.join(RESIZE_MODES)}")


def to_square(im: Image.Image, size: int, resize: str = "crop") -> np.ndarray:
    """Resize to `size`×`size` pixels as `resize` says, as a uint8 HWC array.

    `crop` takes the centred square (as ImageNet evaluation does, and without the
    aspect-ratio cue a squashed image keeps), `squash` ignores the aspect ratio, `pad`
    keeps the whole image on a white square.
    """
    check_resize(resize)
    target = (size, size)
    if resize == "crop":
        im = ImageOps.fit(im, target, method=Image.Resampling.BILINEAR)
    elif resize == "squash":
        im = im.resize(target, Image.Resampling.BILINEAR)
    else:
        im = ImageOps.pad(im, target, method=Image.Resampling.BILINEAR, color=_WHITE)
    return np.asarray(im, dtype=np.uint8)


def square_box(width: int, height: int, size: int, resize: str = "crop") -> tuple[float, float, float, float]:
    """The part of a `width`×`height` image that `to_square` turns into the network's `size`² square.

    In the image's pixels (left, top, right, bottom), as Pillow computes it: `crop` gives the
    centred square `ImageOps.fit` resizes, `squash` the whole image, `pad` a square reaching
    past the image where the padding is (the network sees white there). A heat map of the
    square lies exactly on this box of the image.

    Args:
        width: the decoded image's width, in pixels.
        height: its height.
        size: the side of the square the network sees.
        resize: `crop`, `squash` or `pad`.

    Returns:
        The box, in the image's pixels (floats: the crop may fall between pixels).
    """
    check_resize(resize)
    if resize == "squash":
        return 0.0, 0.0, float(width), float(height)
    if resize == "crop":
        side = float(min(width, height))
        left, top = (width - side) / 2, (height - side) / 2
        return left, top, left + side, top + side
    # the image's size inside the square and its offset, rounded as `ImageOps.contain` and `ImageOps.pad` round them
    inner = (size, round(height / width * size)) if width > height else (round(width / height * size), size)
    x, y = round((size - inner[0]) / 2), round((size - inner[1]) / 2)
    sx, sy = width / inner[0], height / inner[1]
    return -x * sx, -y * sy, (size - x) * sx, (size - y) * sy


def load_square(
    source: Path | str | bytes, size: int, resize: str = "crop", max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """The pixels a network sees for one file (a path, or its bytes): decoded, upright, RGB, `size`×`size`."""
    return to_square(load_rgb(source, draft_size=size, max_pixels=max_pixels), size, resize)


def check_image(path: Path | str) -> Check:
    """Decode a file once, fully, to learn whether it is usable and its perceptual hash."""
    import imagehash  # pulls in SciPy and PyWavelets: only the split needs it, not predict

    try:
        im = load_rgb(path, draft_size=64)
    except BadImage as e:
        return Check(str(e), None, e.category)
    return Check(None, str(imagehash.phash(im)))


def check_images(paths: Sequence[Path], workers: int, on_done: Callable[[int], None] | None = None) -> list[Check]:
    """`check_image` over many files in parallel threads (Pillow decodes without the GIL)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checks = []
        for check in pool.map(check_image, paths):
            checks.append(check)
            if on_done:
                on_done(1)
    return checks
