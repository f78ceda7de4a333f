"""Test inputs made on the fly: real image files of chosen sizes and types."""

from __future__ import annotations

import io
import random
import struct
import zlib

from PIL import Image


def png_bytes(
    width: int = 96, height: int = 64, color: tuple[int, int, int] = (200, 80, 40)
) -> bytes:
    """A real PNG image with a gradient, so frames are not blank."""
    image = Image.new("RGB", (width, height), color)
    pixels = image.load()
    assert pixels is not None
    for x in range(width):
        for y in range(0, height, 4):
            pixels[x, y] = (x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), 128)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    """Encode ``image`` in ``fmt`` (a Pillow format name)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _gradient(width: int, height: int) -> Image.Image:
    """An RGB image with a gradient, decoded from :func:`png_bytes`."""
    with Image.open(io.BytesIO(png_bytes(width, height))) as image:
        return image.convert("RGB")


def jpeg_bytes(width: int = 96, height: int = 64, orientation: int | None = None) -> bytes:
    """A real JPEG image, with an EXIF orientation tag when ``orientation`` is given."""
    image = _gradient(width, height)
    if orientation is None:
        return _encoded(image, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(image, "JPEG", quality=90, exif=exif.tobytes())


def webp_bytes(width: int = 96, height: int = 64) -> bytes:
    """A real WebP image."""
    return _encoded(_gradient(width, height), "WEBP", quality=90)


def gif_bytes(width: int = 96, height: int = 64) -> bytes:
    """A real GIF image: an image, but not of a type the farm accepts."""
    return _encoded(_gradient(width, height), "GIF")


def noisy_png_bytes(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    """A real PNG of random pixels, which barely compresses: its size in bytes is ~3 x pixels."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    return _encoded(image, "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, and the CRC of type and data."""
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_bytes(width: int, height: int) -> bytes:
    """A small PNG whose valid header claims ``width`` x ``height`` pixels (a decompression
    bomb's shape): signature, IHDR with a correct CRC, a tiny IDAT of one row, IEND.
    """
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 64)))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first ``keep`` fraction of ``data``, as an interrupted upload leaves a file."""
    return data[: int(len(data) * keep)]
