"""Writing a render's outputs: an H.264 MP4 browsers play (its settings in its metadata), a
PNG poster frame, and the formats a job may ask for besides: a VP9 WebM, a GIF, a zip of PNGs.

Each is written to a temporary file beside the target and renamed into place, so a reader
(the web side serving the file) never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: x264's constant-rate factor: 18 is visually lossless for most content.
CRF = 18
PRESET = "medium"
#: A bound on one encode, so a stuck ffmpeg cannot hold a worker forever.
ENCODE_TIMEOUT_S = 600
#: VP9's constant quality (with ``-b:v 0``): 31 is the encoder's recommended middle for HD.
VP9_CRF = 31
#: The key of the MP4's metadata that holds the render's settings as JSON.
METADATA_KEY = "comment"
#: What marks that JSON as this farm's (``{"svdfarm": {"model": ..., "params": {...}}}``).
METADATA_ROOT = "svdfarm"


def _check_frames(frames: np.ndarray, even: bool) -> None:
    """Refuse anything but uint8 RGB frames; with ``even``, of an even size (yuv420p needs it)."""
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        kind = frames.dtype if isinstance(frames, np.ndarray) else type(frames).__name__
        raise ValueError(f"frames must be a uint8 numpy array, got {kind}")
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be shaped (frames, height, width, 3), got {frames.shape}")
    height, width = frames.shape[1:3]
    if even and (height % 2 or width % 2):
        raise ValueError(f"frame width and height must be even for H.264, got {width} x {height}")


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffix) and move it onto ``path`` on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    temporary = Path(name)
    try:
        yield temporary
        # mkstemp creates the file private; outputs are served to others.
        temporary.chmod(0o644)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def ping_pong(frames: np.ndarray) -> np.ndarray:
    """The frames forward then backward, without repeating either end, so a looping player
    goes back and forth smoothly (8 frames become 14)."""
    if len(frames) < 3:
        return frames
    return np.concatenate([frames, frames[-2:0:-1]])


def _run_ffmpeg(
    frames: np.ndarray, fps: int, path: Path, output_args: list[str], what: str
) -> None:
    """Pipe raw RGB ``frames`` into the bundled ffmpeg, writing ``path`` atomically with
    ``output_args``; ffmpeg's own error output is raised as RuntimeError."""
    import imageio_ffmpeg

    if fps < 1:
        raise ValueError(f"fps must be at least 1, got {fps}")
    height, width = frames.shape[1:3]
    with _atomic_path(Path(path)) as temporary:
        # imageio_ffmpeg.write_frames ignores ffmpeg's exit status and can leave its pipes
        # open, so the bundled ffmpeg is run directly.
        command = [
            imageio_ffmpeg.get_ffmpeg_exe(),
            "-y",
            "-hide_banner",
            "-loglevel",
            "error",
            "-f",
            "rawvideo",
            "-pix_fmt",
            "rgb24",
            "-s",
            f"{width}x{height}",
            "-r",
            str(fps),
            "-i",
            "-",
            "-an",
            *output_args,
            str(temporary),
        ]
        result = subprocess.run(
            command,
            input=np.ascontiguousarray(frames).tobytes(),
            capture_output=True,
            timeout=ENCODE_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()[-2000:]
            raise RuntimeError(
                f"ffmpeg could not encode {what} {path} (exit {result.returncode}): {detail}"
            )


def settings_metadata(model: str, params: Mapping[str, Any]) -> str:
    """The JSON the MP4 carries: the model and every parameter, enough to render it again.

    A model given as a folder on the server is named by its last part only: the file is
    served to anyone with the job's id, and the server's paths are not theirs to read."""
    if model.startswith(("/", "~", "file:")) or "\\" in model:
        model = model.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return json.dumps({METADATA_ROOT: {"model": model, "params": dict(params)}}, sort_keys=True)


def encode_mp4(frames: np.ndarray, fps: int, path: Path, *, metadata: str | None = None) -> None:
    """Encode uint8 RGB ``frames`` (frames, height, width, 3) as an H.264 MP4 at ``fps``.

    yuv420p and ``+faststart`` (the index first) make a file every browser plays while it
    downloads. The size is kept exactly; an odd width or height raises ValueError. ffmpeg's
    own error output is raised as RuntimeError, and the target is then left as it was.
    ``metadata`` (:func:`settings_metadata`) is written as the file's comment.
    """
    _check_frames(frames, even=True)
    tags = ["-metadata", f"{METADATA_KEY}={metadata}"] if metadata else []
    args = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(CRF), "-preset", PRESET]
    args += [*tags, "-movflags", "+faststart", "-f", "mp4"]
    _run_ffmpeg(frames, fps, path, args, "the MP4")


