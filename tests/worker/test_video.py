"""Encoding MP4s and posters with the real ffmpeg, checked by decoding them again."""

from __future__ import annotations

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from tests.media import probe_video
from worker.video import encode_mp4, write_poster


def _frames(count: int, width: int, height: int) -> np.ndarray:
    """Frames of flat colours that change over time, easy to recognise after encoding."""
    frames = np.zeros((count, height, width, 3), np.uint8)
    for index in range(count):
        frames[index] = (index * 30 % 256, 200 - index * 20 % 200, 90)
    return frames


def _decode(path: Path, width: int, height: int) -> np.ndarray:
    """Decode every frame of ``path`` to RGB with the bundled ffmpeg."""
    raw = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path)]
        + ["-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.mark.parametrize(("width", "height"), [(64, 64), (128, 64)])
def test_encode_mp4_plays_in_browsers(tmp_path: Path, width: int, height: int) -> None:
    frames = _frames(8, width, height)
    path = tmp_path / "out" / "video.mp4"
    encode_mp4(frames, 7, path)
    info = probe_video(path)
    assert info["frames"] == 8
    assert (info["width"], info["height"]) == (width, height)
    assert info["codec"] == "h264"
    assert info["pix_fmt"] == "yuv420p"
    assert info["moov_before_mdat"] is True, info["boxes"]
    decoded = _decode(path, width, height)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["video.mp4"]


def test_encode_mp4_refuses_bad_frames_and_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="even"):
        encode_mp4(_frames(2, 65, 64), 7, path)
    with pytest.raises(ValueError, match="uint8"):
        encode_mp4(_frames(2, 64, 64).astype(np.float32), 7, path)
    with pytest.raises(ValueError, match=r"\(frames, height, width, 3\)"):
        encode_mp4(_frames(2, 64, 64)[0], 7, path)
    with pytest.raises(ValueError, match="fps"):
        encode_mp4(_frames(2, 64, 64), 0, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]


def test_encode_mp4_replaces_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    path.write_bytes(b"old")
    encode_mp4(_frames(3, 64, 64), 7, path)
    assert probe_video(path)["frames"] == 3


def test_write_poster_is_the_middle_frame(tmp_path: Path) -> None:
    frames = _frames(5, 64, 32)
    path = tmp_path / "poster.png"
    write_poster(frames, path)
    with Image.open(path) as poster:
        assert poster.format == "PNG"
        np.testing.assert_array_equal(np.asarray(poster.convert("RGB")), frames[2])
    assert [p.name for p in tmp_path.iterdir()] == ["poster.png"]


def test_an_ffmpeg_failure_raises_and_leaves_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    path.write_bytes(b"old")
    too_wide = np.zeros((1, 2, 40000, 3), np.uint8)  # beyond what libx264 accepts
    with pytest.raises(RuntimeError, match="invalid width x height"):
        encode_mp4(too_wide, 7, path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["video.mp4"]
