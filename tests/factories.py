"""Test inputs made on the fly: real image files of chosen sizes and types."""

from __future__ import annotations

import io

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
