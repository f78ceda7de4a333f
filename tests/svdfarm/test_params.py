"""Render parameters: ranges, defaults, random seeds, fitting the image to the model."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import pytest

from svdfarm.models import Job
from svdfarm.params import (
    FIELDS,
    MAX_SEED,
    OUTPUT_FIELDS,
    OUTPUT_FORMATS_PATTERN,
    PRECISIONS,
    SVD_BASE_SIDE,
    ParamError,
    RenderParams,
    defaults_for,
    fit_size,
    model_base_side,
    parse_params,
)

SVD = "stabilityai/stable-video-diffusion-img2vid-xt"


def parse(raw: dict[str, Any], size: tuple[int, int] = (96, 64), model: str = "tiny") -> Any:
    """parse_params with a seeded random generator."""
    return parse_params(raw, size, model, rng=random.Random(1))


def errors_of(raw: dict[str, Any], model: str = "tiny") -> dict[str, str]:
    """The field -> message map parse_params raises for ``raw``."""
    with pytest.raises(ParamError) as info:
        parse(raw, model=model)
    assert info.value.status == 400
    return info.value.errors


@pytest.mark.parametrize(
    ("size", "base", "expected"),
    [
        ((1920, 1080), 768, (1024, 576)),
        ((1024, 576), 768, (1024, 576)),
        ((1080, 1920), 768, (576, 1024)),
        ((500, 500), 768, (768, 768)),
        ((1024, 768), 768, (896, 640)),
        ((768, 1024), 768, (640, 896)),
        ((1500, 1000), 768, (960, 640)),
        ((10000, 1000), 768, (2048, 256)),
        ((1000, 10000), 768, (256, 2048)),
        ((96, 64), 64, (64, 64)),
        ((128, 32), 64, (128, 64)),
        ((1920, 1080), 1024, (1344, 768)),
    ],
)
def test_fit_size_keeps_the_aspect_and_the_models_area(
    size: tuple[int, int], base: int, expected: tuple[int, int]
) -> None:
    """fit_size gives the nearest multiples of 64 with the image's aspect and the model's area."""
    assert fit_size(size[0], size[1], base) == expected


@pytest.mark.parametrize("aspect", [0.02, 0.3, 0.5625, 0.75, 1.0, 4 / 3, 16 / 9, 2.35, 7.0, 50.0])
@pytest.mark.parametrize("base", [64, 512, 768, 1024])
def test_fit_size_is_always_a_valid_render_size(aspect: float, base: int) -> None:
    """Every fitted size is a multiple of 64 between 64 and 2048, whatever the image's shape."""
    width, height = fit_size(round(1000 * aspect), 1000, base)
    for side in (width, height):
        assert side % 64 == 0
        assert FIELDS["width"].minimum <= side <= FIELDS["width"].maximum
    if 0.5 <= aspect <= 2 and base >= 512:
        # Unclamped, and large enough for 64 to be a fine grid: the model's area and the
        # image's aspect, give or take the rounding to 64.
        assert abs(width * height - base * base) <= 64 * (width + height) + 64 * 64
        assert math.isclose(width / height, aspect, rel_tol=0.35)


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (-5, 10)])
def test_fit_size_refuses_an_empty_image(size: tuple[int, int]) -> None:
    """A zero or negative image size is a ValueError that shows the size."""
    with pytest.raises(ValueError, match=f"{size[0]} x {size[1]}"):
        fit_size(size[0], size[1], 768)


def test_model_base_side_reads_the_local_configs(tmp_path: Path) -> None:
    """A local model's side is the UNet's sample size times the VAE's downscale factor."""
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 96}))
    (tmp_path / "vae" / "config.json").write_text(
        json.dumps({"block_out_channels": [128, 256, 512, 512]})
    )
    assert model_base_side(str(tmp_path)) == 768
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"sample_size": 32}))
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 64]}))
    assert model_base_side(str(tmp_path)) == 64


