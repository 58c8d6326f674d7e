"""`cnncodes.data.ingest`: finding a dataset's images and decoding any of them into RGB pixels.

Every test writes small real image files with Pillow and reads them back through the
public API. No TensorFlow here.
"""

from __future__ import annotations

import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnncodes.core.errors import CnnCodesError
from cnncodes.data.decode import BadImage, check_image, check_images, load_rgb, load_square, to_square
from cnncodes.data.ingest import Dataset, discover, looks_like_image

from .helpers import CLASSES, make_dataset, pattern, write_image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
HEX16 = re.compile(r"[0-9a-f]{16}")


def pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "RGB"
    return np.asarray(im)


def jpeg_bytes(tmp_path: Path, size=(120, 90)) -> bytes:
    path = tmp_path / "_real.jpg"
    Image.fromarray(pattern("circles", 7, size=max(size))).resize(size).save(path, quality=90)
    return path.read_bytes()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims `width`×`height` RGB pixels, with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- discover


def test_discover_class_folders_sorted_with_stable_order(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=3)
    ds = discover(root)
    assert isinstance(ds, Dataset)
    assert ds.classes == sorted(CLASSES)
    assert len(ds) == 9
    assert ds.root == root.resolve()
    # by class, then path; POSIX paths relative to the root
    assert ds.labels == sorted(ds.labels)
    assert ds.paths == sorted(ds.paths, key=lambda p: (p.split("/")[0], p))
    assert all(p.startswith(f"{label}/") for p, label in zip(ds.paths, ds.labels))
    assert ds.paths[:3] == ["circles/circles_00.jpg", "circles/circles_01.png", "circles/circles_02.jpg"]
    # discovering again gives exactly the same listing
    assert discover(str(root)) == ds


def test_discover_nested_hidden_by_content_and_fake_files(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=2)
    # nested folders under a class belong to the class
    write_image(root / "stripes" / "2020" / "june" / "deep.png", "stripes", seed=900)
    # hidden files and folders are ignored, at every level
    write_image(root / "stripes" / ".hidden.png", "stripes", seed=901)
    write_image(root / "stripes" / ".cache" / "thumb.png", "stripes", seed=902)
    write_image(root / ".git" / "x.png", "stripes", seed=903)
    # a PNG saved under a .jpg name
    write_image(root / "squares" / "really_png.jpg", "squares", seed=904, fmt="PNG")
    # a JPEG with no extension at all, found by its magic bytes
    write_image(root / "squares" / "noext", "squares", seed=905, fmt="JPEG")
    # a text file without an image name is no candidate; one named .jpg is
    (root / "circles" / "README").write_text("notes about the circles\n")
    (root / "circles" / "notes.txt").write_text("more notes\n")
    (root / "circles" / "fake.jpg").write_text("this is text, not a JPEG\n")

    ds = discover(root)
    assert ds.classes == ["circles", "squares", "stripes"]
    assert ".git" not in ds.classes
    found = dict(zip(ds.paths, ds.labels))
    assert found["stripes/2020/june/deep.png"] == "stripes"
    assert not any("/." in p or p.startswith(".") for p in found)
    assert found["squares/really_png.jpg"] == "squares"
    assert found["squares/noext"] == "squares"
    assert "circles/README" not in found and "circles/notes.txt" not in found
    assert found["circles/fake.jpg"] == "circles"
    assert len(ds) == 6 + 4

    # the mislabelled PNG and the extension-less JPEG decode fine
    assert load_rgb(ds.root / "squares/really_png.jpg").size == (48, 48)
    assert load_rgb(ds.root / "squares/noext").size == (48, 48)
    assert check_image(ds.root / "squares/noext").ok
    # the text file named .jpg is rejected when checked
    check = check_image(ds.root / "circles/fake.jpg")
    assert not check.ok and check.phash is None
    assert "not an image" in check.reason


def test_looks_like_image_by_name_or_magic(tmp_path):
    write_image(tmp_path / "png_noext", fmt="PNG")
    write_image(tmp_path / "webp_noext", fmt="WEBP")
    write_image(tmp_path / "tiff_noext", fmt="TIFF")
    write_image(tmp_path / "bmp_noext", fmt="BMP")
    write_image(tmp_path / "gif_noext", fmt="GIF")
    (tmp_path / "text").write_text("just text")
    (tmp_path / "named.JPEG").write_text("text with an image name")
    (tmp_path / "empty").write_bytes(b"")
    for name in ("png_noext", "webp_noext", "tiff_noext", "bmp_noext", "gif_noext", "named.JPEG"):
        assert looks_like_image(tmp_path / name), name
    for name in ("text", "empty", "missing"):
        assert not looks_like_image(tmp_path / name), name


