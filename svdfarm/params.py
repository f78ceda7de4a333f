"""SVD's render parameters: their ranges, defaults, and the one validator the form, the API
and ``svdfarm render`` all use.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from svdfarm.catalog import FIXED_CONDITIONING, model_defaults

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
SIZE_MULTIPLE = 64
MIN_SIDE = 64
MAX_SIDE = 2048
MAX_SEED = 2**63 - 1
#: The native area of SVD and SVD-XT (UNet sample_size 96 x VAE factor 8 = 768; 1024 x 576
#: has the same area), used when the model's config cannot be read locally.
SVD_BASE_SIDE = 768
TINY_BASE_SIDE = 64
#: The range of SVD's classifier-free guidance scales (the pipeline ramps from min to max
#: across the frames; 1.0 or less turns guidance off).
MIN_GUIDANCE = 0.0
MAX_GUIDANCE = 20.0
#: The files a job can make: the MP4 always, the others when asked (``output_formats``).
OUTPUT_FORMATS = ("mp4", "webm", "gif", "frames")
#: The submission's fields that are not numbers of :data:`FIELDS` nor the precision.
OUTPUT_FIELDS = ("output_formats", "loop")
FLAG_TRUE = ("true", "1", "on", "yes")
FLAG_FALSE = ("false", "0", "off", "no", "")


@dataclass(frozen=True)
class Field:
    """One numeric parameter: its range and what it does."""

    name: str
    label: str
    kind: type
    minimum: float
    maximum: float
    help: str
    #: Shown in the form's "Advanced" section.
    advanced: bool = False


FIELDS: dict[str, Field] = {
    f.name: f
    for f in (
        Field(
            "num_frames", "Frames", int, 2, 128, "Frames in the video (SVD-XT is trained on 25)."
        ),
        Field("num_inference_steps", "Steps", int, 1, 200, "Denoising steps; more is slower."),
        Field("fps", "FPS", int, 1, 60, "Frames per second, for conditioning and playback."),
        Field("motion_bucket_id", "Motion", int, 0, 1023, "Higher means more motion (127)."),
        Field("noise_aug_strength", "Noise", float, 0.0, 1.0, "Noise added to the input (0.02)."),
        Field("seed", "Seed", int, 0, MAX_SEED, "Blank for a random seed; same seed, same video."),
        Field("decode_chunk_size", "Decode chunk", int, 1, 128, "Frames the VAE decodes at once."),
        Field("width", "Width", int, MIN_SIDE, MAX_SIDE, "Blank: fit the image to the model."),
        Field("height", "Height", int, MIN_SIDE, MAX_SIDE, "Blank: fit the image to the model."),
        Field(
            "min_guidance_scale",
            "Min guidance",
            float,
            MIN_GUIDANCE,
            MAX_GUIDANCE,
            "Guidance of the first frame, rising to max guidance by the last (1.0).",
            advanced=True,
        ),
        Field(
            "max_guidance_scale",
            "Max guidance",
            float,
            MIN_GUIDANCE,
            MAX_GUIDANCE,
            "Guidance of the last frame; at least min guidance (3.0).",
            advanced=True,
        ),
    )
}


class ParamError(ValueError):
    """One or more parameters are out of range; ``errors`` maps field name to message."""

    def __init__(self, errors: dict[str, str], status: int = 400) -> None:
        """Keep every field's message and the HTTP status it deserves; ``str()`` joins them."""
        self.errors = errors
        self.status = status
        super().__init__(" ".join(errors.values()))


@dataclass(frozen=True)
class RenderParams:
    """Validated parameters of one render."""

    num_frames: int
    num_inference_steps: int
    fps: int
    motion_bucket_id: int
    noise_aug_strength: float
    seed: int
    decode_chunk_size: int
    width: int
    height: int
    precision: str
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    #: Comma-separated, ``mp4`` first: the files the worker writes.
    output_formats: str = "mp4"
    #: Ping-pong: the frames play forward, then backward.
    loop: bool = False

    @property
    def formats(self) -> tuple[str, ...]:
        """The output formats as a tuple, ``mp4`` first."""
        return tuple(f for f in self.output_formats.split(",") if f)

    def as_dict(self) -> dict[str, Any]:
        """The parameters as a plain dict (the Job row's columns of the same names)."""
        return asdict(self)


#: The pipeline's own defaults.
GUIDANCE_DEFAULTS = {"min_guidance_scale": 1.0, "max_guidance_scale": 3.0}