def test_model_base_side_falls_back_to_svd(tmp_path: Path) -> None:
    """A hub name, a missing or a broken config give SVD's native side; "tiny" gives 64."""
    assert model_base_side(SVD) == SVD_BASE_SIDE
    assert model_base_side(str(tmp_path)) == SVD_BASE_SIDE
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text("{not json")
    assert model_base_side(str(tmp_path)) == SVD_BASE_SIDE
    assert model_base_side(" Tiny ") == 64


def test_parse_params_fills_the_tiny_models_defaults() -> None:
    """Empty input takes the tiny model's defaults and fits the image to 64 x 64."""
    params = parse({})
    expected = defaults_for("tiny")
    assert {k: getattr(params, k) for k in expected} == expected
    assert (params.width, params.height) == (64, 64)
    assert params.precision == "auto"


def test_parse_params_fills_svds_defaults() -> None:
    """A real model gets SVD's defaults (25 frames, 25 steps) and its 1024 x 576 for 16:9."""
    params = parse({}, size=(1920, 1080), model=SVD)
    assert (params.num_frames, params.num_inference_steps, params.fps) == (25, 25, 7)
    assert (params.motion_bucket_id, params.noise_aug_strength) == (127, 0.02)
    assert (params.decode_chunk_size, params.precision) == (8, "auto")
    assert (params.width, params.height) == (1024, 576)


def test_blank_strings_take_the_defaults() -> None:
    """Blank form fields (empty or spaces) count as not given."""
    blank = {name: "  " for name in FIELDS} | {"precision": ""}
    assert parse(blank) == parse({})


def test_form_strings_are_parsed() -> None:
    """Form strings become numbers of the field's kind; explicit sizes override the fit."""
    raw = {
        "num_frames": " 14 ",
        "num_inference_steps": "+3",
        "fps": "12",
        "motion_bucket_id": "0",
        "noise_aug_strength": "0.5",
        "seed": "42",
        "decode_chunk_size": "2",
        "width": "128",
        "height": "192",
        "precision": " BF16 ",
    }
    params = parse(raw)
    assert params == RenderParams(
        num_frames=14,
        num_inference_steps=3,
        fps=12,
        motion_bucket_id=0,
        noise_aug_strength=0.5,
        seed=42,
        decode_chunk_size=2,
        width=128,
        height=192,
        precision="bf16",
    )
    assert isinstance(params.noise_aug_strength, float)
    assert isinstance(params.num_frames, int)


def test_json_numbers_are_accepted() -> None:
    """Numbers (not strings) work too; a whole float is accepted where an int is wanted."""
    params = parse({"num_frames": 12.0, "noise_aug_strength": 1, "seed": 7})
    assert (params.num_frames, params.noise_aug_strength, params.seed) == (12, 1.0, 7)


def test_a_blank_seed_is_drawn_at_random_within_range() -> None:
    """Without a seed each render draws one, in range, and different ones over many draws."""
    seeds = {parse_params({}, (96, 64), "tiny").seed for _ in range(20)}
    assert len(seeds) > 1
    assert all(0 <= seed <= MAX_SEED for seed in seeds)
    first = parse_params({"seed": ""}, (96, 64), "tiny", rng=random.Random(5)).seed
    again = parse_params({"seed": ""}, (96, 64), "tiny", rng=random.Random(5)).seed
    assert first == again


@pytest.mark.parametrize("seed", [0, 1, MAX_SEED])
def test_a_given_seed_is_kept(seed: int) -> None:
    """A seed at either end of its range is kept as given."""
    assert parse({"seed": str(seed)}).seed == seed


@pytest.mark.parametrize("name", list(FIELDS))
def test_each_field_accepts_its_bounds(name: str) -> None:
    """The minimum and the maximum of every field are valid values."""
    field = FIELDS[name]
    for bound in (field.minimum, field.maximum):
        raw: dict[str, Any] = {name: str(field.kind(bound))}
        if name in ("width", "height"):
            raw = {"width": "64", "height": "64", name: str(int(bound))}
        assert getattr(parse(raw), name) == bound


