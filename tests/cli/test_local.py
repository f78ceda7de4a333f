"""``svdfarm render``, ``caps`` and ``model`` (:mod:`cli.local`), run as real subprocesses."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.factories import png_bytes
from tests.media import probe_video
from tests.processes import SVDFARM


def test_model_tiny_writes_a_loadable_folder(tmp_path: Path) -> None:
    """``svdfarm model tiny DIR`` writes a folder that from_pretrained reads."""
    target = tmp_path / "tiny-out"
    done = subprocess.run(
        [*SVDFARM, "model", "tiny", str(target)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    index = json.loads((target / "model_index.json").read_text())
    assert index["_class_name"] == "StableVideoDiffusionPipeline"
    from diffusers import StableVideoDiffusionPipeline

    from svdfarm.params import TINY_BASE_SIDE, model_base_side

    pipe = StableVideoDiffusionPipeline.from_pretrained(target)
    assert type(pipe.unet).__name__ == "UNetSpatioTemporalConditionModel"
    # Read from the saved configs without torch, the folder's native size is the tiny one.
    assert model_base_side(str(target)) == TINY_BASE_SIDE


def test_render_writes_the_mp4_asked_for(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """``svdfarm render`` renders without the queue, with the flags' frames and size."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(200, 100))
    out = tmp_path / "out" / "video.mp4"
    done = subprocess.run(
        [
            *SVDFARM,
            "render",
            str(image),
            "-o",
            str(out),
            "--frames",
            "5",
            "--steps",
            "2",
            "--width",
            "128",
            "--height",
            "64",
            "--fps",
            "5",
            "--seed",
            "3",
            "--precision",
            "fp32",
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "100.0%" in done.stderr  # the progress bar reached the end
    info = probe_video(out)
    assert info["frames"] == 5
    assert (info["width"], info["height"]) == (128, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frames", "1"], "Frames must be between 2 and 128"),
        (["--width", "100", "--height", "64"], "multiple of 64"),
        (["--width", "128"], "Give both width and height"),
    ],
)
def test_render_refuses_bad_flags(
    tmp_path: Path, cli_env: dict[str, str], args: list[str], message: str
) -> None:
    """Bad flags exit with status 2 and the same message the form shows."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "out.mp4"
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(out), *args],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert not out.exists()


def test_render_refuses_a_file_that_is_not_an_image(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A text file named .png is refused by its content."""
    image = tmp_path / "fake.png"
    image.write_text("not an image")
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(tmp_path / "o.mp4")],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "not a PNG, JPEG or WebP image" in done.stderr