def parse_output_formats(raw: Any) -> str:
    """``"gif, webm"`` as ``"mp4,webm,gif"``: known formats only, mp4 first, no repeats;
    raises ValueError naming the unknown ones."""
    asked = [p.strip(" ") for p in str(raw if raw is not None else "").split(",")]
    unknown = [p for p in asked if p and p not in OUTPUT_FORMATS]
    if unknown:
        raise ValueError(
            f"Output formats must be among {', '.join(OUTPUT_FORMATS)} (comma-separated), "
            f"got {', '.join(repr(u[:20]) for u in unknown[:5])}."
        )
    return ",".join(f for f in OUTPUT_FORMATS if f == "mp4" or f in asked)


def parse_flag(raw: Any) -> bool:
    """A form's yes/no (``on``, ``true``, ``1``, ``yes``; blank, ``off``, ``false``, ``0``,
    ``no``), in lower case as the API documents it."""
    if isinstance(raw, bool):
        return raw
    text = str(raw if raw is not None else "")
    if text in FLAG_TRUE:
        return True
    if text in FLAG_FALSE:
        return False
    raise ValueError(f"Loop must be true or false, got {text[:40]!r}.")


def is_tiny(model: str) -> bool:
    """True when ``model`` names the built-in tiny model."""
    return model.strip().lower() == "tiny"


def defaults_for(model: str) -> dict[str, Any]:
    """Form defaults: SVD's own for real models, a few-second render for the tiny one."""
    if is_tiny(model):
        return {
            "num_frames": 8,
            "num_inference_steps": 4,
            "fps": 7,
            "motion_bucket_id": 127,
            "noise_aug_strength": 0.02,
            "decode_chunk_size": 8,
            "precision": "auto",
            **GUIDANCE_DEFAULTS,
        }
    own = model_defaults(model, Path())
    return {
        # The frames its UNet was trained on (its config's num_frames), SVD-XT's 25 unknown.
        "num_frames": own["num_frames"],
        "num_inference_steps": 25,
        "fps": 7,
        "motion_bucket_id": 127,
        "noise_aug_strength": 0.02,
        "decode_chunk_size": 8,
        "precision": "auto",
        **GUIDANCE_DEFAULTS,
        # A model fine-tuned at fixed conditioning (SVD-XT 1.1: 6 fps) defaults to it.
        **{key: own[key] for key in FIXED_CONDITIONING if key in own},
    }