def _outside(name: str) -> list[str]:
    """Values just below the minimum and just above the maximum of a field."""
    field = FIELDS[name]
    step = 1 if field.kind is int else 0.01
    return [str(field.kind(field.minimum - step)), str(field.kind(field.maximum + step))]


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name in FIELDS for value in _outside(name)]
)
def test_each_field_refuses_values_out_of_range(name: str, value: str) -> None:
    """Below the minimum or above the maximum: an error naming the field, its range, the value."""
    raw = {"width": "64", "height": "64"} if name in ("width", "height") else {}
    errors = errors_of(raw | {name: value})
    assert list(errors) == [name]
    field = FIELDS[name]
    assert field.label in errors[name]
    assert f"between {field.minimum:g} and {field.maximum:g}" in errors[name]
    assert f"got {float(value):g}" in errors[name]


@pytest.mark.parametrize(
    ("name", "value", "phrase"),
    [
        ("num_frames", "abc", "whole number"),
        ("num_frames", "8.5", "whole number"),
        ("fps", "1e1", "whole number"),
        ("seed", "0x10", "whole number"),
        ("motion_bucket_id", "12 3", "whole number"),
        ("decode_chunk_size", True, "whole number"),
        ("num_inference_steps", 2.5, "whole number"),
        ("noise_aug_strength", "abc", "a number"),
        ("noise_aug_strength", "nan", "a number"),
        ("noise_aug_strength", "inf", "a number"),
        ("noise_aug_strength", "-inf", "a number"),
        ("noise_aug_strength", "1e400", "a number"),
        ("noise_aug_strength", float("nan"), "a number"),
    ],
)
def test_each_field_refuses_what_is_not_a_number_of_its_kind(
    name: str, value: Any, phrase: str
) -> None:
    """Text, fractions where an int is wanted, and non-finite floats are refused."""
    errors = errors_of({name: value})
    assert list(errors) == [name]
    assert phrase in errors[name]
    assert FIELDS[name].label in errors[name]


