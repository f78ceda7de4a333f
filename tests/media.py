"""Inspecting videos in tests with the real ffmpeg bundled by imageio-ffmpeg."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path
from typing import Any

import imageio_ffmpeg

# e.g. "Stream #0:0[0x1](und): Video: h264 (High) (avc1 / 0x31637661), yuv420p(progressive),
# 64x64, 33 kb/s, 7 fps, ..."
_VIDEO_STREAM = re.compile(
    r"Stream #\d+:\d+.*?: Video: (?P<codec>\w+).*?, (?P<pix_fmt>\w+)(?:\([^)]*\))?, "
    r"(?P<width>\d+)x(?P<height>\d+)"
)


def top_level_boxes(path: Path) -> list[str]:
    """The types of an MP4's top-level boxes, in file order (e.g. ftyp, moov, mdat)."""
    boxes = []
    with open(path, "rb") as file:
        size_total = Path(path).stat().st_size
        offset = 0
        while offset + 8 <= size_total:
            file.seek(offset)
            size, kind = struct.unpack(">I4s", file.read(8))
            if size == 1:
                (size,) = struct.unpack(">Q", file.read(8))
            elif size == 0:
                size = size_total - offset
            if size < 8:
                raise ValueError(f"{path}: broken MP4 box {kind!r} of size {size} at {offset}")
            boxes.append(kind.decode("latin-1"))
            offset += size
    return boxes


def probe_video(path: Path) -> dict[str, Any]:
    """Read a video's frame count, size, codec, pixel format and whether moov precedes mdat.

    ``frames`` is counted by decoding the whole stream, not read from the header.
    """
    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # ffmpeg exits 1 when given no output file; the stream description is on stderr.
    match = _VIDEO_STREAM.search(result.stderr)
    if match is None:
        raise AssertionError(f"no video stream found in {path}:\n{result.stderr}")
    frames, _seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    boxes = top_level_boxes(Path(path))
    return {
        "frames": frames,
        "width": int(match["width"]),
        "height": int(match["height"]),
        "codec": match["codec"],
        "pix_fmt": match["pix_fmt"],
        "moov_before_mdat": "moov" in boxes
        and "mdat" in boxes
        and boxes.index("moov") < boxes.index("mdat"),
        "boxes": boxes,
    }
