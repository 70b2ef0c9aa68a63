"""The common PNG decoded without Image.open's per-file work: 8-bit gray or RGB, not interlaced,
with no chunk that could change its pixels, mode or orientation.

    img = simple_png(data)    # a loaded PIL image (L or RGB), or None: open the bytes with Pillow

Pillow's PNG plugin reads every chunk through Python (its chunk stream, checksums, info), which on a
small image costs twice what decoding it does. This walks the chunk list itself and hands the image
data to the decoder the plugin uses (Pillow's "zip" decoder, which undoes the PNG row filters), so
the pixels are Pillow's own. Anything else returns None and is opened by Pillow as before, with its
errors: palette, alpha, 16-bit or interlaced images, transparency, EXIF, text or ICC chunks, APNG
frames, a bad checksum, a truncated file, data that does not decode. The rule is "None unless
Pillow would give these pixels without an error".
"""
from __future__ import annotations

import struct
import zlib

from PIL import Image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
MODES = {0: "L", 2: "RGB"}  # colour type -> Pillow mode (and raw mode) at bit depth 8
# Chunks that change nothing Pillow gives back for L or RGB pixels, with the lengths the PNG
# specification gives them (a chunk of another length takes Pillow's path, which judges it).
NEUTRAL = {b"gAMA": (4,), b"sRGB": (1,), b"pHYs": (9,), b"cHRM": (32,), b"tIME": (7,),
           b"sBIT": (1, 3), b"bKGD": (2, 6)}
CHUNK = struct.Struct(">I4s")
HEADER = struct.Struct(">IIBBBBBI")  # width, height, depth, colour type, compression, filter, interlace, CRC


def simple_png(data: bytes | memoryview) -> Image.Image | None:
    """The decoded image of a simple PNG's bytes (mode L or RGB, loaded), or None for any other
    file (which Image.open then reads)."""
    if data[:8] != SIGNATURE or data[12:16] != b"IHDR" or len(data) < 45 or CHUNK.unpack_from(data, 8)[0] != 13:
        return None
    width, height, depth, color, compression, filtering, interlace, crc = HEADER.unpack_from(data, 16)
    if (depth != 8 or color not in MODES or compression or filtering or interlace or not width or not height
            or width * height > Image.MAX_IMAGE_PIXELS or zlib.crc32(data[12:29]) != crc):
        return None
    pos, end, parts, after_data = 33, len(data), [], False
    while True:
        if pos + 12 > end:
            return None  # truncated: Pillow says how
        length, kind = CHUNK.unpack_from(data, pos)
        stop = pos + 12 + length
        if stop > end:
            return None
        if kind == b"IDAT":  # its checksum is not read (Pillow does not read it either)
            if after_data:
                return None  # image data split by another chunk
            parts.append(data[pos + 8:stop - 4])
        elif kind == b"IEND":
            break
        elif length in NEUTRAL.get(kind, ()) and zlib.crc32(data[pos + 4:stop - 4]) == int.from_bytes(data[stop - 4:stop], "big"):
            after_data = bool(parts)
        else:
            return None
        pos = stop
    if not parts:
        return None
    mode = MODES[color]
    try:
        return Image.frombytes(mode, (width, height), b"".join(parts), "zip", mode)
    except (ValueError, OSError):  # short or corrupt data: Pillow's own reading reports it
        return None
