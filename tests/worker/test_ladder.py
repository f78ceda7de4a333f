"""The retry ladder walked end to end: for each error class, the exact sequence of plans from a
first plan until the ladder gives up, what it never does (repeat a plan, offload on a CPU, run
past HARD_CAP) and the errors it does not retry."""

from __future__ import annotations

from collections import Counter

import pytest

from svdfarm.states import ErrorClass
from worker.ladder import HARD_CAP, next_plan
from worker.plans import Plan

BF16_CUDA = Plan.uniform("bf16", "cuda")
FP16_MIX_MPS = Plan("mps", "fp16", "fp16", "fp32")
FP32_CPU = Plan.uniform("fp32", "cpu")
FP32_CUDA = Plan.uniform("fp32", "cuda")

RETRIED = (ErrorClass.DTYPE_MISMATCH, ErrorClass.OUT_OF_MEMORY, ErrorClass.NON_FINITE)
#: WORKER_LOST is never raised inside a render: a lost worker's job is redelivered by the claim
#: or the reaper (svdfarm/reaper.py), not retried down the ladder. STORAGE (a full disk, a
#: store error) is not a plan's fault: the reaper queues the job again later instead.
NOT_RETRIED = (
    ErrorClass.OTHER,
    ErrorClass.TIMEOUT,
    ErrorClass.MODEL_UNAVAILABLE,
    ErrorClass.WORKER_LOST,
    ErrorClass.STORAGE,
)


def plan_id(plan: Plan) -> str:
    """A test id: the plan's name."""
    return plan.name


def walk(
    start: Plan, error: ErrorClass, component: str | None = None
) -> tuple[list[Plan], list[str]]:
    """Every plan the ladder runs from ``start`` when each attempt fails with ``error``.

    Returns the plans (``start`` first) and the reasons given for the plans after it.
    """
    tried = [start]
    reasons: list[str] = []
    while (step := next_plan(tried[-1], error, component, list(tried))) is not None:
        plan, reason = step
        tried.append(plan)
        reasons.append(reason)
        assert len(tried) <= HARD_CAP, [p.name for p in tried]
    return tried, reasons


def names(plans: list[Plan]) -> list[str]:
    """The plans' readable names."""
    return [plan.name for plan in plans]


# --- out of memory ----------------------------------------------------------------------------


def test_oom_ladder_from_bf16_cuda() -> None:
    """OOM on cuda: once more, half chunk + ff chunking, chunk 1, model, sequential, fp32."""
    plans, reasons = walk(BF16_CUDA, ErrorClass.OUT_OF_MEMORY)
    assert names(plans) == [
        "bf16, chunk 8 on cuda",
        "bf16, chunk 8 on cuda",
        "bf16, chunk 4, ff chunking on cuda",
        "bf16, chunk 1, ff chunking on cuda",
        "bf16, chunk 1, model offload, ff chunking on cuda",
        "bf16, chunk 1, sequential offload, ff chunking on cuda",
        "fp32, chunk 1, sequential offload, ff chunking on cuda",
    ]
    assert "same plan once more" in reasons[0]
    assert "last resort" in reasons[-1]


def test_oom_ladder_from_fp16_mix_on_mps_has_offload_rungs() -> None:
    """MPS is an accelerator: its OOM ladder offloads to the CPU too."""
    plans, _ = walk(FP16_MIX_MPS, ErrorClass.OUT_OF_MEMORY)
    assert names(plans) == [
        "fp16 unet+enc, fp32 vae, chunk 8 on mps",
        "fp16 unet+enc, fp32 vae, chunk 8 on mps",
        "fp16 unet+enc, fp32 vae, chunk 4, ff chunking on mps",
        "fp16 unet+enc, fp32 vae, chunk 1, ff chunking on mps",
        "fp16 unet+enc, fp32 vae, chunk 1, model offload, ff chunking on mps",
        "fp16 unet+enc, fp32 vae, chunk 1, sequential offload, ff chunking on mps",
        "fp32, chunk 1, sequential offload, ff chunking on mps",
    ]


def test_oom_ladder_on_cpu_has_no_offload_rungs() -> None:
    """On a CPU there is nowhere to offload to: the ladder stops after decode chunk 1."""
    plans, _ = walk(FP32_CPU, ErrorClass.OUT_OF_MEMORY)
    assert names(plans) == [
        "fp32, chunk 8 on cpu",
        "fp32, chunk 8 on cpu",
        "fp32, chunk 4, ff chunking on cpu",
        "fp32, chunk 1, ff chunking on cpu",
    ]
    assert all(plan.offload == "none" for plan in plans)