def test_discover_csv_paths_relative_to_csv_folder(tmp_path):
    write_image(tmp_path / "imgs" / "b1.png", "stripes", seed=1)
    write_image(tmp_path / "imgs" / "a1.jpg", "circles", seed=2)
    write_image(tmp_path / "imgs" / "sub" / "a2.png", "circles", seed=3)
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "path,label,extra\nimgs/b1.png,bees,x\nimgs/sub/a2.png,ants,y\n imgs/a1.jpg , ants ,z\n,ants,\n"
    )

    ds = discover(csv_path)
    assert ds.root == tmp_path.resolve()
    assert ds.classes == ["ants", "bees"]
    assert list(zip(ds.paths, ds.labels)) == [
        ("imgs/a1.jpg", "ants"),
        ("imgs/sub/a2.png", "ants"),
        ("imgs/b1.png", "bees"),
    ]
    for p in ds.paths:
        assert load_rgb(ds.root / p).size == (48, 48)
    assert ds.skipped == [("line 5", "line 5: no path", "bad row")]


def test_discover_csv_lists_every_unusable_row_and_reads_one_path_one_way(tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        "path,label\n"
        "a.png,x\n"
        "./b.png,y\n"  # the same file as b.png, which keeps its first spelling
        "b.png,y\n"
        "only_a_path\n"
        "c.png, \n"
        "d.png,x,stray\n"
        '"e\0.png",x\n'
        "f.png,x\0\n"
    )
    ds = discover(csv_path)
    assert list(zip(ds.paths, ds.labels)) == [("a.png", "x"), ("./b.png", "y")]
    assert [(path, reason) for path, reason, category in ds.skipped if category == "bad row"] == [
        ("only_a_path", "line 5: no label"),
        ("c.png", "line 6: no label"),
        ("d.png", "line 7: more fields than the header (an unquoted comma?)"),
        ("e\0.png", "line 8: a NUL byte in the path"),
        ("f.png", "line 9: a NUL byte in the label"),
    ]

    csv_path.write_text("path,label\nb.png,y\n./b.png,x\n")
    with pytest.raises(CnnCodesError, match=r"1 image\(s\) more than one label \(e\.g\. b\.png: x, y\)"):
        discover(csv_path)
    csv_path.write_text('path,label\na.png,x\n"b.png,y\n')
    with pytest.raises(CnnCodesError, match="not a well-formed CSV file \\(line 3: unexpected end of data"):
        discover(csv_path)


@pytest.mark.parametrize("text", ["file,class\na.png,x\n", "path\na.png\n", "label,name\nx,a.png\n", ""])
def test_discover_csv_without_path_and_label_columns(tmp_path, text):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(text)
    with pytest.raises(CnnCodesError, match="path"):
        discover(csv_path)


def test_discover_csv_with_no_rows(tmp_path):
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label\n")
    with pytest.raises(CnnCodesError, match="no images"):
        discover(csv_path)


def test_discover_missing_folder(tmp_path):
    with pytest.raises(CnnCodesError, match="does not exist"):
        discover(tmp_path / "nope")


def test_discover_folder_without_class_subfolders(tmp_path):
    write_image(tmp_path / "data" / "a.png")
    write_image(tmp_path / "data" / "b.png", seed=1)
    (tmp_path / "data" / ".hidden").mkdir()
    with pytest.raises(CnnCodesError, match="no class sub-folders"):
        discover(tmp_path / "data")


def test_discover_empty_class_folder(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=2)
    (root / "zebras").mkdir()
    (root / "zebras" / "readme.txt").write_text("no images here")
    write_image(root / "zebras" / ".hidden.png")
    with pytest.raises(CnnCodesError, match="zebras"):
        discover(root)


def test_discover_on_an_image_file_is_a_user_error(tmp_path):
    """Passing a photo where a folder or CSV belongs is a CnnCodesError, by name or by content.

    A photo named .csv gets past the suffix check, so the CSV reader itself must refuse its bytes.
    """
    with pytest.raises(CnnCodesError, match="is a file"):
        discover(write_image(tmp_path / "photo.jpg"))
    with pytest.raises(CnnCodesError, match="not a readable UTF-8 CSV"):
        discover(write_image(tmp_path / "photo.csv", fmt="JPEG"))


