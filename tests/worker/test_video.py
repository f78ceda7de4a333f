"""Encoding MP4s and posters with the real ffmpeg, checked by decoding them again."""

from __future__ import annotations

import json
import subprocess
import zipfile
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from tests.media import probe_video
from worker.video import (
    encode_gif,
    encode_mp4,
    encode_webm,
    ping_pong,
    read_metadata,
    settings_metadata,
    write_frames_zip,
    write_poster,
)


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


def _levels(count: int = 6, height: int = 48, width: int = 64) -> np.ndarray:
    """``count`` distinct frames: frame i is filled with 30 * i."""
    return np.stack([np.full((height, width, 3), 30 * i, np.uint8) for i in range(count)])


def test_ping_pong_plays_forward_then_back_without_repeating_the_ends() -> None:
    """Frames 0..3 loop as 0 1 2 3 2 1; fewer than three frames stay as they are."""
    levels = ping_pong(_levels(4))[:, 0, 0, 0] // 30
    assert levels.tolist() == [0, 1, 2, 3, 2, 1]
    assert len(ping_pong(_levels(2))) == 2


def test_the_mp4_carries_the_settings_it_was_rendered_with(tmp_path: Path) -> None:
    """The model and every parameter are in the MP4's metadata and read back as they were
    written (quotes, ``=``, ``;``, ``#`` and backslashes included): enough to render it again."""
    params = {"seed": 2**63 - 1, "loop": True, "output_formats": "mp4,gif", "odd": 'a=b;c#d\\e"'}
    path = tmp_path / "video.mp4"
    encode_mp4(_levels(), 7, path, metadata=settings_metadata("svd-xt", params))
    assert read_metadata(path) == {"model": "svd-xt", "params": params}
    assert probe_video(path)["moov_before_mdat"]


def test_a_video_without_settings_reads_none(tmp_path: Path) -> None:
    """An MP4 of another tool (no svdfarm comment) has no settings to read."""
    path = tmp_path / "plain.mp4"
    encode_mp4(_levels(), 7, path)
    assert read_metadata(path) is None


def test_the_webm_is_vp9_with_every_frame(tmp_path: Path) -> None:
    """The WebM is VP9 in yuv420p, at the frames' size, every frame kept, settings inside."""
    path = tmp_path / "video.webm"
    encode_webm(_levels(), 7, path, metadata=settings_metadata("tiny", {"seed": 1}))
    info = probe_video(path)
    assert (info["codec"], info["pix_fmt"]) == ("vp9", "yuv420p")
    assert (info["width"], info["height"], info["frames"]) == (64, 48, 6)
    assert path.read_bytes()[:4] == b"\x1a\x45\xdf\xa3"  # EBML: a Matroska/WebM file
    assert read_metadata(path) == {"model": "tiny", "params": {"seed": 1}}


def test_the_gif_loops_forever_with_every_frame(tmp_path: Path) -> None:
    """The GIF has every frame at the frames' size (odd sizes too) and loops forever."""
    path = tmp_path / "video.gif"
    encode_gif(_levels(5, 33, 47), 7, path)
    with Image.open(path) as gif:
        assert gif.format == "GIF" and gif.size == (47, 33)
        assert getattr(gif, "n_frames", 1) == 5
        assert gif.info.get("loop") == 0


def test_the_frames_zip_holds_one_png_per_frame(tmp_path: Path) -> None:
    """frames.zip holds frame_0001.png ... in order, each the frame exactly (PNG is lossless)."""
    frames = _levels(3)
    path = tmp_path / "frames.zip"
    write_frames_zip(frames, path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert names == ["frame_0001.png", "frame_0002.png", "frame_0003.png"]
        for name, frame in zip(names, frames, strict=True):
            with Image.open(archive.open(name)) as png:
                assert np.array_equal(np.asarray(png.convert("RGB")), frame)


def test_a_model_folder_is_named_without_the_servers_path() -> None:
    """A model given as a folder on the server is named by its last part in the metadata;
    hub ids and catalog names are kept as they are."""
    for given, shown in (
        ("/srv/models/svd-xt/", "svd-xt"),
        ("~/models/tiny", "tiny"),
        ("C:\\models\\svd", "svd"),
        ("stabilityai/stable-video-diffusion-img2vid-xt", None),
        ("tiny", None),
    ):
        found = json.loads(settings_metadata(given, {}))["svdfarm"]["model"]
        assert found == (shown or given), given