def test_oom_ladder_from_fp32_cuda_skips_the_fp32_rung_it_already_ran() -> None:
    """Already fp32: the last rung equals sequential offload, so the ladder ends there."""
    plans, _ = walk(FP32_CUDA, ErrorClass.OUT_OF_MEMORY)
    assert names(plans) == [
        "fp32, chunk 8 on cuda",
        "fp32, chunk 8 on cuda",
        "fp32, chunk 4, ff chunking on cuda",
        "fp32, chunk 1, ff chunking on cuda",
        "fp32, chunk 1, model offload, ff chunking on cuda",
        "fp32, chunk 1, sequential offload, ff chunking on cuda",
    ]


def test_oom_ladder_from_chunk_one() -> None:
    """Starting at decode chunk 1, the first lower rung only turns on ff chunking."""
    plans, _ = walk(BF16_CUDA.with_changes(decode_chunk_size=1), ErrorClass.OUT_OF_MEMORY)
    assert names(plans) == [
        "bf16, chunk 1 on cuda",
        "bf16, chunk 1 on cuda",
        "bf16, chunk 1, ff chunking on cuda",
        "bf16, chunk 1, model offload, ff chunking on cuda",
        "bf16, chunk 1, sequential offload, ff chunking on cuda",
        "fp32, chunk 1, sequential offload, ff chunking on cuda",
    ]


def test_oom_ladder_from_chunk_two_does_not_run_chunk_one_twice() -> None:
    """Half of 2 is 1: the separate chunk-1 rung is the same plan and is skipped."""
    plans, _ = walk(BF16_CUDA.with_changes(decode_chunk_size=2), ErrorClass.OUT_OF_MEMORY)
    assert names(plans) == [
        "bf16, chunk 2 on cuda",
        "bf16, chunk 2 on cuda",
        "bf16, chunk 1, ff chunking on cuda",
        "bf16, chunk 1, model offload, ff chunking on cuda",
        "bf16, chunk 1, sequential offload, ff chunking on cuda",
        "fp32, chunk 1, sequential offload, ff chunking on cuda",
    ]


@pytest.mark.parametrize("chunk", [1, 2, 3, 8, 25, 64, 128])
def test_oom_ladder_reaches_its_last_resort_within_the_cap(chunk: int) -> None:
    """Whatever the decode chunk, the ladder gets to fp32 + sequential offload within HARD_CAP."""
    plans, _ = walk(BF16_CUDA.with_changes(decode_chunk_size=chunk), ErrorClass.OUT_OF_MEMORY)
    assert (
        plans[-1]
        == BF16_CUDA.with_changes(
            decode_chunk_size=1, forward_chunking=True, offload="sequential"
        ).all_fp32()
    )


@pytest.mark.parametrize("start", [BF16_CUDA, FP16_MIX_MPS, FP32_CPU, FP32_CUDA], ids=plan_id)
def test_oom_repeats_only_the_first_plan_once(start: Plan) -> None:
    """The one repeat after OOM is the failed first plan, straight away; no other plan twice."""
    plans, _ = walk(start, ErrorClass.OUT_OF_MEMORY)
    assert plans[0] == plans[1] == start
    counts = Counter(plan.key() for plan in plans)
    assert counts[start.key()] == 2
    assert all(n == 1 for key, n in counts.items() if key != start.key())


def test_oom_repeat_after_a_dtype_rung() -> None:
    """OOM on a plan chosen by the dtype ladder gets its one repeat too."""
    fixed = BF16_CUDA.with_changes(vae="fp32")
    step = next_plan(fixed, ErrorClass.OUT_OF_MEMORY, None, [BF16_CUDA, fixed])
    assert step is not None
    assert step[0] == fixed


def test_oom_lower_rungs_keep_dtypes_until_the_last() -> None:
    """Lower-memory rungs keep the precision; only the last resort changes dtypes."""
    plans, _ = walk(BF16_CUDA, ErrorClass.OUT_OF_MEMORY)
    assert all(plan.dtypes_name == "bf16" for plan in plans[:-1])
    assert plans[-1].dtypes_name == "fp32"


def low_memory(plan: Plan, **changes: object) -> Plan:
    """``plan`` at decode chunk 1 with ff chunking, some fields changed."""
    return plan.with_changes(decode_chunk_size=1, forward_chunking=True, **changes)