# --------------------------------------------------------------------------- load_rgb on every mode


def test_load_rgb_plain_formats_exact(tmp_path):
    arr = pattern("squares", 3, size=40)
    for name, kwargs in [("a.png", {}), ("a.bmp", {}), ("a.tif", {}), ("a.webp", {"lossless": True})]:
        Image.fromarray(arr).save(tmp_path / name, **kwargs)
        im = load_rgb(tmp_path / name)
        np.testing.assert_array_equal(pixels(im), arr, err_msg=name)


def test_load_rgb_jpeg_close(tmp_path):
    arr = np.full((32, 48, 3), (200, 80, 30), np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    out = pixels(load_rgb(tmp_path / "a.jpg"))
    assert out.shape == (32, 48, 3)
    assert np.abs(out.astype(int) - arr).max() <= 4


def test_load_rgb_grayscale_L(tmp_path):
    gray = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (5, 1))
    Image.fromarray(gray, "L").save(tmp_path / "g.png")
    out = pixels(load_rgb(tmp_path / "g.png"))
    assert out.shape == (5, 25, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_load_rgb_LA_composited_on_white(tmp_path):
    lum = Image.new("L", (4, 2), 0)
    alpha = Image.new("L", (4, 2), 255)
    alpha.putpixel((0, 0), 0)
    Image.merge("LA", (lum, alpha)).save(tmp_path / "la.png")
    assert Image.open(tmp_path / "la.png").mode == "LA"
    out = pixels(load_rgb(tmp_path / "la.png"))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[1, 3]) == (0, 0, 0)


def palette_image() -> Image.Image:
    im = Image.new("P", (6, 4), 0)
    im.putpalette(list(RED) + list(GREEN) + list(BLUE) + [0] * (256 * 3 - 9))
    for x in range(6):
        im.putpixel((x, 1), 1)
        im.putpixel((x, 2), 2)
    return im


def test_load_rgb_palette(tmp_path):
    palette_image().save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = pixels(load_rgb(tmp_path / "p.png"))
    assert tuple(out[0, 0]) == RED and tuple(out[1, 0]) == GREEN and tuple(out[2, 5]) == BLUE


def test_load_rgb_palette_with_transparency_is_white(tmp_path):
    palette_image().save(tmp_path / "pt.png", transparency=1)  # green is transparent
    src = Image.open(tmp_path / "pt.png")
    assert src.mode == "P" and "transparency" in src.info
    out = pixels(load_rgb(tmp_path / "pt.png"))
    assert tuple(out[1, 0]) == WHITE and tuple(out[1, 5]) == WHITE
    assert tuple(out[0, 0]) == RED and tuple(out[2, 0]) == BLUE


def test_load_rgb_rgba_composited_on_white(tmp_path):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)  # fully transparent black -> white
    rgba[0, 1] = (10, 20, 30, 0)  # fully transparent colour -> white
    rgba[0, 2] = (255, 0, 0, 255)  # opaque red stays red
    rgba[1, :] = (0, 0, 0, 128)  # half-transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = pixels(load_rgb(tmp_path / "a.png"))
    assert tuple(out[0, 0]) == WHITE
    assert tuple(out[0, 1]) == WHITE
    assert tuple(out[0, 2]) == RED
    assert np.all(np.abs(out[1].astype(int) - 127) <= 2)


@pytest.mark.parametrize("mode, colour", [("RGB", (0, 0, 0)), ("L", 0)])
def test_load_rgb_png_colour_key_transparency_is_white(tmp_path, mode, colour):
    """A PNG tRNS colour key makes every pixel of that colour transparent; it must come out white.

    RGB and L images carry the key in `info["transparency"]`, not in an alpha band.
    """
    im = Image.new(mode, (4, 4), colour)
    im.putpixel((3, 3), (200, 10, 10) if mode == "RGB" else 200)
    im.save(tmp_path / "key.png", transparency=colour)
    assert Image.open(tmp_path / "key.png").info.get("transparency") == colour
    out = pixels(load_rgb(tmp_path / "key.png"))
    assert tuple(out[0, 0]) == WHITE