def test_caps_prints_the_probe_and_the_plans(cli_env: dict[str, str]) -> None:
    """``svdfarm caps`` names this machine, its bf16/fp16 answers and a plan per precision."""
    text = subprocess.run(
        [*SVDFARM, "caps"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    assert text.returncode == 0, text.stderr
    assert "(cpu," in text.stdout and "bf16_op" in text.stdout
    assert "auto  -> fp32, chunk 8 on cpu" in text.stdout
    done = subprocess.run(
        [*SVDFARM, "caps", "--json"], env=cli_env, capture_output=True, text=True, timeout=120
    )
    data = json.loads(done.stdout)
    assert data["capabilities"]["device"] == "cpu"
    assert data["capabilities"]["total_memory_bytes"] > 0
    assert set(data["plans"]) == {"auto", "bf16", "fp16", "fp32"}
    assert data["plans"]["bf16"]["unet"] == "bf16"


def test_render_without_casts_recovers_in_fp32_and_prints_the_attempts(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """``--no-casts --dtypes vae=bf16 --json``: the seed's error, then fp32, as JSON."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    out = tmp_path / "out.mp4"
    done = subprocess.run(
        [
            *SVDFARM,
            "render",
            str(image),
            "-o",
            str(out),
            "--frames",
            "3",
            "--steps",
            "1",
            "--no-casts",
            "--dtypes",
            "vae=bf16",
            "--json",
        ],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    attempts = json.loads(done.stdout)["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed", "succeeded"]
    assert attempts[0]["error_class"] == "dtype_mismatch"
    assert attempts[0]["component"] == "vae"
    assert "bias type (c10::BFloat16) should be the same" in attempts[0]["message"]
    assert attempts[0]["plan"].startswith("fp32 unet+enc, bf16 vae")
    assert attempts[1]["plan"].startswith("fp32, chunk 3")
    assert all(a["duration_s"] > 0 and a["peak_memory_bytes"] > 0 for a in attempts)
    assert probe_video(out)["frames"] == 3


def test_render_refuses_bad_dtypes(tmp_path: Path, cli_env: dict[str, str]) -> None:
    """A malformed ``--dtypes`` exits 2 naming the bad item."""
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(tmp_path / "o.mp4"), "--dtypes", "vae=fp8"],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "vae=fp8" in done.stderr


def test_render_follows_the_model_rule_and_says_where_it_writes(
    tmp_path: Path, cli_env: dict[str, str], tiny_model_dir: Path
) -> None:
    """The README's ``svdfarm render`` on a machine without a GPU (CUDA hidden here) and
    without SVDFARM_MODEL renders with the tiny model, by the rule every command follows,
    and says so; run from another folder with no data folder set, it says where it keeps
    the model and makes nothing else there (no broker, no jobs folder)."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "var" / "models").mkdir(parents=True)
    (elsewhere / "var" / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    env = {k: v for k, v in cli_env.items() if k not in ("SVDFARM_MODEL", "SVDFARM_DATA_DIR")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", "out.mp4", "--frames", "2", "--steps", "1"],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "model: tiny (no GPU and SVDFARM_MODEL unset)", done.stderr
    assert f"the tiny model is kept in {elsewhere / 'var' / 'models' / 'tiny'}" in done.stderr
    assert probe_video(elsewhere / "out.mp4")["frames"] == 2
    assert sorted(p.name for p in (elsewhere / "var").iterdir()) == ["models"]


def test_the_progress_bar_shows_the_speed_and_the_time_left(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Denoising steps timed from the first one give the it/s and an ETA; a retry (loading
    again) times its own steps."""
    from cli.local import _ProgressBar
    from svdfarm.states import Phase

    now = [100.0]
    bar = _ProgressBar(25, clock=lambda: now[0])
    bar(Phase.LOADING, 0.0, 0)
    now[0] = 130.0  # loading took 30 s: not part of the speed
    bar(Phase.DENOISING, 0.05, 0)
    assert "it/s" not in capsys.readouterr().err
    now[0] = 135.0
    bar(Phase.DENOISING, 0.25, 5)
    line = capsys.readouterr().err
    assert "step 5/25" in line and "1.00 it/s" in line and "ETA 0:20" in line, line
    bar(Phase.LOADING, 0.0, 0)
    now[0] = 200.0
    bar(Phase.DENOISING, 0.05, 0)
    now[0] = 201.0
    bar(Phase.DENOISING, 0.09, 2)
    assert "2.00 it/s  ETA 0:12" in capsys.readouterr().err


def test_render_again_from_a_video_takes_its_settings(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """``svdfarm render --from VIDEO`` reads the model and settings the first MP4 carries: the
    same seed, size and frames render the same video; an option given wins (--loop here)."""
    from worker.video import read_metadata

    image = tmp_path / "in.png"
    image.write_bytes(png_bytes(96, 64))
    first, again, looped = (tmp_path / n for n in ("first.mp4", "again.mp4", "looped.mp4"))
    common = [*SVDFARM, "render", str(image), "--precision", "fp32"]
    flags = ["--frames", "4", "--steps", "2", "--seed", "9", "--max-guidance", "2.5"]

    def run(*args: str) -> None:
        done = subprocess.run(
            [*common, *args], env=cli_env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr

    run("-o", str(first), *flags)
    run("-o", str(again), "--from", str(first))
    run("-o", str(looped), "--from", str(first), "--loop")
    settings = read_metadata(first)
    assert settings is not None and settings["params"]["max_guidance_scale"] == 2.5
    assert read_metadata(again) == settings
    assert probe_video(again)["frames"] == 4 and probe_video(looped)["frames"] == 6
    frames = [imageio_frames(p) for p in (first, again)]
    assert frames[0] == frames[1]


def imageio_frames(path: Path) -> bytes:
    """The decoded frames of a video, as raw RGB bytes."""
    import imageio_ffmpeg

    done = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_render_from_a_video_without_settings_fails_clearly(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A video the farm did not make: a one-line error naming it."""
    import numpy as np

    from worker.video import encode_mp4

    plain = tmp_path / "plain.mp4"
    encode_mp4(np.zeros((2, 64, 64, 3), np.uint8), 5, plain)
    image = tmp_path / "in.png"
    image.write_bytes(png_bytes())
    done = subprocess.run(
        [*SVDFARM, "render", str(image), "-o", str(tmp_path / "o.mp4"), "--from", str(plain)],
        env=cli_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "carries no svdfarm settings" in done.stderr