def test_oom_on_a_lower_rung_is_not_repeated() -> None:
    """After the one repeat is spent, an OOM on a lower rung moves on to the next rung."""
    half = BF16_CUDA.with_changes(decode_chunk_size=4, forward_chunking=True)
    step = next_plan(half, ErrorClass.OUT_OF_MEMORY, None, [BF16_CUDA, BF16_CUDA, half])
    assert step is not None
    assert step[0] == low_memory(BF16_CUDA)


def test_oom_halves_the_decode_chunk_once_then_goes_to_one() -> None:
    """From the half-chunk rung the next lower rung is decode chunk 1, not another halving."""
    half = BF16_CUDA.with_changes(decode_chunk_size=4, forward_chunking=True)
    step = next_plan(half, ErrorClass.OUT_OF_MEMORY, None, [half, half])
    assert step is not None
    assert step[0].name == "bf16, chunk 1, ff chunking on cuda"


def test_oom_never_steps_back_from_sequential_to_model_offload() -> None:
    """From sequential offload the only rung left is fp32; from fp32 sequential, none."""
    sequential = low_memory(BF16_CUDA, offload="sequential")
    step = next_plan(sequential, ErrorClass.OUT_OF_MEMORY, None, [sequential, sequential])
    assert step is not None
    assert step[0] == sequential.all_fp32()
    last = sequential.all_fp32()
    assert next_plan(last, ErrorClass.OUT_OF_MEMORY, None, [last, last]) is None


# --- dtype mismatch ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("component", "middle"),
    [
        ("vae", "bf16 unet+enc, fp32 vae, chunk 8 on cuda"),
        ("unet", "fp32 unet, bf16 enc+vae, chunk 8 on cuda"),
        ("image_encoder", "bf16 unet+vae, fp32 enc, chunk 8 on cuda"),
    ],
)
def test_dtype_ladder_failing_component_then_all_fp32(component: str, middle: str) -> None:
    """A dtype mismatch puts the failing component in fp32, then everything."""
    plans, reasons = walk(BF16_CUDA, ErrorClass.DTYPE_MISMATCH, component)
    assert names(plans) == ["bf16, chunk 8 on cuda", middle, "fp32, chunk 8 on cuda"]
    assert component in reasons[0]
    assert "last resort" in reasons[1]


def test_dtype_ladder_with_unknown_component_goes_straight_to_fp32() -> None:
    """When the failing component is not known, the next plan is all fp32."""
    plans, _ = walk(BF16_CUDA, ErrorClass.DTYPE_MISMATCH, None)
    assert names(plans) == ["bf16, chunk 8 on cuda", "fp32, chunk 8 on cuda"]


def test_dtype_ladder_when_the_component_is_already_fp32() -> None:
    """A mismatch blamed on a component already in fp32 goes straight to all fp32."""
    plans, _ = walk(FP16_MIX_MPS, ErrorClass.DTYPE_MISMATCH, "vae")
    assert names(plans) == ["fp16 unet+enc, fp32 vae, chunk 8 on mps", "fp32, chunk 8 on mps"]


def test_dtype_ladder_follows_a_changing_component() -> None:
    """Each attempt's own failing component goes to fp32 in turn."""
    tried = [BF16_CUDA]
    for component in ("vae", "unet", "image_encoder"):
        step = next_plan(tried[-1], ErrorClass.DTYPE_MISMATCH, component, tried)
        assert step is not None
        tried.append(step[0])
    assert next_plan(tried[-1], ErrorClass.DTYPE_MISMATCH, "unet", tried) is None
    assert names(tried) == [
        "bf16, chunk 8 on cuda",
        "bf16 unet+enc, fp32 vae, chunk 8 on cuda",
        "fp32 unet+vae, bf16 enc, chunk 8 on cuda",
        "fp32, chunk 8 on cuda",
    ]


def test_dtype_ladder_keeps_the_knobs() -> None:
    """The dtype ladder changes dtypes only: device, chunk, offload and casts stay."""
    start = Plan("cuda:1", "bf16", "bf16", "bf16", decode_chunk_size=2, offload="model")
    plans, _ = walk(start, ErrorClass.DTYPE_MISMATCH, "unet")
    assert names(plans) == [
        "bf16, chunk 2, model offload on cuda:1",
        "fp32 unet, bf16 enc+vae, chunk 2, model offload on cuda:1",
        "fp32, chunk 2, model offload on cuda:1",
    ]


# --- non-finite output ------------------------------------------------------------------------


