"""The first plan of a job: a table of capability profiles x precisions, the reasons given when
a wish cannot be met, the casts flag, per-component overrides and the decode chunk cap."""

from __future__ import annotations

import dataclasses

import pytest

from svdfarm.params import RenderParams, parse_params
from worker.planner import first_plan
from worker.probe import Capabilities

_GIB = 1024**3


def caps(device: str, name: str, **changes: object) -> Capabilities:
    """Capabilities of a worker named ``name`` on ``device``; bf16 and fp16 work unless changed."""
    fields: dict[str, object] = {
        "device": device,
        "name": name,
        "count": 1,
        "total_memory_bytes": 80 * _GIB,
        "free_memory_bytes": 79 * _GIB,
        "compute_capability": "9.0" if device == "cuda" else None,
        "bf16_driver": True,
        "bf16_op": True,
        "fp16": True,
        "torch_version": "2.9.0",
        "diffusers_version": "0.35.0",
        "cuda_version": "12.8" if device == "cuda" else None,
        "cpu_count": 16,
    }
    fields.update(changes)
    return Capabilities(**fields)  # type: ignore[arg-type]


#: Profiles by short id. Each one names a situation the planner must tell apart.
PROFILES: dict[str, Capabilities] = {
    # bf16 everywhere, 80 GB.
    "h100": caps("cuda", "NVIDIA H100 80GB HBM3"),
    # Turing, 24 GB: fp16 only, the driver refuses bf16 (the op might pass by emulation).
    "titan": caps(
        "cuda",
        "NVIDIA TITAN RTX",
        total_memory_bytes=24 * _GIB,
        compute_capability="7.5",
        bf16_driver=False,
    ),
    # The driver claims bf16 but a real bf16 op gave the wrong answer.
    "liar": caps("cuda", "NVIDIA A10G", total_memory_bytes=24 * _GIB, bf16_op=False),
    # Neither reduced precision works.
    "k80": caps(
        "cuda",
        "Tesla K80",
        total_memory_bytes=12 * _GIB,
        compute_capability="3.7",
        bf16_driver=False,
        bf16_op=False,
        fp16=False,
    ),
    # Apple silicon on macOS 14+: bf16 works, fp16 works.
    "m2": caps("mps", "Apple M2 Max"),
    # Apple silicon before macOS 14: torch refuses bf16.
    "m1": caps("mps", "Apple M1", bf16_driver=False, bf16_op=False),
    # A CPU where both reduced precisions pass the op test.
    "epyc": caps("cpu", "AMD EPYC 7763 64-Core Processor"),
    # A CPU where the bf16 op and fp16 fail.
    "xeon": caps("cpu", "Intel(R) Xeon(R) CPU E5-2680 v2", bf16_op=False, fp16=False),
}

FP16_MIX = "fp16 unet+enc, fp32 vae"

