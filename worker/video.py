"""Writing a render's outputs: an H.264 MP4 browsers play, and a PNG poster frame.

Both are written to a temporary file beside the target and renamed into place, so a reader
(the web side serving the file) never sees half a file.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

#: x264's constant-rate factor: 18 is visually lossless for most content.
CRF = 18
PRESET = "medium"
#: A bound on one encode, so a stuck ffmpeg cannot hold a worker forever.
ENCODE_TIMEOUT_S = 600


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


def encode_mp4(frames: np.ndarray, fps: int, path: Path) -> None:
    """Encode uint8 RGB ``frames`` (frames, height, width, 3) as an H.264 MP4 at ``fps``.

    yuv420p and ``+faststart`` (the index first) make a file every browser plays while it
    downloads. The size is kept exactly; an odd width or height raises ValueError. ffmpeg's
    own error output is raised as RuntimeError, and the target is then left as it was.
    """
    import imageio_ffmpeg

    _check_frames(frames, even=True)
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
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-crf",
            str(CRF),
            "-preset",
            PRESET,
            "-movflags",
            "+faststart",
            "-f",
            "mp4",
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
                f"ffmpeg could not encode {path} (exit {result.returncode}): {detail}"
            )


def write_poster(frames: np.ndarray, path: Path) -> None:
    """Save the middle frame of ``frames`` as a PNG poster image."""
    _check_frames(frames, even=False)
    middle = frames[len(frames) // 2]
    with _atomic_path(Path(path)) as temporary:
        Image.fromarray(middle).save(temporary, format="PNG")