@pytest.mark.parametrize("component", [None, "unet", "vae"])
def test_non_finite_ladder_vae_then_all_fp32(component: str | None) -> None:
    """NaN frames put the VAE in fp32, then everything, whichever component is blamed."""
    plans, reasons = walk(BF16_CUDA, ErrorClass.NON_FINITE, component)
    assert names(plans) == [
        "bf16, chunk 8 on cuda",
        "bf16 unet+enc, fp32 vae, chunk 8 on cuda",
        "fp32, chunk 8 on cuda",
    ]
    assert "VAE" in reasons[0]
    assert "last resort" in reasons[1]


def test_non_finite_ladder_with_vae_already_fp32() -> None:
    """The fp16 mix already decodes in fp32: the next plan is all fp32."""
    plans, _ = walk(FP16_MIX_MPS, ErrorClass.NON_FINITE)
    assert names(plans) == ["fp16 unet+enc, fp32 vae, chunk 8 on mps", "fp32, chunk 8 on mps"]


# --- what holds for every ladder --------------------------------------------------------------

STARTS = [
    BF16_CUDA,
    FP16_MIX_MPS,
    FP32_CPU,
    Plan.uniform("fp16", "cuda:1", decode_chunk_size=4, casts=False),
    Plan("cpu", "bf16", "fp16", "fp32", decode_chunk_size=1),
]


@pytest.mark.parametrize("start", STARTS, ids=plan_id)
@pytest.mark.parametrize("error", [ErrorClass.DTYPE_MISMATCH, ErrorClass.NON_FINITE])
@pytest.mark.parametrize("component", [None, "image_encoder", "unet", "vae"])
def test_dtype_and_non_finite_ladders_end_in_all_fp32_without_repeats(
    start: Plan, error: ErrorClass, component: str | None
) -> None:
    """These ladders never run a plan twice and always end in the start's all-fp32 plan."""
    plans, reasons = walk(start, error, component)
    assert len({plan.key() for plan in plans}) == len(plans)
    assert plans[-1] == start.all_fp32()
    assert len(reasons) == len(plans) - 1
    assert all(reason for reason in reasons)


@pytest.mark.parametrize("start", STARTS, ids=plan_id)
@pytest.mark.parametrize("error", RETRIED)
def test_all_fp32_plan_with_nothing_lower_gives_up(start: Plan, error: ErrorClass) -> None:
    """From the last rung of each ladder, the same error again ends the job."""
    plans, _ = walk(start, error, "vae")
    assert next_plan(plans[-1], error, "vae", plans) is None


@pytest.mark.parametrize("start", STARTS, ids=plan_id)
def test_ladders_stay_on_the_device(start: Plan) -> None:
    """No rung moves the job to another device."""
    for error in RETRIED:
        plans, _ = walk(start, error, "unet")
        assert {plan.device for plan in plans} == {start.device}


# --- the cap and the errors not retried -------------------------------------------------------


def distinct_plans(count: int) -> list[Plan]:
    """``count`` different plans, none of which any ladder would pick from BF16_CUDA."""
    return [BF16_CUDA.with_changes(device=f"cuda:{n + 1}") for n in range(count)]


@pytest.mark.parametrize("error", RETRIED)
@pytest.mark.parametrize("component", [None, "vae"])
def test_hard_cap_is_honoured(error: ErrorClass, component: str | None) -> None:
    """Once HARD_CAP plans were tried there is no next plan, whatever the error."""
    tried = [*distinct_plans(HARD_CAP - 1), BF16_CUDA]
    assert next_plan(BF16_CUDA, error, component, tried) is None
    assert next_plan(BF16_CUDA, error, component, [*tried, BF16_CUDA]) is None
    # One fewer and the ladder still has something to offer.
    assert next_plan(BF16_CUDA, error, component, tried[1:]) is not None


def test_hard_cap_is_small() -> None:
    """The cap is a small positive number of attempts."""
    assert 1 < HARD_CAP <= 20


@pytest.mark.parametrize("error", NOT_RETRIED)
@pytest.mark.parametrize("start", STARTS, ids=plan_id)
@pytest.mark.parametrize("component", [None, "unet"])
def test_errors_not_retried(error: ErrorClass, start: Plan, component: str | None) -> None:
    """OTHER, TIMEOUT, MODEL_UNAVAILABLE, STORAGE (and WORKER_LOST) end the attempts at once."""
    assert next_plan(start, error, component, [start]) is None


def test_every_error_class_is_covered() -> None:
    """Each error class is either retried or not, and the tests above cover all of them."""
    assert set(RETRIED) | set(NOT_RETRIED) == set(ErrorClass)
    assert not set(RETRIED) & set(NOT_RETRIED)