#: (profile, precision) -> (expected plan name, why a reason is given or None when none is).
TABLE: list[tuple[str, str, str, str | None]] = [
    ("h100", "auto", "bf16, chunk 8 on cuda", None),
    ("h100", "bf16", "bf16, chunk 8 on cuda", None),
    ("h100", "fp16", "fp16, chunk 8 on cuda", None),
    ("h100", "fp32", "fp32, chunk 8 on cuda", None),
    ("titan", "auto", f"{FP16_MIX}, chunk 8 on cuda", None),
    ("titan", "bf16", f"{FP16_MIX}, chunk 8 on cuda", "its driver says no"),
    ("titan", "fp16", "fp16, chunk 8 on cuda", None),
    ("titan", "fp32", "fp32, chunk 8 on cuda", None),
    ("liar", "auto", f"{FP16_MIX}, chunk 8 on cuda", None),
    ("liar", "bf16", f"{FP16_MIX}, chunk 8 on cuda", "a test op in bf16 failed"),
    ("liar", "fp16", "fp16, chunk 8 on cuda", None),
    ("liar", "fp32", "fp32, chunk 8 on cuda", None),
    ("k80", "auto", "fp32, chunk 8 on cuda", None),
    ("k80", "bf16", "fp32, chunk 8 on cuda", "its driver says no"),
    ("k80", "fp16", "fp32, chunk 8 on cuda", "fp16 was asked for"),
    ("k80", "fp32", "fp32, chunk 8 on cuda", None),
    # auto on MPS is the fp16 mix even where bf16 works: the code picks bf16 on CUDA only.
    ("m2", "auto", f"{FP16_MIX}, chunk 8 on mps", None),
    ("m2", "bf16", "bf16, chunk 8 on mps", None),
    ("m2", "fp16", "fp16, chunk 8 on mps", None),
    ("m2", "fp32", "fp32, chunk 8 on mps", None),
    ("m1", "auto", f"{FP16_MIX}, chunk 8 on mps", None),
    ("m1", "bf16", f"{FP16_MIX}, chunk 8 on mps", "its driver says no"),
    ("m1", "fp16", "fp16, chunk 8 on mps", None),
    ("m1", "fp32", "fp32, chunk 8 on mps", None),
    ("epyc", "auto", "fp32, chunk 8 on cpu", None),
    ("epyc", "bf16", "bf16, chunk 8 on cpu", None),
    ("epyc", "fp16", "fp16, chunk 8 on cpu", None),
    ("epyc", "fp32", "fp32, chunk 8 on cpu", None),
    ("xeon", "auto", "fp32, chunk 8 on cpu", None),
    ("xeon", "bf16", "fp32, chunk 8 on cpu", "a test op in bf16 failed"),
    ("xeon", "fp16", "fp32, chunk 8 on cpu", "fp16 was asked for"),
    ("xeon", "fp32", "fp32, chunk 8 on cpu", None),
]


def params(**changes: object) -> RenderParams:
    """The tiny model's default parameters (8 frames, decode chunk 8, auto), some changed."""
    base = parse_params({}, (64, 64), "tiny")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_table_covers_every_profile_and_precision() -> None:
    """The table has one row per profile and precision, so none is forgotten."""
    rows = {(profile, precision) for profile, precision, _, _ in TABLE}
    assert rows == {(p, q) for p in PROFILES for q in ("auto", "bf16", "fp16", "fp32")}
    assert len(rows) == len(TABLE)


@pytest.mark.parametrize(
    ("profile", "precision", "expected", "why"),
    TABLE,
    ids=[f"{profile}-{precision}" for profile, precision, _, _ in TABLE],
)
def test_first_plan_table(profile: str, precision: str, expected: str, why: str | None) -> None:
    """Each profile and precision gives the expected plan, with a reason only when needed."""
    worker = PROFILES[profile]
    plan, reason = first_plan(worker, params(), precision)
    assert plan.name == expected
    assert plan.device == worker.device
    assert (plan.offload, plan.forward_chunking, plan.casts) == ("none", False, True)
    if why is None:
        assert reason is None
        return
    assert reason is not None
    assert why in reason
    # The reason says what was asked, on which device, and what ran instead.
    assert f"{precision} was asked for" in reason
    assert f"{worker.name} ({worker.device})" in reason
    instead = "using fp32" if precision == "fp16" else f"running {plan.dtypes_name} instead"
    assert instead in reason


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_precision_defaults_to_the_params(precision: str) -> None:
    """Without a precision argument the job's own precision is used."""
    plan, reason = first_plan(PROFILES["h100"], params(precision=precision))
    assert plan.name == f"{precision}, chunk 8 on cuda"
    assert reason is None


def test_precision_argument_wins_over_the_params() -> None:
    """A precision passed in replaces the one in the params."""
    plan, _ = first_plan(PROFILES["h100"], params(precision="fp16"), "fp32")
    assert plan.name == "fp32, chunk 8 on cuda"


@pytest.mark.parametrize("precision", [" BF16 ", "Bf16", "bf16\n"])
def test_precision_is_read_loosely(precision: str) -> None:
    """Case and surrounding space do not matter."""
    assert first_plan(PROFILES["h100"], params(), precision)[0].name == "bf16, chunk 8 on cuda"


@pytest.mark.parametrize("precision", ["fp8", "float16", "half", "int8"])
def test_unknown_precision_is_refused(precision: str) -> None:
    """An unknown precision is a ValueError naming it and the known ones."""
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp16, fp32") as info:
        first_plan(PROFILES["h100"], params(), precision)
    assert repr(precision) in str(info.value)