@pytest.mark.parametrize("precision", ["fp8", "int4", "float16", "auto2"])
def test_unknown_precision_is_refused(precision: str) -> None:
    """A precision outside auto/bf16/fp16/fp32 is refused with the allowed ones listed."""
    errors = errors_of({"precision": precision})
    assert list(errors) == ["precision"]
    assert precision in errors["precision"]
    assert all(p in errors["precision"] for p in PRECISIONS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_each_precision_is_accepted(precision: str) -> None:
    """Every listed precision is valid, in any case."""
    assert parse({"precision": precision.upper()}).precision == precision


@pytest.mark.parametrize(("given", "missing"), [("width", "height"), ("height", "width")])
def test_one_side_without_the_other_is_refused(given: str, missing: str) -> None:
    """Width without height (or the reverse) is an error on the missing side."""
    errors = errors_of({given: "128"})
    assert list(errors) == [missing]
    assert "both" in errors[missing]


@pytest.mark.parametrize("value", ["100", "65", "127", "1000"])
def test_sides_must_be_multiples_of_64(value: str) -> None:
    """A width or height in range but not a multiple of 64 is refused, with the value."""
    errors = errors_of({"width": value, "height": value})
    assert set(errors) == {"width", "height"}
    assert "multiple of 64" in errors["width"]
    assert value in errors["width"]


def test_every_error_is_reported_at_once() -> None:
    """Several bad fields give one ParamError with a message for each, joined in str()."""
    raw = {
        "num_frames": "1",
        "fps": "fast",
        "noise_aug_strength": "nan",
        "width": "100",
        "height": "-64",
        "precision": "fp8",
    }
    with pytest.raises(ParamError) as info:
        parse(raw)
    errors = info.value.errors
    assert set(errors) == {
        "num_frames",
        "fps",
        "noise_aug_strength",
        "width",
        "height",
        "precision",
    }
    for message in errors.values():
        assert message in str(info.value)


def test_long_bad_values_are_cut_in_messages() -> None:
    """A huge bad value is not echoed in full."""
    errors = errors_of({"fps": "x" * 10_000, "precision": "y" * 10_000})
    assert len(errors["fps"]) < 200
    assert len(errors["precision"]) < 200


def test_render_params_match_the_job_columns() -> None:
    """as_dict gives exactly the Job columns of the same names, so a Job can be built from it."""
    params = parse({})
    assert set(params.as_dict()) == set(FIELDS) | {"precision", *OUTPUT_FIELDS}
    columns = set(Job.__table__.columns.keys())
    assert set(params.as_dict()) <= columns


def test_guidance_scales_default_to_the_pipelines() -> None:
    """Blank guidance scales are the pipeline's own, 1.0 rising to 3.0."""
    params = parse({"min_guidance_scale": "", "max_guidance_scale": " "})
    assert (params.min_guidance_scale, params.max_guidance_scale) == (1.0, 3.0)
    given = parse({"min_guidance_scale": "1.5", "max_guidance_scale": "7"})
    assert (given.min_guidance_scale, given.max_guidance_scale) == (1.5, 7.0)
    flat = parse({"min_guidance_scale": "2.5", "max_guidance_scale": "2.5"})
    assert (flat.min_guidance_scale, flat.max_guidance_scale) == (2.5, 2.5)


def test_min_guidance_above_max_is_refused_with_both_values() -> None:
    """Both given and min above max: one error on max guidance naming both values."""
    errors = errors_of({"min_guidance_scale": "5", "max_guidance_scale": "2"})
    assert errors == {
        "max_guidance_scale": "Max guidance must be at least min guidance (5), got 2."
    }


def test_a_blank_bound_follows_the_other() -> None:
    """One bound given beyond the other's default: the blank one follows it, no error."""
    high = parse({"min_guidance_scale": "6"})
    assert (high.min_guidance_scale, high.max_guidance_scale) == (6.0, 6.0)
    low = parse({"max_guidance_scale": "0.5"})
    assert (low.min_guidance_scale, low.max_guidance_scale) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, "mp4"),
        ("", "mp4"),
        ("mp4", "mp4"),
        ("gif", "mp4,gif"),
        ("frames, gif ,webm", "mp4,webm,gif,frames"),
        ("webm,webm,,", "mp4,webm"),
    ],
)
def test_output_formats_are_normalised_with_mp4_first(raw: Any, expected: str) -> None:
    """Known formats in any order, repeats and blanks: mp4 first, then the others in order."""
    params = parse({} if raw is None else {"output_formats": raw})
    assert params.output_formats == expected
    assert params.formats == tuple(expected.split(","))
    if raw is not None:
        assert re.fullmatch(OUTPUT_FORMATS_PATTERN, raw)  # as the OpenAPI document says


@pytest.mark.parametrize("raw", ["avi", "mp4,mov", "GIF", "gif\n", "webm;gif"])
def test_unknown_output_formats_are_refused_by_name(raw: str) -> None:
    """An unknown format (case counts) is refused with the known ones listed."""
    errors = errors_of({"output_formats": raw})
    assert list(errors) == ["output_formats"]
    assert "mp4, webm, gif, frames" in errors["output_formats"]
    assert not re.fullmatch(OUTPUT_FORMATS_PATTERN, raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", False), ("false", False), ("0", False), ("on", True), ("true", True), ("1", True)],
)
def test_loop_reads_a_forms_yes_and_no(raw: str, expected: bool) -> None:
    """A checkbox's ``on``, the API's true/false and 1/0; blank is no loop."""
    assert parse({"loop": raw}).loop is expected
    assert parse({}).loop is False


def test_a_bad_loop_is_refused() -> None:
    """Anything else is an error naming the field."""
    assert "Loop must be true or false" in errors_of({"loop": "maybe"})["loop"]
