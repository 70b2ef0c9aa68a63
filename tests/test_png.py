"""The simple-PNG decoder (utils.data.png): Pillow's pixels for the PNGs it takes, None for every PNG it
must leave to Image.open, and open_image taking it without Image.open."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import utils.data.decode
from utils.data.decode import load_image, open_image
from utils.data.png import simple_png


def png(img: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    img.save(out, "PNG", **options)
    return out.getvalue()


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk after the signature."""
    out, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append((data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def assemble(parts: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG of these chunks, each with its right CRC."""
    body = b"".join(struct.pack(">I", len(p)) + k + p + struct.pack(">I", zlib.crc32(k + p)) for k, p in parts)
    return b"\x89PNG\r\n\x1a\n" + body


def pillow(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img


def random_image(rng: np.random.Generator, mode: str, smooth: bool) -> Image.Image:
    h, w = (int(v) for v in rng.integers(1, 90, size=2))
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if smooth:  # runs of similar values: the encoder picks Sub/Up/Average/Paeth row filters
        arr = np.cumsum(arr // 16, axis=1, dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def row_filters(data: bytes, img: Image.Image) -> set[int]:
    """The PNG row filters (0 none ... 4 Paeth) an encoded image used."""
    raw = zlib.decompress(b"".join(p for k, p in chunks(data) if k == b"IDAT"))
    stride = 1 + img.width * len(img.getbands())
    return set(raw[::stride])


def test_pixels_are_pillows_for_every_filter_and_compression() -> None:
    rng = np.random.default_rng(0)
    filters: set[int] = set()
    for i in range(120):
        img = random_image(rng, "L" if i % 2 else "RGB", smooth=i % 3 != 0)
        data = png(img, optimize=i % 4 == 0, compress_level=i % 10, **({"dpi": (72, 72)} if i % 5 == 0 else {}))
        fast, ref = simple_png(data), pillow(data)
        assert fast is not None, i  # every one of these is a simple PNG
        assert (fast.mode, fast.size, fast.tobytes()) == (ref.mode, ref.size, ref.tobytes()), i
        filters |= row_filters(data, img)
    assert filters == {0, 1, 2, 3, 4}  # every row filter was undone
    assert simple_png(png(Image.new("L", (1, 1), 7))).getpixel((0, 0)) == 7


def test_split_image_data_and_neutral_chunks_are_taken() -> None:
    img = random_image(np.random.default_rng(1), "RGB", smooth=True)
    parts = chunks(png(img, compress_level=1))
    data = b"".join(p for k, p in parts if k == b"IDAT")
    cut = len(data) // 3
    split = [parts[0], (b"gAMA", struct.pack(">I", 45455)), (b"IDAT", data[:cut]), (b"IDAT", b""), (b"IDAT", data[cut:]),
             (b"tIME", bytes(7)), (b"IEND", b"")]
    fast = simple_png(assemble(split))
    assert fast is not None and fast.tobytes() == img.tobytes() == pillow(assemble(split)).tobytes()


def ihdr_with(data: bytes, offset: int, value: int) -> bytes:
    """The PNG with one byte of its IHDR changed (and the IHDR's CRC made right again)."""
    parts = chunks(data)
    header = bytearray(parts[0][1])
    header[offset] = value
    return assemble([(b"IHDR", bytes(header)), *parts[1:]])


def others(tmp: Image.Image) -> dict[str, bytes]:
    """PNGs the simple decoder must leave to Pillow: what they hold changes the pixels, the mode, the
    orientation, or makes Pillow fail."""
    rgb, gray = tmp.convert("RGB"), tmp.convert("L")
    exif = Image.Exif()
    exif[0x0112] = 6
    text = PngImagePlugin.PngInfo()
    text.add_text("Raw profile type exif", "x")
    plain = png(rgb)
    parts = chunks(plain)
    idat = b"".join(p for k, p in parts if k == b"IDAT")
    bad_crc = bytearray(plain)
    bad_crc[29] ^= 1  # the IHDR's CRC
    return {
        "rgba": png(rgb.convert("RGBA")), "la": png(gray.convert("LA")), "palette": png(rgb.convert("P")),
        "one-bit": png(gray.convert("1")), "16-bit": png(Image.fromarray(np.asarray(gray).astype(np.uint16) * 257)),
        "transparency": png(gray, transparency=3), "exif": png(rgb, exif=exif.tobytes()), "text": png(rgb, pnginfo=text),
        "icc": png(rgb, icc_profile=b"not really a profile"), "interlaced": ihdr_with(plain, 12, 1),
        "two-bit": ihdr_with(png(gray), 8, 2), "bad header crc": bytes(bad_crc),
        "compression method 1": ihdr_with(plain, 10, 1), "filter method 1": ihdr_with(plain, 11, 1),
        "zero width": ihdr_with(ihdr_with(ihdr_with(ihdr_with(plain, 0, 0), 1, 0), 2, 0), 3, 0),
        "bad signature": b"\x88" + plain[1:], "cut in its header": plain[:30],
        "header of 12 bytes": b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 12) + plain[12:],
        "truncated": plain[: len(plain) // 2], "no end": plain[:-12],
        "corrupt data": assemble([parts[0], (b"IDAT", idat[:2] + bytes(len(idat) - 2)), (b"IEND", b"")]),
        "short data": assemble([parts[0], (b"IDAT", zlib.compress(zlib.decompress(idat)[:-5])), (b"IEND", b"")]),
        "data split by a chunk": assemble([parts[0], (b"IDAT", idat[:5]), (b"pHYs", bytes(9)), (b"IDAT", idat[5:]),
                                           (b"IEND", b"")]),
        "odd-length gamma": assemble([parts[0], (b"gAMA", bytes(3)), (b"IDAT", idat), (b"IEND", b"")]),
        "apng": png(rgb, save_all=True, append_images=[rgb.rotate(90)]),
        "jpeg": (lambda out: (rgb.save(out, "JPEG"), out.getvalue())[1])(io.BytesIO()),
    }


def test_every_other_png_is_left_to_pillow() -> None:
    for name, data in others(random_image(np.random.default_rng(2), "RGB", smooth=True)).items():
        assert simple_png(data) is None, name


def test_open_image_takes_the_simple_path_without_image_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img = random_image(np.random.default_rng(3), "RGB", smooth=True)
    (tmp_path / "a.PNG").write_bytes(png(img))
    (tmp_path / "rgba.png").write_bytes(png(img.convert("RGBA")))
    reference = pillow(png(img.convert("RGBA")))

    def refuse(*args, **kwargs):
        raise AssertionError("Image.open called")

    big = Image.fromarray(np.random.default_rng(6).integers(0, 256, (300, 300, 3), dtype=np.uint8))
    (tmp_path / "big.png").write_bytes(png(big, compress_level=0))  # over one 64 KiB read

    monkeypatch.setattr(utils.data.decode.Image, "open", refuse)
    assert open_image(tmp_path / "a.PNG").tobytes() == img.tobytes()  # an upper-case suffix too
    assert open_image(tmp_path / "big.png").tobytes() == big.tobytes()
    assert open_image(io.BytesIO(png(img))).tobytes() == img.tobytes()  # an upload, a shard's member
    with pytest.raises(AssertionError, match="Image.open called"):
        open_image(tmp_path / "rgba.png")  # not simple: Pillow's path
    monkeypatch.undo()
    assert open_image(tmp_path / "rgba.png").tobytes() == reference.tobytes()


def test_files_pillow_refuses_fail_as_before(tmp_path: Path) -> None:
    """Whatever the simple decoder leaves, open_image decodes or refuses exactly as Pillow does; the
    messages name the file."""
    for name, data in others(random_image(np.random.default_rng(4), "RGB", smooth=True)).items():
        path = tmp_path / f"{name}.png"
        path.write_bytes(data)
        try:
            expected = pillow(data)
        except Exception as err:  # noqa: BLE001 - whatever Pillow raises, open_image raises alike
            with pytest.raises(type(err)):
                open_image(path)
            continue
        got = open_image(path)
        if name != "exif":  # (turned by its orientation; test_data checks that)
            assert (got.mode, got.tobytes()) == (expected.mode, expected.tobytes()), name
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(OSError, match="truncated"):
        load_image(tmp_path / "truncated.png")


def test_an_image_over_the_pixel_limit_is_refused_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.png"
    path.write_bytes(png(Image.new("L", (40, 30), 9)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
    assert simple_png(path.read_bytes()) is None
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40 * 30)
    assert simple_png(path.read_bytes()).getpixel((39, 29)) == 9


def test_small_file_reads_a_file_whole_or_leaves_a_large_one(tmp_path: Path) -> None:
    from utils.data.decode import small_file

    path = tmp_path / "x.png"
    data = png(random_image(np.random.default_rng(5), "RGB", smooth=False))
    path.write_bytes(data)
    assert small_file(path, len(data)) == data  # one read
    assert small_file(path, len(data), first=16) == data  # several reads
    assert small_file(path, len(data) - 1, first=16) is None  # over the limit: left to Pillow
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        small_file(tmp_path / "nothing.png", 100)
