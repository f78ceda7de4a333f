"""Checking uploaded images by their content: type, size in bytes and pixels, integrity.

Pixel limits are checked from the header, before anything is decoded, so a decompression bomb
(a small file that claims 20000 x 20000 pixels) costs nothing.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

#: Pillow format name -> (file extension, MIME type) of the types we accept.
FORMATS = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "WEBP": ("webp", "image/webp"),
}
MIN_SIDE = 16
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height


class ImageError(ValueError):
    """The upload is not an image we can use; the message says why and what to do.

    ``status`` is the HTTP status the refusal deserves (400, 413 too large, 415 not an image).
    """

    def __init__(self, message: str, status: int = 400) -> None:
        """Keep the message and the HTTP status."""
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageInfo:
    """What an accepted upload is: its type and its upright size."""

    format: str
    extension: str
    mime: str
    width: int
    height: int


def format_size(n: int) -> str:
    """A byte count as people read it: exact bytes under 1 MB, else MB with one decimal."""
    if n < 1024 * 1024:
        return f"{n:,} bytes"
    return f"{n / (1024 * 1024):.1f} MB"


def _sizes(size: int, limit: int) -> tuple[str, str]:
    """The size and the limit, in exact bytes when they would read the same rounded."""
    shown = format_size(size), format_size(limit)
    return shown if shown[0] != shown[1] else (f"{size:,} bytes", f"{limit:,} bytes")


def inspect_image(data: bytes, max_bytes: int, max_pixels: int) -> ImageInfo:
    """Check an upload and describe it, or raise :class:`ImageError` with a clear message."""
    if not data:
        raise ImageError("The upload is empty: choose a PNG, JPEG or WebP image.")
    if len(data) > max_bytes:
        size, limit = _sizes(len(data), max_bytes)
        raise ImageError(f"The image is {size}; the limit is {limit}.", 413)
    try:
        with warnings.catch_warnings():
            # Our own limit is checked right after the header is read; Pillow's warning
            # would only duplicate it, and its hard error is above any limit settings allow.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
    except Image.DecompressionBombError:
        raise ImageError(
            f"The image has more pixels than the limit of {max_pixels:,}; "
            "scale it down and upload it again.",
            413,
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            "The file is not a PNG, JPEG or WebP image (its content was checked, not its name).",
            415,
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(
            f"The image is damaged or truncated and cannot be read ({exc}); upload it again."
        ) from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(
                f"The image is {width} x {height} pixels ({width * height:,}); "
                f"the limit is {max_pixels:,} pixels. Scale it down and upload it again.",
                413,
            )
        if width < MIN_SIDE or height < MIN_SIDE:
            raise ImageError(
                f"The image is {width} x {height} pixels; each side must be at least {MIN_SIDE}."
            )
        try:
            orientation = image.getexif().get(0x0112, 1)
            image.load()
        except (OSError, SyntaxError, ValueError) as exc:
            raise ImageError(
                f"The image is damaged or truncated and cannot be decoded ({exc}); upload it again."
            ) from None
        extension, mime = FORMATS[image.format or ""]
        if orientation in _TRANSPOSED_ORIENTATIONS:
            width, height = height, width
        return ImageInfo(image.format or "", extension, mime, width, height)


def open_upright_rgb(data: bytes) -> Image.Image:
    """Decode an accepted image, turned upright by its EXIF orientation, as RGB."""
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image)
        return upright.convert("RGB")