def model_base_side(model: str) -> int:
    """The side of the square whose area the model renders natively, read without torch."""
    if is_tiny(model):
        return TINY_BASE_SIDE
    config = Path(model).expanduser() / "unet" / "config.json"
    try:
        sample_size = json.loads(config.read_text())["sample_size"]
        vae_config = json.loads((config.parent.parent / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
        return int(sample_size) * factor
    except (OSError, ValueError, KeyError, TypeError):
        return SVD_BASE_SIDE


def fit_size(image_width: int, image_height: int, base_side: int) -> tuple[int, int]:
    """Width and height with the image's aspect and the model's area, in multiples of 64."""
    if image_width <= 0 or image_height <= 0:
        raise ValueError(f"image size must be positive, got {image_width} x {image_height}")
    area = base_side * base_side
    aspect = image_width / image_height
    width = math.sqrt(area * aspect)
    height = width / aspect

    def snap(value: float) -> int:
        snapped = int(round(value / SIZE_MULTIPLE)) * SIZE_MULTIPLE
        return min(MAX_SIDE, max(MIN_SIDE, snapped))

    return snap(width), snap(height)


@dataclass(frozen=True)
class SizePreset:
    """A width and height the model renders well, for the form's size menu."""

    width: int
    height: int

    @property
    def label(self) -> str:
        """``1024 x 576 (landscape)`` and the like."""
        shape = (
            "square"
            if self.width == self.height
            else ("landscape" if self.width > self.height else "portrait")
        )
        return f"{self.width} x {self.height} ({shape})"


def size_presets(model: str) -> list[SizePreset]:
    """Landscape 16:9, portrait 9:16 and square at the model's native area, without repeats:
    1024 x 576, 576 x 1024 and 768 x 768 for SVD and SVD-XT; 64 x 64 alone for the tiny model."""
    side = model_base_side(model)
    found: list[SizePreset] = []
    for width, height in (fit_size(16, 9, side), fit_size(9, 16, side), (side, side)):
        preset = SizePreset(width, height)
        if preset not in found:
            found.append(preset)
    return found


def _number(field: Field, raw: Any) -> int | float:
    """Parse one field's raw value (a form string or a number) or raise ValueError."""
    if isinstance(raw, bool):
        raise ValueError
    if field.kind is int:
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError
            return int(raw)
        text = str(raw).strip()
        if not text.lstrip("+-").isdigit():
            raise ValueError
        return int(text)
    value = float(raw)
    if not math.isfinite(value):
        raise ValueError
    return value


def parse_params(
    raw: Mapping[str, Any],
    image_size: tuple[int, int],
    model: str,
    rng: random.Random | None = None,
) -> RenderParams:
    """Validate ``raw`` (strings from a form, or numbers) into :class:`RenderParams`.

    Blank fields take the model's defaults; a blank seed is drawn at random; a blank width and
    height fit the image (``image_size``) to the model. Every bad field is reported at once.
    """
    defaults = defaults_for(model)
    errors: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, field in FIELDS.items():
        value = raw.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            values[name] = defaults.get(name)
            continue
        try:
            number = _number(field, value)
        except (ValueError, TypeError, OverflowError):
            kind = "a whole number" if field.kind is int else "a number"
            errors[name] = f"{field.label} must be {kind}, got {str(value)[:40]!r}."
            continue
        if not field.minimum <= number <= field.maximum:
            errors[name] = (
                f"{field.label} must be between {field.minimum:g} and {field.maximum:g}, "
                f"got {number:g}."
            )
            continue
        values[name] = number

    precision = str(raw.get("precision") or defaults["precision"]).strip().lower()
    if precision not in PRECISIONS:
        errors["precision"] = (
            f"Precision must be one of {', '.join(PRECISIONS)}, got {precision[:40]!r}."
        )

    try:
        output_formats = parse_output_formats(raw.get("output_formats"))
    except ValueError as exc:
        errors["output_formats"] = str(exc)
    try:
        loop = parse_flag(raw.get("loop"))
    except ValueError as exc:
        errors["loop"] = str(exc)

    low, high = "min_guidance_scale", "max_guidance_scale"
    if low not in errors and high not in errors and values[low] > values[high]:
        if _given(raw, low) and _given(raw, high):
            errors[high] = (
                f"Max guidance must be at least min guidance ({values[low]:g}), "
                f"got {values[high]:g}."
            )
        elif _given(raw, low):
            values[high] = values[low]  # a blank max follows a min above its default
        else:
            values[low] = values[high]  # a blank min follows a max below its default

    width, height = values.get("width"), values.get("height")
    if (width is None) != (height is None) and "width" not in errors and "height" not in errors:
        missing = "height" if height is None else "width"
        errors[missing] = "Give both width and height, or leave both blank to fit the image."
    for name in ("width", "height"):
        side = values.get(name)
        if side is not None and name not in errors and side % SIZE_MULTIPLE:
            errors[name] = (
                f"{FIELDS[name].label} must be a multiple of {SIZE_MULTIPLE}, got {side}."
            )
    if errors:
        raise ParamError(errors)

    if width is None or height is None:
        width, height = fit_size(image_size[0], image_size[1], model_base_side(model))
    seed = values["seed"]
    if seed is None:
        seed = (rng or random.SystemRandom()).randrange(0, 2**32)
    return RenderParams(
        num_frames=int(values["num_frames"]),
        num_inference_steps=int(values["num_inference_steps"]),
        fps=int(values["fps"]),
        motion_bucket_id=int(values["motion_bucket_id"]),
        noise_aug_strength=float(values["noise_aug_strength"]),
        seed=int(seed),
        decode_chunk_size=int(values["decode_chunk_size"]),
        width=int(width),
        height=int(height),
        precision=precision,
        min_guidance_scale=float(values["min_guidance_scale"]),
        max_guidance_scale=float(values["max_guidance_scale"]),
        output_formats=output_formats,
        loop=loop,
    )


def _given(raw: Mapping[str, Any], name: str) -> bool:
    """True when ``raw`` holds a non-blank value for ``name``."""
    value = raw.get(name)
    return value is not None and not (isinstance(value, str) and not value.strip())


#: What ``output_formats`` accepts, as a regular expression (the OpenAPI document's pattern).
OUTPUT_FORMATS_PATTERN = "^ *(({0}) *)?(, *(({0}) *)?)*$".format("|".join(OUTPUT_FORMATS))
