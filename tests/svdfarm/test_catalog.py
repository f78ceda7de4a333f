"""A model's shape from its own files, without torch, and the memory estimate it gives."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from svdfarm.catalog import (
    DEFAULT_MODELS,
    SVD_XT,
    TINY_SHAPE,
    advertised_models,
    component_parameters,
    find_entry,
    local_folder,
    model_defaults,
    model_shape,
    parse_models,
)
from svdfarm.db import Database
from svdfarm.params import parse_params
from svdfarm.queues import estimate_memory_bytes, route
from svdfarm.settings import SettingsError, load_settings
from tests.factories import png_bytes
from tests.rows import add_worker

FULL_SHAPE_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "svd_xt"

GIB = 1024**3


def test_the_tiny_models_shape_is_read_from_its_files(tiny_model_dir: Path) -> None:
    shape = model_shape("tiny", tiny_model_dir.parent)
    assert shape.source == "files"
    # The figures used before the tiny model is saved are the saved model's own.
    assert shape == TINY_SHAPE
    assert shape.vae_factor == 2 and shape.unet_channels == 32


def test_a_model_that_is_not_here_is_estimated_as_svd_xt_but_tiny_as_tiny(tmp_path: Path) -> None:
    assert model_shape("stabilityai/no-such-model-here", tmp_path) is SVD_XT
    assert model_shape(str(tmp_path / "missing"), tmp_path) is SVD_XT
    assert model_shape("tiny", tmp_path) is TINY_SHAPE  # not saved here yet


def test_fp16_files_alone_count_the_same(tiny_model_dir: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    shutil.copytree(tiny_model_dir, half)
    for path in list(half.glob("*/*.safetensors")):
        path.rename(path.with_name(path.name.replace(".safetensors", ".fp16.safetensors")))
    assert model_shape(str(half), tmp_path).params == TINY_SHAPE.params
    assert component_parameters(half, "scheduler") is None


def test_a_hub_id_is_read_from_the_local_cache(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--small-svd"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert local_folder("someorg/small-svd", tmp_path) == repo / "snapshots" / commit
    assert model_shape("someorg/small-svd", tmp_path).params == TINY_SHAPE.params
    assert local_folder("someorg/other", tmp_path) is None


def test_the_tiny_models_job_no_longer_needs_svd_xts_memory() -> None:
    tiny = estimate_memory_bytes(8, 64, 64, 8, "fp32", TINY_SHAPE)
    svd = estimate_memory_bytes(8, 64, 64, 8, "fp32", SVD_XT)
    assert tiny < 1.6 * GIB < 9 * GIB < svd
    # SVD-XT at its default size is estimated as before (docs/ROUTING.md).
    assert round(estimate_memory_bytes(25, 1024, 576, 8, "bf16") / 1e9, 1) == 11.4
    assert route(8, 64, 64, 8, "auto", allow_cpu=True, shape=TINY_SHAPE).queue == (
        "svd.cpu.fp32.8g"
    )


def test_a_submitted_tiny_job_records_the_tiny_models_estimate(client: FlaskClient) -> None:
    form = {"image": (io.BytesIO(png_bytes(96, 64)), "in.png")}
    response = client.post("/api/v1/jobs", data=form, content_type="multipart/form-data")
    assert response.status_code == 201, response.get_json()
    body = client.get(f"/api/v1/jobs/{response.get_json()['id']}").get_json()
    assert body["memory_estimate_bytes"] == estimate_memory_bytes(8, 64, 64, 8, "fp32", TINY_SHAPE)
    assert body["memory_estimate_bytes"] < 1.6 * GIB and body["queue"] == "svd.cpu.fp32.8g.tiny"


# ---- the catalog (SVDFARM_MODELS), what workers serve, GET /api/v1/models -------------------


def test_models_setting_and_the_catalog(tmp_path: Path) -> None:
    settings = load_settings({"SVDFARM_DATA_DIR": str(tmp_path)})
    assert [(e.id, e.source) for e in settings.catalog] == [
        ("svd-xt", "stabilityai/stable-video-diffusion-img2vid-xt"),
        ("svd", "stabilityai/stable-video-diffusion-img2vid"),
        ("tiny", "tiny"),
    ]
    mine = load_settings(
        {
            "SVDFARM_DATA_DIR": str(tmp_path),
            "SVDFARM_MODELS": " mine = /models/svd , tiny=tiny",
            "SVDFARM_MODEL": "/elsewhere/svd",
        }
    )
    assert [(e.id, e.source) for e in mine.catalog] == [
        ("mine", "/models/svd"),
        ("tiny", "tiny"),
        ("/elsewhere/svd", "/elsewhere/svd"),  # SVDFARM_MODEL joins under its own name
    ]
    assert find_entry(mine.catalog, "MINE") == find_entry(mine.catalog, "/models/svd")
    for bad, why in (("a=b,A=c", "given twice"), ("x y=tiny", "may hold only"), (",", "no model")):
        with pytest.raises(SettingsError, match=why):
            load_settings({"SVDFARM_DATA_DIR": str(tmp_path), "SVDFARM_MODELS": bad})
    with pytest.raises(SettingsError, match="SVDFARM_WORKER_MODELS"):
        load_settings({"SVDFARM_DATA_DIR": str(tmp_path), "SVDFARM_WORKER_MODELS": "=x"})


def test_defaults_are_read_from_the_models_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    svd = tmp_path / "svd"
    shutil.copytree(FULL_SHAPE_CONFIGS, svd)
    config = json.loads((svd / "unet" / "config.json").read_text())
    (svd / "unet" / "config.json").write_text(json.dumps({**config, "num_frames": 14}))
    assert model_defaults(str(svd), tmp_path) == {"num_frames": 14, "native_side": 768}
    # A job of that model renders its 14 frames unless told otherwise.
    assert parse_params({}, (1024, 576), str(svd)).num_frames == 14
    assert model_defaults("tiny", tiny_model_dir.parent) == {"num_frames": 8, "native_side": 64}
    # Not on this machine: SVD-XT's.
    assert model_defaults("someorg/absent", tmp_path) == {"num_frames": 25, "native_side": 768}


XT_1_1 = "stabilityai/stable-video-diffusion-img2vid-xt-1-1"


def test_known_checkpoints_not_in_the_cache_get_their_own_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub id of Stability AI's SVD family that this machine has not downloaded gets that
    checkpoint's defaults (SVD 14 frames), not SVD-XT's, and no error."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    svd = "stabilityai/stable-video-diffusion-img2vid"
    assert local_folder(svd, tmp_path) is None
    assert model_defaults(svd, tmp_path) == {"num_frames": 14, "native_side": 768}
    assert parse_params({}, (1024, 576), svd).num_frames == 14
    xt = "stabilityai/stable-video-diffusion-img2vid-xt"
    assert model_defaults(xt, tmp_path) == {"num_frames": 25, "native_side": 768}
    assert model_shape(svd, tmp_path) == SVD_XT  # the same architecture: SVD-XT's estimate


def test_svd_xt_1_1s_fixed_conditioning_is_its_jobs_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SVD-XT 1.1 was fine-tuned at 6 fps and motion bucket 127: its defaults say so, a job
    of it without those fields gets them, and one that gives them keeps its own (still
    adjustable, as its model card says); other models keep 7 fps."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert model_defaults(XT_1_1, tmp_path) == {
        "num_frames": 25,
        "native_side": 768,
        "fps": 6,
        "motion_bucket_id": 127,
    }
    params = parse_params({}, (1024, 576), XT_1_1)
    assert (params.fps, params.motion_bucket_id, params.num_frames) == (6, 127, 25)
    assert parse_params({"fps": "8"}, (1024, 576), XT_1_1).fps == 8
    assert parse_params({}, (1024, 576), "stabilityai/stable-video-diffusion-img2vid-xt").fps == 7


def test_what_a_worker_advertises(tiny_model_dir: Path, tmp_path: Path) -> None:
    entries = parse_models(DEFAULT_MODELS)
    # Nothing named: what it has here (the tiny model is made on demand) and SVDFARM_MODEL.
    assert advertised_models(entries, "", "tiny", tmp_path) == ["tiny"]
    assert advertised_models(entries, "", "/m/svd", tmp_path) == ["tiny", "/m/svd"]
    # Named, by catalog id or source, here or to be downloaded.
    assert advertised_models(entries, "svd-xt,tiny,/m/other", "tiny", tmp_path) == [
        "stabilityai/stable-video-diffusion-img2vid-xt",
        "tiny",
        "/m/other",
    ]


def test_the_models_endpoint_lists_the_catalog_with_availability(
    client: FlaskClient, db: Database
) -> None:
    body = client.get("/api/v1/models").get_json()
    assert [m["id"] for m in body["models"]] == ["svd-xt", "svd", "tiny"]
    assert not any(m["available"] for m in body["models"])
    assert body["default"] == "tiny"  # SVDFARM_MODEL's, while no worker is online
    tiny = body["models"][2]
    assert tiny["source"] == "tiny"
    assert tiny["defaults"]["num_frames"] == 8 and tiny["defaults"]["native_side"] == 64
    assert tiny["defaults"]["sizes"] == [{"width": 64, "height": 64}]
    xt = body["models"][0]
    assert xt["defaults"]["num_frames"] == 25
    assert {"width": 1024, "height": 576} in xt["defaults"]["sizes"]

    xt_source = "stabilityai/stable-video-diffusion-img2vid-xt"
    add_worker(db, "gpu@a", capabilities={"device": "cuda", "models": [xt_source]})
    add_worker(db, "old@b", heartbeat_age_s=3600, capabilities={"device": "cpu", "models": ["svd"]})
    body = client.get("/api/v1/models").get_json()
    assert [m["available"] for m in body["models"]] == [True, False, False]
    assert body["default"] == "svd-xt"  # the first a live worker serves


def test_the_model_flag_takes_a_catalog_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli import settle_model

    monkeypatch.setenv("SVDFARM_MODEL", "tiny")  # restored afterwards: settle_model exports it
    settings = load_settings({"SVDFARM_DATA_DIR": str(tmp_path)})
    assert settle_model(settings, "svd-xt").model == "stabilityai/stable-video-diffusion-img2vid-xt"
    assert settle_model(settings, "/models/mine").model == "/models/mine"
    assert "model: /models/mine (--model)" in capsys.readouterr().err