def encode_webm(frames: np.ndarray, fps: int, path: Path, *, metadata: str | None = None) -> None:
    """Encode ``frames`` as a VP9 WebM at constant quality (browsers play it too)."""
    _check_frames(frames, even=True)
    tags = ["-metadata", f"{METADATA_KEY}={metadata}"] if metadata else []
    args = ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-crf", str(VP9_CRF), "-b:v", "0"]
    args += ["-deadline", "good", "-cpu-used", "4", "-row-mt", "1", *tags, "-f", "webm"]
    _run_ffmpeg(frames, fps, path, args, "the WebM")


def encode_gif(frames: np.ndarray, fps: int, path: Path) -> None:
    """Encode ``frames`` as a GIF that loops forever, with a palette made from the frames."""
    _check_frames(frames, even=False)
    palette = "split[a][b];[a]palettegen=stats_mode=full[p];[b][p]paletteuse=dither=sierra2_4a"
    _run_ffmpeg(frames, fps, path, ["-vf", palette, "-loop", "0", "-f", "gif"], "the GIF")


def write_frames_zip(frames: np.ndarray, path: Path) -> None:
    """Save every frame as a PNG (``frame_0001.png`` ...) in a zip."""
    _check_frames(frames, even=False)
    digits = max(4, len(str(len(frames))))
    with _atomic_path(Path(path)) as temporary:
        with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED) as archive:
            for number, frame in enumerate(frames, start=1):
                buffer = io.BytesIO()
                Image.fromarray(frame).save(buffer, format="PNG")
                archive.writestr(f"frame_{number:0{digits}d}.png", buffer.getvalue())


def read_metadata(path: Path) -> dict[str, Any] | None:
    """The settings an MP4 (or WebM) of this farm carries (``{"model", "params"}``), or None
    when it carries none; read back with the bundled ffmpeg."""
    import imageio_ffmpeg

    result = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path)]
        + ["-f", "ffmetadata", "-"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip()[-500:]
        raise RuntimeError(f"ffmpeg could not read {path}: {detail}")
    for line in _metadata_lines(result.stdout.decode(errors="replace")):
        name, _, value = line.partition("=")
        if name.strip().lower() != METADATA_KEY:
            continue
        try:
            found = json.loads(value)
        except ValueError:
            continue
        if isinstance(found, dict) and isinstance(found.get(METADATA_ROOT), dict):
            settings: dict[str, Any] = found[METADATA_ROOT]
            return settings
    return None


def _metadata_lines(text: str) -> list[str]:
    """The lines of an ffmetadata file, with its escapes (``\\=``, ``\\;``, ``\\#``,
    ``\\\\``, an escaped newline) undone."""
    lines: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(char)
    lines.append("".join(current))
    return lines


def write_poster(frames: np.ndarray, path: Path) -> None:
    """Save the middle frame of ``frames`` as a PNG poster image."""
    _check_frames(frames, even=False)
    middle = frames[len(frames) // 2]
    with _atomic_path(Path(path)) as temporary:
        Image.fromarray(middle).save(temporary, format="PNG")