def test_load_rgb_cmyk_jpeg_and_tiff(tmp_path):
    cmyk = Image.new("RGB", (16, 16), RED).convert("CMYK")
    cmyk.save(tmp_path / "c.jpg", quality=95)
    cmyk.save(tmp_path / "c.tif")
    for name in ("c.jpg", "c.tif"):
        assert Image.open(tmp_path / name).mode == "CMYK"
        out = pixels(load_rgb(tmp_path / name))
        assert np.abs(out[8, 8].astype(int) - RED).max() <= 6, name


def test_load_rgb_16_bit_png_scaled_down(tmp_path):
    values = np.array([[0, 65535, 32768], [1000, 65535, 0]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = pixels(load_rgb(tmp_path / "g16.png"))
    expected = np.round(values / 257.0)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out[0, 1, 0] == 255 and out[0, 0, 0] == 0
    assert np.all(out[..., 0] == out[..., 1]) and np.all(out[..., 0] == out[..., 2])
    # big-endian 16-bit TIFF too
    Image.frombuffer("I;16B", (3, 2), values.astype(">u2").tobytes(), "raw", "I;16B", 0, 1).save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    np.testing.assert_array_equal(pixels(load_rgb(tmp_path / "g16b.tif")), out)


def test_load_rgb_dark_16_bit_png_stays_dark(tmp_path):
    """A 16-bit value of 255 is 0.4 % of full scale; it must not come out white.

    The scale must not depend on the image's own maximum, or a dark 16-bit image would read
    as 8-bit (255 -> white) while the same value beside a 256 would come out as 1.
    """
    dark = np.array([[0, 255], [128, 10]], dtype=np.uint16)
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    assert Image.open(tmp_path / "dark16.png").mode.startswith("I;16")
    out = pixels(load_rgb(tmp_path / "dark16.png"))
    assert out.max() <= 1


def test_load_rgb_one_bit(tmp_path):
    im = Image.new("1", (8, 4), 0)
    for x in range(4):
        im.putpixel((x, 0), 1)
    for name in ("b.png", "b.bmp", "b.tif"):
        im.save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == "1", name
        out = pixels(load_rgb(tmp_path / name))
        assert tuple(out[0, 0]) == WHITE and tuple(out[0, 7]) == (0, 0, 0) and tuple(out[3, 0]) == (0, 0, 0), name


def test_load_rgb_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 10), RED), Image.new("RGB", (20, 10), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    out = pixels(load_rgb(tmp_path / "anim.gif"))
    assert out.shape == (10, 20, 3)
    assert np.all(out == RED)


def test_load_rgb_applies_exif_orientation(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = RED  # left half
    arr[:, 30:] = BLUE  # right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    assert Image.open(tmp_path / "rot.jpg").size == (60, 40)
    out = pixels(load_rgb(tmp_path / "rot.jpg"))
    assert out.shape == (60, 40, 3)  # width and height swapped
    # turned clockwise: the left half is now on top
    assert np.abs(out[10, 20].astype(int) - RED).max() <= 8
    assert np.abs(out[50, 20].astype(int) - BLUE).max() <= 8
    # and the squared pixels a network sees are upright too
    sq = load_square(tmp_path / "rot.jpg", 16, "squash")
    assert sq[2, 8, 0] > 200 and sq[13, 8, 2] > 200


def test_load_rgb_draft_decodes_large_jpeg_smaller(tmp_path):
    yy, xx = np.mgrid[:1500, :2000]
    arr = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "big.jpg", quality=80)
    assert load_rgb(tmp_path / "big.jpg").size == (2000, 1500)
    w, h = load_rgb(tmp_path / "big.jpg", draft_size=224).size
    assert w < 2000 and h < 1500
    assert w >= 224 and h >= 224
    assert abs(w / h - 4 / 3) < 0.02
    # draft_size is a floor: asking for more never gives less
    w2, h2 = load_rgb(tmp_path / "big.jpg", draft_size=700).size
    assert w2 >= 700 and h2 >= 700


# --------------------------------------------------------------------------- bad files


def test_empty_file(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(BadImage, match="empty"):
        load_rgb(tmp_path / "e.jpg")


def test_truncated_jpeg(tmp_path):
    data = jpeg_bytes(tmp_path)
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(tmp_path / "t.jpg")


def test_truncated_png(tmp_path):
    write_image(tmp_path / "full.png", size=64)
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        load_rgb(tmp_path / "t.png")


def test_random_bytes_named_png(tmp_path):
    (tmp_path / "r.png").write_bytes(np.random.default_rng(1).bytes(3000))
    with pytest.raises(BadImage, match="not an image"):
        load_rgb(tmp_path / "r.png")


def test_text_named_jpg(tmp_path):
    (tmp_path / "t.jpg").write_text("hello\n")
    with pytest.raises(BadImage, match="not an image"):
        load_rgb(tmp_path / "t.jpg")


def test_too_many_pixels_by_limit(tmp_path):
    write_image(tmp_path / "a.png", size=48)
    with pytest.raises(BadImage, match="too large"):
        load_rgb(tmp_path / "a.png", max_pixels=1000)
    assert load_rgb(tmp_path / "a.png", max_pixels=48 * 48).size == (48, 48)


def test_decompression_bomb_header(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    with pytest.raises(BadImage, match="too large"):
        load_rgb(tmp_path / "bomb.png")
    check = check_image(tmp_path / "bomb.png")
    assert not check.ok and "too large" in check.reason


def test_unsupported_format_is_refused(tmp_path):
    Image.fromarray(pattern("stripes", 1)).save(tmp_path / "a.jpg", format="PPM")
    with pytest.raises(BadImage, match="unsupported format"):
        load_rgb(tmp_path / "a.jpg")


# --------------------------------------------------------------------------- check_image(s)


def test_check_image_good_and_bad(tmp_path):
    good = write_image(tmp_path / "good.png", "circles", seed=5)
    check = check_image(good)
    assert check.ok and check.reason is None
    assert HEX16.fullmatch(check.phash)

    (tmp_path / "empty.png").write_bytes(b"")
    data = jpeg_bytes(tmp_path)
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "rand.png").write_bytes(np.random.default_rng(2).bytes(500))
    (tmp_path / "bomb.png").write_bytes(png_header_only(60_000, 60_000))
    for name, words in [
        ("empty.png", "empty"),
        ("trunc.jpg", "truncated"),
        ("rand.png", "not an image"),
        ("bomb.png", "too large"),
    ]:
        check = check_image(tmp_path / name)
        assert not check.ok and check.phash is None, name
        assert words in check.reason and check.category == words, (name, check.reason)


def test_check_image_phash_finds_reencoded_copies(tmp_path):
    arr = pattern("squares", 11, size=96)
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=85)
    Image.fromarray(arr).resize((64, 64)).save(tmp_path / "small.webp")
    write_image(tmp_path / "other.png", "stripes", seed=12, size=96)
    h = {name: int(check_image(tmp_path / name).phash, 16) for name in ("a.png", "a.jpg", "small.webp", "other.png")}

    def dist(a, b):
        return bin(h[a] ^ h[b]).count("1")

    assert dist("a.png", "a.jpg") <= 6
    assert dist("a.png", "small.webp") <= 6
    assert dist("a.png", "other.png") > 6
    # the hash is a pure function of the file
    assert check_image(tmp_path / "a.png").phash == f"{h['a.png']:016x}"


def test_check_images_order_and_on_done(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png", "stripes", seed=i) for i in range(7)]
    (tmp_path / "bad.jpg").write_text("nope")
    paths.insert(3, tmp_path / "bad.jpg")
    calls = []
    checks = check_images(paths, workers=3, on_done=calls.append)
    assert len(calls) == len(paths) and all(n == 1 for n in calls)
    assert [c.ok for c in checks] == [True, True, True, False, True, True, True, True]
    assert [c.phash for c in checks] == [check_image(p).phash for p in paths]
    assert check_images(paths, workers=2)[3].reason == checks[3].reason


# --------------------------------------------------------------------------- to_square / load_square


@pytest.mark.parametrize("resize", ["crop", "squash", "pad"])
@pytest.mark.parametrize("size", [(90, 30), (30, 90), (50, 50)])
def test_to_square_shape_and_dtype(resize, size):
    im = Image.new("RGB", size, RED)
    out = to_square(im, 32, resize)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("resize", ["crop", "squash", "pad"])
def test_load_square_from_file(tmp_path, resize):
    write_image(tmp_path / "a.jpg", size=80)
    out = load_square(tmp_path / "a.jpg", 24, resize)
    assert out.shape == (24, 24, 3) and out.dtype == np.uint8


def test_pad_wide_image_has_white_rows_top_and_bottom():
    out = to_square(Image.new("RGB", (200, 100), RED), 64, "pad")
    assert np.all(out[:12] == 255)  # top band white
    assert np.all(out[-12:] == 255)  # bottom band white
    assert np.all(out[32] == RED)  # middle row is the image
    assert np.all(out[:, 0, 0] == 255) and not np.all(out[:, 0] == 255)  # whole width used


def test_pad_tall_image_has_white_columns():
    out = to_square(Image.new("RGB", (50, 100), BLUE), 40, "pad")
    assert np.all(out[:, :8] == 255) and np.all(out[:, -8:] == 255)
    assert np.all(out[:, 20] == BLUE)


def test_crop_takes_centre_and_squash_keeps_everything():
    arr = np.zeros((100, 300, 3), np.uint8)
    arr[:, :100] = RED
    arr[:, 100:200] = GREEN
    arr[:, 200:] = BLUE
    im = Image.fromarray(arr)
    crop = to_square(im, 30, "crop")
    assert np.all(np.abs(crop[:, 3:-3].astype(int) - GREEN).max(axis=-1) <= 2)
    squash = to_square(im, 30, "squash")
    assert tuple(squash[15, 2]) == RED and tuple(squash[15, 15]) == GREEN and tuple(squash[15, 27]) == BLUE


def test_unknown_resize_mode(tmp_path):
    with pytest.raises(CnnCodesError, match="stretch"):
        to_square(Image.new("RGB", (10, 10)), 8, "stretch")
    write_image(tmp_path / "a.png")
    with pytest.raises(CnnCodesError):
        load_square(tmp_path / "a.png", 8, "zoom")


def test_symlinked_folders_are_followed_once_and_every_other_file_is_accounted_for(tmp_path):
    root = make_dataset(tmp_path / "data", per_class=2)
    elsewhere = tmp_path / "more_stripes"
    write_image(elsewhere / "linked.png", "stripes", seed=950)
    (root / "stripes" / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "stripes" / "again").symlink_to(elsewhere, target_is_directory=True)  # a second path to it
    (root / "stripes" / "loop").symlink_to(root / "stripes", target_is_directory=True)
    (root / "stripes" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "circles" / "squares").symlink_to(root / "squares", target_is_directory=True)  # another class's folder
    (root / "circles" / "notes.txt").write_text("notes\n")
    os.mkfifo(root / "circles" / "pipe")  # no writer: reading it would wait for ever
    (root / "circles" / ".DS_Store").write_bytes(b"\0\0")
    (root / "labels.txt").write_text("not in a class\n")
    write_image(root / ".git" / "x.png", "stripes", seed=951)

    ds = discover(root)
    skipped = {path: reason for path, reason, _ in ds.skipped}
    assert "stripes/again/linked.png" in ds.paths or "stripes/linked/linked.png" in ds.paths
    assert sum(p.endswith("/linked.png") for p in ds.paths) == 1  # one real folder, read once
    assert "already read" in skipped["stripes/loop"] and "already read" in skipped["circles/squares"]
    assert ds.labels.count("squares") == 2 and not any(p.startswith("circles/squares/") for p in ds.paths)
    assert "already read" in (skipped.get("stripes/again") or skipped.get("stripes/linked"))
    assert skipped["stripes/gone.png"] == "broken symbolic link"
    assert skipped["circles/notes.txt"].startswith("not an image")
    assert skipped["circles/pipe"].startswith("not a regular file")
    assert skipped["circles/.DS_Store"] == "hidden file"
    assert skipped["labels.txt"] == "not in a class folder"
    assert skipped[".git"] == "hidden folder, not read"
    assert len(ds) == 6 + 1


def test_a_csv_listing_one_image_with_two_labels_is_refused_and_repeated_rows_count_once(tmp_path):
    make_dataset(tmp_path / "data", per_class=2)
    listing = tmp_path / "list.csv"
    listing.write_text(
        "path,label\ndata/stripes/stripes_00.jpg,stripes\ndata/stripes/stripes_00.jpg,stripes\n"
        "data/circles/circles_00.jpg,circles\n"
    )
    assert discover(listing).paths == ["data/circles/circles_00.jpg", "data/stripes/stripes_00.jpg"]
    listing.write_text("path,label\ndata/stripes/stripes_00.jpg,stripes\ndata/stripes/stripes_00.jpg,circles\n")
    with pytest.raises(CnnCodesError, match=r"stripes_00\.jpg: circles, stripes"):
        discover(listing)