def test_unknown_precision_in_the_params_is_refused() -> None:
    """A bad precision that got into the params is refused too, not silently replaced."""
    with pytest.raises(ValueError, match="got 'fp8'"):
        first_plan(PROFILES["h100"], params(precision="fp8"))


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_casts_flag_is_applied(profile: str) -> None:
    """casts=False reaches the plan and its name on every profile."""
    plan, _ = first_plan(PROFILES[profile], params(), casts=False)
    assert plan.casts is False
    assert plan.name.endswith(f", no casts on {PROFILES[profile].device}")
    assert first_plan(PROFILES[profile], params())[0].casts is True


@pytest.mark.parametrize(
    ("profile", "precision", "dtypes", "expected"),
    [
        ("h100", "auto", {"vae": "fp32"}, "bf16 unet+enc, fp32 vae, chunk 8 on cuda"),
        ("h100", "fp16", {"image_encoder": "fp32"}, "fp16 unet+vae, fp32 enc, chunk 8 on cuda"),
        (
            "h100",
            "bf16",
            {"unet": "fp32", "vae": "fp32"},
            "fp32 unet+vae, bf16 enc, chunk 8 on cuda",
        ),
        ("titan", "auto", {"vae": "fp16"}, "fp16, chunk 8 on cuda"),
        ("epyc", "auto", {"unet": "bf16"}, "bf16 unet, fp32 enc+vae, chunk 8 on cpu"),
        (
            "m2",
            "fp32",
            {"image_encoder": "fp16", "unet": "fp16", "vae": "fp16"},
            "fp16, chunk 8 on mps",
        ),
        ("h100", "auto", {}, "bf16, chunk 8 on cuda"),
    ],
)
def test_dtypes_override_wins(
    profile: str, precision: str, dtypes: dict[str, str], expected: str
) -> None:
    """A per-component override replaces what the precision chose for those components."""
    plan, reason = first_plan(PROFILES[profile], params(), precision, dtypes=dtypes)
    assert plan.name == expected
    assert reason is None


def test_dtypes_override_applies_after_a_fallback() -> None:
    """An override still applies when bf16 could not be met, and the reason is still given."""
    plan, reason = first_plan(PROFILES["titan"], params(), "bf16", dtypes={"unet": "fp32"})
    assert plan.name == "fp32 unet+vae, fp16 enc, chunk 8 on cuda"
    assert reason is not None and "bf16 was asked for" in reason


def test_dtypes_override_with_casts_off() -> None:
    """Override and casts flag combine."""
    plan, _ = first_plan(PROFILES["h100"], params(), casts=False, dtypes={"vae": "fp32"})
    assert plan.name == "bf16 unet+enc, fp32 vae, chunk 8, no casts on cuda"


def test_bad_dtypes_override_is_refused() -> None:
    """An override with a dtype the plans do not know is refused with its value."""
    with pytest.raises(ValueError, match="vae dtype .* got 'fp8'"):
        first_plan(PROFILES["h100"], params(), dtypes={"vae": "fp8"})


@pytest.mark.parametrize(
    ("num_frames", "decode_chunk_size", "expected"),
    [(4, 8, 4), (2, 128, 2), (25, 8, 8), (8, 8, 8), (14, 1, 1), (25, 25, 25), (25, 30, 25)],
)
def test_decode_chunk_is_capped_at_num_frames(
    num_frames: int, decode_chunk_size: int, expected: int
) -> None:
    """The VAE never decodes more frames at once than the video has."""
    job = params(num_frames=num_frames, decode_chunk_size=decode_chunk_size)
    for worker in PROFILES.values():
        plan, _ = first_plan(worker, job)
        assert plan.decode_chunk_size == expected


def test_decode_chunk_from_parse_params() -> None:
    """A small video parsed from a form gets a chunk no larger than its frame count."""
    job = parse_params({"num_frames": "3", "decode_chunk_size": "16"}, (64, 64), "tiny")
    plan, _ = first_plan(PROFILES["h100"], job)
    assert plan.name == "bf16, chunk 3 on cuda"
