"""Checking uploads by their content: type, bytes, pixels (before decoding), integrity."""

from __future__ import annotations

import io
import re
import time

import pytest
from PIL import Image

from svdfarm.images import MIN_SIDE, ImageError, ImageInfo, inspect_image, open_upright_rgb
from svdfarm.settings import SettingsError, load_settings
from tests.factories import (
    gif_bytes,
    jpeg_bytes,
    noisy_png_bytes,
    png_bytes,
    png_header_bytes,
    truncated,
    webp_bytes,
)

MAX_BYTES = 20 * 1024 * 1024
MAX_PIXELS = 40_000_000
_UNITS = {"bytes": 1, "byte": 1, "b": 1, "kb": 1024, "kib": 1024, "mb": 1024**2, "mib": 1024**2}


def inspect(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> ImageInfo:
    """inspect_image with the default limits."""
    return inspect_image(data, max_bytes, max_pixels)


def refusal(data: bytes, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS) -> ImageError:
    """The ImageError inspect_image raises for ``data``."""
    with pytest.raises(ImageError) as info:
        inspect_image(data, max_bytes, max_pixels)
    return info.value


def stated_sizes(message: str) -> list[float]:
    """The byte sizes a message states, in bytes ("2,048 bytes", "2.0 KB", "20.0 MB")."""
    found = re.findall(r"(\d[\d,]*(?:\.\d+)?)\s*(bytes|byte|KiB|KB|kB|MiB|MB|B)\b", message)
    return [float(number.replace(",", "")) * _UNITS[unit.lower()] for number, unit in found]


@pytest.mark.parametrize(
    ("data", "fmt", "extension", "mime"),
    [
        (png_bytes(96, 64), "PNG", "png", "image/png"),
        (jpeg_bytes(96, 64), "JPEG", "jpg", "image/jpeg"),
        (webp_bytes(96, 64), "WEBP", "webp", "image/webp"),
    ],
    ids=["png", "jpeg", "webp"],
)
def test_accepted_types_are_described(data: bytes, fmt: str, extension: str, mime: str) -> None:
    """PNG, JPEG and WebP are accepted and described by their content."""
    assert inspect(data) == ImageInfo(fmt, extension, mime, 96, 64)


def test_exif_rotation_swaps_the_reported_size() -> None:
    """A JPEG turned by EXIF (orientation 6) is reported upright; orientation 3 keeps its size."""
    turned = inspect(jpeg_bytes(96, 64, orientation=6))
    assert (turned.width, turned.height) == (64, 96)
    rotated = inspect(jpeg_bytes(96, 64, orientation=3))
    assert (rotated.width, rotated.height) == (96, 64)


def test_open_upright_rgb_turns_and_converts() -> None:
    """The worker's decoder gives the same upright size as inspect_image, in RGB."""
    image = open_upright_rgb(jpeg_bytes(96, 64, orientation=6))
    assert (image.mode, image.size) == ("RGB", (64, 96))
    rgba = io.BytesIO()
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(rgba, format="PNG")
    assert open_upright_rgb(rgba.getvalue()).mode == "RGB"


def test_empty_upload_is_refused() -> None:
    """No bytes at all: 400, saying the upload is empty."""
    error = refusal(b"")
    assert error.status == 400
    assert "empty" in str(error)


@pytest.mark.parametrize(
    "data",
    [b"hello, this is text", b"%PDF-1.4\n", b"GIF89a", gif_bytes(), b"\x89PNG\r\n\x1a\n"],
    ids=["text", "pdf", "gif-signature", "gif", "png-signature-only"],
)
def test_what_is_not_an_accepted_image_is_415(data: bytes) -> None:
    """Anything whose content is not PNG, JPEG or WebP is 415, GIF included."""
    error = refusal(data)
    assert error.status == 415
    assert "PNG, JPEG or WebP" in str(error)


def test_too_many_bytes_is_413_before_anything_else() -> None:
    """Over the byte limit is 413 even when the content is not an image at all."""
    error = refusal(b"x" * 2049, max_bytes=2048)
    assert error.status == 413
    assert refusal(noisy_png_bytes(), max_bytes=2048).status == 413
    assert inspect(png_bytes(96, 64), max_bytes=len(png_bytes(96, 64))).width == 96


@pytest.mark.parametrize(
    ("size", "limit"), [(3000, 2048), (20 * 1024 * 1024 + 1000, 20 * 1024 * 1024)]
)
def test_the_byte_limit_message_tells_the_size_from_the_limit(size: int, limit: int) -> None:
    """The 413 message states the upload's size and the limit as two different, true numbers.

    "The image is 0.0 MB; the limit is 0.0 MB" (a 2 KB limit) or "20.0 MB; the limit is
    20.0 MB" (just over 20 MB) does not tell anyone what to do.
    """
    message = str(refusal(b"x" * size, max_bytes=limit))
    stated = stated_sizes(message)
    assert any(abs(value - limit) <= 0.05 * limit for value in stated), message
    assert len({round(value) for value in stated}) >= 2, message


def test_a_decompression_bomb_is_refused_before_decoding() -> None:
    """A 69-byte PNG claiming 20000 x 20000 pixels is 413 at once, naming the pixel limit."""
    bomb = png_header_bytes(20000, 20000)
    assert len(bomb) < 200
    start = time.perf_counter()
    error = refusal(bomb)
    assert time.perf_counter() - start < 0.5
    assert error.status == 413
    assert "40,000,000" in str(error)
    assert "pixels" in str(error)


@pytest.mark.parametrize("side", [10000, 7000])
def test_a_header_over_the_pixel_limit_is_413(side: int) -> None:
    """A header claiming more pixels than the limit is refused from the header alone."""
    start = time.perf_counter()
    error = refusal(png_header_bytes(side, side))
    assert time.perf_counter() - start < 0.5
    assert error.status == 413
    assert "40,000,000" in str(error)


def test_the_pixel_limit_is_exact() -> None:
    """An image of exactly the limit passes; one pixel fewer allowed refuses it with its size."""
    data = png_bytes(96, 64)
    assert inspect(data, max_pixels=96 * 64).width == 96
    error = refusal(data, max_pixels=96 * 64 - 1)
    assert error.status == 413
    assert "96 x 64" in str(error)


def test_a_configured_pixel_limit_is_the_one_applied() -> None:
    """SVDFARM_MAX_IMAGE_PIXELS above Pillow's own bomb limit (about 89.5 million pixels) must
    either be refused when the settings load, or be honoured: a 100-million-pixel image under
    a 200-million limit is not refused "for more pixels than the limit of 200,000,000".
    """
    env = {"SVDFARM_MAX_IMAGE_PIXELS": "200000000", "SVDFARM_DATA_DIR": "unused"}
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        assert "SVDFARM_MAX_IMAGE_PIXELS" in str(exc)
        return
    buffer = io.BytesIO()
    Image.new("1", (10000, 10000)).save(buffer, format="PNG")  # 100 M pixels in ~12 KB
    info = inspect(buffer.getvalue(), max_pixels=settings.max_image_pixels)
    assert (info.width, info.height) == (10000, 10000)


def test_too_small_images_are_refused() -> None:
    """Either side under 16 pixels is 400, with the size and the minimum."""
    error = refusal(png_bytes(MIN_SIDE - 1, 64))
    assert error.status == 400
    assert f"{MIN_SIDE - 1} x 64" in str(error)
    assert str(MIN_SIDE) in str(error)
    assert inspect(png_bytes(MIN_SIDE, MIN_SIDE)).width == MIN_SIDE


@pytest.mark.parametrize(
    "data",
    [truncated(png_bytes(96, 64)), truncated(jpeg_bytes(96, 64)), jpeg_bytes(96, 64)[:200]],
    ids=["png", "jpeg", "jpeg-header"],
)
def test_truncated_images_are_400_damaged(data: bytes) -> None:
    """A PNG or JPEG cut short is 400 with a message that says it is damaged or truncated."""
    error = refusal(data)
    assert error.status == 400
    assert re.search(r"damaged|truncated", str(error), re.IGNORECASE), str(error)


def test_a_truncated_webp_says_it_is_damaged() -> None:
    """A WebP cut short is 400 and, like PNG and JPEG, is called damaged or truncated (not
    "could not create decoder object", which tells the person nothing).
    """
    error = refusal(truncated(webp_bytes(96, 64)))
    assert error.status == 400
    assert re.search(r"damaged|truncated", str(error), re.IGNORECASE), str(error)


def test_a_corrupt_chunk_is_refused() -> None:
    """A PNG whose IHDR checksum is wrong is refused (400 or 415), never accepted."""
    data = bytearray(png_bytes(96, 64))
    data[29] ^= 0xFF  # inside the IHDR chunk's CRC
    assert refusal(bytes(data)).status in (400, 415)
