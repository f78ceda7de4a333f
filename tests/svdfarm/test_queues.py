"""Worker classes as queues: capability profiles -> tiers and queues, queue names, memory
estimates, and routing a job to the queue that will run it.

The profiles are what :func:`worker.probe.probe` reports on real machines (memory in bytes as
``torch.cuda.mem_get_info`` gives it); the routing table pins today's estimate constants, so a
calibration of ``svdfarm.queues`` is expected to update it.

The fit rule: ``tier_of`` admits a card to a tier down to 90% of the tier's size (an "80 GB"
card reports less than 80e9 bytes), so a job goes to the smallest tier whose *smallest admitted
card* holds its estimate: ``estimate <= 0.9 x tier``. Usable sizes by tier: 8 -> 7.2 GB,
12 -> 10.8, 16 -> 14.4, 24 -> 21.6, 40 -> 36, 48 -> 43.2, 80 -> 72, 141 -> 126.9.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from svdfarm.catalog import catalog_keys, parse_models, queue_key
from svdfarm.queues import (
    DEVICES,
    PRECISION_CLASSES,
    TIERS_GB,
    Unroutable,
    WorkerClass,
    all_queues,
    estimate_memory_bytes,
    expand_queues,
    parse_queue,
    precision_class,
    queue_model,
    queues_for,
    route,
    tier_of,
    with_model,
)
from worker.probe import Capabilities

GB = 1_000_000_000


def caps(
    device: str,
    name: str,
    total: int | None,
    bf16_driver: bool,
    bf16_op: bool,
    fp16: bool,
    compute_capability: str | None = None,
) -> dict[str, Any]:
    """A probe result as a worker advertises it (``Capabilities.as_dict()``)."""
    return Capabilities(
        device=device,
        name=name,
        count=1,
        total_memory_bytes=total,
        free_memory_bytes=None if total is None else total - 500_000_000,
        compute_capability=compute_capability,
        bf16_driver=bf16_driver,
        bf16_op=bf16_op,
        fp16=fp16,
        torch_version="2.5.1",
        diffusers_version="0.32.2",
        cuda_version="12.4" if device == "cuda" else None,
        cpu_count=16,
    ).as_dict()


PROFILES: dict[str, dict[str, Any]] = {
    "H200 141GB": caps("cuda", "NVIDIA H200", 150_754_820_096, True, True, True, "9.0"),
    "H100 80GB": caps("cuda", "NVIDIA H100 80GB HBM3", 85_520_809_984, True, True, True, "9.0"),
    "A100 40GB": caps("cuda", "NVIDIA A100-SXM4-40GB", 42_505_273_344, True, True, True, "8.0"),
    "RTX 4090 24GB": caps(
        "cuda", "NVIDIA GeForce RTX 4090", 25_393_692_672, True, True, True, "8.9"
    ),
    # Volta claims no native bf16; the op may still pass through emulation: not enough.
    "V100 32GB": caps("cuda", "Tesla V100-SXM2-32GB", 34_089_730_048, False, True, True, "7.0"),
    "T4 16GB": caps("cuda", "Tesla T4", 15_843_721_216, False, False, True, "7.5"),
    "RTX 2060 6GB": caps("cuda", "NVIDIA GeForce RTX 2060", 6_222_839_808, False, False, True),
    # An Apple M2 with 16 GB unified memory: torch.mps.recommended_max_memory().
    "Apple M2": caps("mps", "Apple M2", 11_453_251_584, True, True, True),
    # torch's CPU kernels do bf16 and fp16, but emulated: CPU boxes serve fp32 only.
    "CPU 24GB": caps("cpu", "AMD EPYC 7543 32-Core Processor", 25_769_803_776, True, True, True),
    # A driver that claims bf16 whose kernels give wrong answers, and a card whose fp16 fails.
    "bf16 op broken 24GB": caps("cuda", "broken bf16", 25_393_692_672, True, False, True, "8.6"),
    "fp16 broken 24GB": caps("cuda", "broken fp16", 25_393_692_672, True, True, False, "8.6"),
    "mps memory unknown": caps("mps", "Apple GPU", None, True, True, True),
}


def queue_set(device: str, precisions: str, tiers: tuple[int, ...]) -> set[str]:
    """``svd.<device>.<precision>.<tier>g`` for each of the space-separated precisions x tiers."""
    return {f"svd.{device}.{p}.{t}g" for p in precisions.split() for t in tiers}


# profile -> (its tier, exactly the queues it consumes)
EXPECTED: dict[str, tuple[int | None, set[str]]] = {
    "H200 141GB": (141, queue_set("cuda", "bf16 fp16 fp32", (8, 12, 16, 24, 40, 48, 80, 141))),
    "H100 80GB": (80, queue_set("cuda", "bf16 fp16 fp32", (8, 12, 16, 24, 40, 48, 80))),
    "A100 40GB": (40, queue_set("cuda", "bf16 fp16 fp32", (8, 12, 16, 24, 40))),
    "RTX 4090 24GB": (24, queue_set("cuda", "bf16 fp16 fp32", (8, 12, 16, 24))),
    "V100 32GB": (24, queue_set("cuda", "fp16 fp32", (8, 12, 16, 24))),
    "T4 16GB": (16, queue_set("cuda", "fp16 fp32", (8, 12, 16))),
    "RTX 2060 6GB": (None, set()),
    "Apple M2": (12, queue_set("mps", "bf16 fp16 fp32", (8, 12))),
    "CPU 24GB": (24, queue_set("cpu", "fp32", (8, 12, 16, 24))),
    "bf16 op broken 24GB": (24, queue_set("cuda", "fp16 fp32", (8, 12, 16, 24))),
    "fp16 broken 24GB": (24, queue_set("cuda", "bf16 fp32", (8, 12, 16, 24))),
    "mps memory unknown": (None, set()),
}


# ---- capability profiles -> queues ---------------------------------------------------------


@pytest.mark.parametrize("profile", list(EXPECTED))
def test_profile_tier_and_queues(profile: str) -> None:
    """Each realistic profile lands in its tier and consumes exactly its queues, once each."""
    tier, expected = EXPECTED[profile]
    capabilities = PROFILES[profile]
    assert tier_of(capabilities["total_memory_bytes"]) == tier
    queues = queues_for(capabilities)
    assert len(queues) == len(set(queues))
    assert set(queues) == expected


def test_profiles_survive_the_json_round_trip() -> None:
    """The profiles are valid probe output: ``Capabilities.from_dict`` reads each back."""
    for capabilities in PROFILES.values():
        assert Capabilities.from_dict(capabilities).as_dict() == capabilities


def test_t4_queues_spelled_out() -> None:
    """A 16 GB fp16-only card: no bf16 queue, fp16 and fp32 up to 16 GB, nothing larger."""
    assert sorted(queues_for(PROFILES["T4 16GB"])) == [
        "svd.cuda.fp16.12g",
        "svd.cuda.fp16.16g",
        "svd.cuda.fp16.8g",
        "svd.cuda.fp32.12g",
        "svd.cuda.fp32.16g",
        "svd.cuda.fp32.8g",
    ]


def test_a_cpu_box_never_serves_reduced_precision() -> None:
    """Even a huge CPU box with working bf16/fp16 ops is only on fp32 cpu queues."""
    big = caps("cpu", "Xeon", 2_000_000_000_000, True, True, True)
    queues = queues_for(big)
    assert queues and all(q.startswith("svd.cpu.fp32.") for q in queues)
    assert "svd.cpu.fp32.141g" in queues


@pytest.mark.parametrize(
    ("total", "tier"),
    [
        (None, None),
        (0, None),
        (7_199_999_999, None),  # just below 90% of 8 GB
        (7_200_000_000, 8),
        (8_000_000_000, 8),
        (10_800_000_000, 12),
        (14_399_999_999, 12),
        (14_400_000_000, 16),
        (126_900_000_000, 141),
        (10**13, 141),  # more than the largest tier is still that tier
    ],
)
def test_tier_boundaries(total: int | None, tier: int | None) -> None:
    """A device is in the largest tier whose 90% its memory reaches; below 7.2 GB in none."""
    assert tier_of(total) == tier


# ---- queue names ---------------------------------------------------------------------------


def test_all_queues_is_every_device_precision_tier() -> None:
    """The scheme has one queue per device x precision x tier, all distinct."""
    names = all_queues()
    assert len(names) == len(set(names)) == len(DEVICES) * len(PRECISION_CLASSES) * len(TIERS_GB)
    assert all(re.fullmatch(r"svd\.(cuda|mps|cpu)\.(bf16|fp16|fp32)\.\d+g", n) for n in names)


@pytest.mark.parametrize("name", all_queues())
def test_parse_queue_round_trip(name: str) -> None:
    """Every queue of the scheme parses to a class whose queue is that name again."""
    klass = parse_queue(name)
    assert klass.queue == name
    assert klass.device in DEVICES and klass.precision in PRECISION_CLASSES
    assert klass.tier_gb in TIERS_GB
    assert klass.describe() == (
        f"a {klass.device} worker with {klass.precision} and >= {klass.tier_gb} GB"
    )


def test_every_profile_queue_is_in_the_scheme() -> None:
    """What a worker consumes is always a name of the scheme."""
    scheme = set(all_queues())
    for capabilities in PROFILES.values():
        assert set(queues_for(capabilities)) <= scheme


@pytest.mark.parametrize(
    "name",
    [
        "",
        "celery",
        "svd.default",
        "svd.cuda.fp16",
        "svd.cuda.fp16.16",  # no g
        "svd.cuda.fp16.16G",
        "svd.cuda.fp16.16gb",
        "svd.cuda.fp16.g",
        "svd.cuda.fp16.-8g",
        "svd.cuda.fp16.20g",  # not a tier
        "svd.cuda.fp16.16g.",  # an empty model part
        "svd.cuda.fp16.16g.Bad/Model",  # a model part outside the ids' characters
        "svd.cuda.fp16.16g.tiny\n",
        "svd..fp16.16g",
        "svd.rocm.fp16.16g",
        "svd.CUDA.fp16.16g",
        "svd.cuda.int8.16g",
        "svd.cuda.auto.16g",  # auto is a job's precision, not a class
        "svd.cuda.fp16. 16g",
        "svdx.cuda.fp16.16g",
        "SVD.cuda.fp16.16g",
        "cuda.fp16.16g",
    ],
)
def test_parse_queue_refuses_malformed_names(name: str) -> None:
    """Names outside the scheme raise ValueError naming the value and the expected form."""
    with pytest.raises(ValueError) as caught:
        parse_queue(name)
    message = str(caught.value)
    assert repr(name) in message
    assert "svd.<device>.<precision>.<tier>g" in message


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("svd.cuda.fp16.016g", id="leading-zero"),
        pytest.param("svd.cuda.fp16.\u0661\u0666g", id="arabic-indic-digits"),
        pytest.param("svd.cuda.fp16.+16g", id="plus-sign"),
        pytest.param("svd.cuda.fp16.1_6g", id="underscore"),
        pytest.param("svd.cuda.fp16.16g\n", id="trailing-newline"),
        pytest.param("svd.cuda.fp16.\uff11\uff16g", id="fullwidth-digits"),
    ],
)
def test_parse_queue_refuses_non_canonical_tiers(name: str) -> None:
    """A tier spelled another way (leading zero, non-ASCII digits) is not a queue of the scheme.

    Otherwise ``--queues svd.cuda.fp16.016g`` validates, yet no job is ever sent to it.
    """
    with pytest.raises(ValueError):
        parse_queue(name)


# ---- memory estimates ----------------------------------------------------------------------


def increasing(values: list[int]) -> bool:
    """True when each value is larger than the one before."""
    return all(a < b for a, b in zip(values, values[1:], strict=False))


def test_estimate_grows_with_frames() -> None:
    """More frames need more memory, at every precision class."""
    for klass in PRECISION_CLASSES:
        sizes = [estimate_memory_bytes(f, 1024, 576, 8, klass) for f in range(2, 129)]
        assert increasing(sizes), klass


def test_estimate_grows_with_size() -> None:
    """A larger width or height (in multiples of 64) needs more memory."""
    for klass in PRECISION_CLASSES:
        widths = [estimate_memory_bytes(25, w, 576, 8, klass) for w in range(64, 2049, 64)]
        heights = [estimate_memory_bytes(25, 1024, h, 8, klass) for h in range(64, 2049, 64)]
        assert increasing(widths), klass
        assert increasing(heights), klass


def test_estimate_grows_with_decode_chunk_up_to_the_frames() -> None:
    """A larger decode chunk needs more memory; beyond the frame count it changes nothing."""
    for klass in PRECISION_CLASSES:
        chunks = [estimate_memory_bytes(25, 1024, 576, c, klass) for c in range(1, 26)]
        assert increasing(chunks), klass
        beyond = {estimate_memory_bytes(25, 1024, 576, c, klass) for c in range(25, 129)}
        assert beyond == {chunks[-1]}


@pytest.mark.parametrize(
    "job", [(2, 64, 64, 1), (14, 1024, 576, 8), (25, 1024, 576, 8), (128, 2048, 2048, 128)]
)
def test_estimate_is_lowest_in_bf16(job: tuple[int, int, int, int]) -> None:
    """bf16 needs less than fp16 (whose VAE stays fp32), which needs less than fp32."""
    bf16, fp16, fp32 = (estimate_memory_bytes(*job, k) for k in ("bf16", "fp16", "fp32"))
    assert bf16 < fp32
    assert bf16 < fp16 < fp32


def test_estimate_includes_the_weights() -> None:
    """The smallest job still needs SVD-XT's weights: over 9 GB in fp32, over 4.5 GB in bf16."""
    assert estimate_memory_bytes(2, 64, 64, 1, "fp32") > 2255 * 4 * 1_000_000
    assert estimate_memory_bytes(2, 64, 64, 1, "bf16") > 2255 * 2 * 1_000_000


def test_precision_classes_of_job_precisions() -> None:
    """auto is fp16 on a GPU; every job is fp32 on the CPU."""
    assert [precision_class(p, "cuda") for p in ("auto", "bf16", "fp16", "fp32")] == [
        "fp16",
        "bf16",
        "fp16",
        "fp32",
    ]
    assert {precision_class(p, "cpu") for p in ("auto", "bf16", "fp16", "fp32")} == {"fp32"}


# ---- routing -------------------------------------------------------------------------------


def smallest_card(tier: int) -> int:
    """The least memory ``tier_of`` admits to ``tier``: 90% of its size, in bytes."""
    memory = tier * GB * 9 // 10
    assert tier_of(memory) == tier and tier_of(memory - 1) != tier
    return memory


# Estimates (decimal GB) from estimate_memory_bytes: weights + UNet activations + VAE decode
# chunk + 1.5 GB overhead; fp16 keeps the VAE in fp32, so it needs more than bf16.
TINY = (4, 64, 64, 8)  # fp16 6.23 (8 GB tier: <= 7.2), fp32 10.55 (12: <= 10.8)
SVD_XT = (25, 1024, 576, 8)  # SVD-XT's defaults: fp16 15.22 (> 14.4: the 24 GB tier),
#                              bf16 11.40 (> 10.8: 16), fp32 21.31 (<= 21.6: 24)
SVD_XT_CHUNK4 = (25, 1024, 576, 4)  # fp16 11.60 (16 GB tier: a T4 takes it), fp32 17.68 (24)
LONG = (128, 1024, 1024, 8)  # fp16 35.20 (<= 36: 40), bf16 28.56 (40), fp32 55.62 (80)
LARGE = (128, 1536, 1536, 8)  # fp32 111.99 (<= 126.9: 141)
HUGE_BF16 = (128, 2048, 2048, 8)  # bf16 96.20 (141), fp32 190.91: no CPU class can take it

ONLINE: dict[str, frozenset[str]] = {
    "nobody": frozenset(),
    "H100": frozenset(queues_for(PROFILES["H100 80GB"])),
    "T4": frozenset(queues_for(PROFILES["T4 16GB"])),
    "V100": frozenset(queues_for(PROFILES["V100 32GB"])),
    "CPU": frozenset(queues_for(PROFILES["CPU 24GB"])),
    "T4+CPU": frozenset(queues_for(PROFILES["T4 16GB"]) + queues_for(PROFILES["CPU 24GB"])),
    "M2": frozenset(queues_for(PROFILES["Apple M2"])),
    "H100+M2": frozenset(queues_for(PROFILES["H100 80GB"]) + queues_for(PROFILES["Apple M2"])),
}

# (job, precision, allow_cpu, who is online) -> queue
ROUTES = [
    # Nobody online: the CPU when allowed, else the smallest fitting CUDA tier, where it waits.
    (TINY, "auto", True, "nobody", "svd.cpu.fp32.12g"),
    (TINY, "auto", False, "nobody", "svd.cuda.fp16.8g"),
    (TINY, "fp32", False, "nobody", "svd.cuda.fp32.12g"),
    (SVD_XT, "auto", True, "nobody", "svd.cpu.fp32.24g"),
    (SVD_XT, "auto", False, "nobody", "svd.cuda.fp16.24g"),  # 15.22 GB: a 16 GB card may have 14.4
    (SVD_XT, "bf16", False, "nobody", "svd.cuda.bf16.16g"),  # 11.40 GB: over a 12 GB tier's 10.8
    (SVD_XT, "fp32", False, "nobody", "svd.cuda.fp32.24g"),
    (SVD_XT_CHUNK4, "auto", False, "nobody", "svd.cuda.fp16.16g"),
    (LONG, "auto", True, "nobody", "svd.cpu.fp32.80g"),
    (LONG, "auto", False, "nobody", "svd.cuda.fp16.40g"),
    (LONG, "bf16", False, "nobody", "svd.cuda.bf16.40g"),
    (LONG, "fp32", False, "nobody", "svd.cuda.fp32.80g"),
    (LARGE, "fp32", True, "nobody", "svd.cpu.fp32.141g"),
    (LARGE, "fp32", False, "nobody", "svd.cuda.fp32.141g"),
    # Too big for any CPU class even when allowed: the CUDA class, where it waits.
    (HUGE_BF16, "bf16", True, "nobody", "svd.cuda.bf16.141g"),
    # A live GPU consumer of the fitting queue wins over the CPU.
    (TINY, "auto", True, "H100", "svd.cuda.fp16.8g"),
    (SVD_XT, "auto", True, "H100", "svd.cuda.fp16.24g"),
    (SVD_XT, "bf16", True, "H100", "svd.cuda.bf16.16g"),
    (LONG, "fp32", True, "H100", "svd.cuda.fp32.80g"),
    (TINY, "auto", True, "T4", "svd.cuda.fp16.8g"),
    (SVD_XT_CHUNK4, "auto", True, "T4", "svd.cuda.fp16.16g"),
    (SVD_XT, "auto", True, "V100", "svd.cuda.fp16.24g"),
    # ... but not a GPU that cannot take the job: its class or tier is not consumed.
    (SVD_XT, "auto", True, "T4", "svd.cpu.fp32.24g"),  # needs the 24 GB tier, the T4 is in 16
    (SVD_XT, "auto", False, "T4", "svd.cuda.fp16.24g"),  # waits for a 24 GB card
    (SVD_XT, "bf16", True, "T4", "svd.cpu.fp32.24g"),  # a T4 has no bf16
    (SVD_XT, "bf16", False, "T4", "svd.cuda.bf16.16g"),  # waits for a bf16 card
    (SVD_XT, "fp32", True, "T4", "svd.cpu.fp32.24g"),  # needs 24 GB, the T4 has 16
    (LONG, "auto", True, "V100", "svd.cpu.fp32.80g"),  # needs 40 GB, the V100 is in 24
    (LONG, "auto", False, "V100", "svd.cuda.fp16.40g"),
    # Live CPU workers: the CPU queue when allowed; ignored when not.
    (TINY, "auto", True, "CPU", "svd.cpu.fp32.12g"),
    (SVD_XT, "auto", True, "CPU", "svd.cpu.fp32.24g"),
    (LONG, "auto", True, "CPU", "svd.cpu.fp32.80g"),  # larger than the live CPU: still CPU
    (SVD_XT, "auto", False, "CPU", "svd.cuda.fp16.24g"),
    # Both: the GPU when it can take it, the CPU otherwise.
    (TINY, "auto", True, "T4+CPU", "svd.cuda.fp16.8g"),
    (SVD_XT_CHUNK4, "auto", True, "T4+CPU", "svd.cuda.fp16.16g"),
    (SVD_XT, "auto", True, "T4+CPU", "svd.cpu.fp32.24g"),  # too big for the T4's tier
    (SVD_XT, "bf16", True, "T4+CPU", "svd.cpu.fp32.24g"),
    # A Mac (mps, 12 GB tier) takes what fits its tier and class, before the CPU.
    (TINY, "auto", True, "M2", "svd.mps.fp16.8g"),
    (TINY, "auto", False, "M2", "svd.mps.fp16.8g"),
    (TINY, "bf16", False, "M2", "svd.mps.bf16.8g"),
    (TINY, "fp32", False, "M2", "svd.mps.fp32.12g"),  # 10.55 GB <= 10.8
    (SVD_XT, "bf16", True, "M2", "svd.cpu.fp32.24g"),  # needs the 16 GB tier
    (SVD_XT, "bf16", False, "M2", "svd.cuda.bf16.16g"),  # nobody can: it waits on CUDA
    # CUDA before mps when both can take it (the order of DEVICES).
    (TINY, "auto", True, "H100+M2", "svd.cuda.fp16.8g"),
]


@pytest.mark.parametrize(
    ("job", "precision", "allow_cpu", "online", "queue"),
    [
        pytest.param(*r, id=f"{r[0][0]}x{r[0][1]}x{r[0][2]}c{r[0][3]}-{r[1]}-cpu{r[2]}-{r[3]}")
        for r in ROUTES
    ],
)
def test_route_table(
    job: tuple[int, int, int, int], precision: str, allow_cpu: bool, online: str, queue: str
) -> None:
    """Each job size, precision, CPU policy and set of live queues routes to its queue."""
    routed = route(*job, precision, allow_cpu=allow_cpu, online_queues=ONLINE[online])
    assert routed.queue == queue
    assert routed.worker_class == parse_queue(queue)
    klass = routed.worker_class
    assert routed.memory_bytes == estimate_memory_bytes(*job, klass.precision)
    assert routed.memory_bytes <= smallest_card(klass.tier_gb)


@pytest.mark.parametrize(
    ("job", "precision"),
    [(TINY, "auto"), (SVD_XT, "auto"), (SVD_XT, "bf16"), (SVD_XT_CHUNK4, "auto"), (LONG, "fp32")],
)
def test_route_picks_the_smallest_fitting_tier(
    job: tuple[int, int, int, int], precision: str
) -> None:
    """With CPU not allowed and nobody online, the chosen tier's smallest card holds the job
    and the tier below's does not."""
    routed = route(*job, precision, allow_cpu=False)
    tiers = list(TIERS_GB)
    index = tiers.index(routed.worker_class.tier_gb)
    assert routed.memory_bytes <= smallest_card(tiers[index])
    assert index == 0 or routed.memory_bytes > smallest_card(tiers[index - 1])


def test_svd_xt_defaults_need_the_24_gb_fp16_tier() -> None:
    """SVD-XT's default auto job (15.2 GB at fp16) is over what a 16 GB card may have (14.4 GB):
    it goes to the 24 GB fp16 tier; in bf16 (11.4 GB) it is over 10.8 GB, so the 16 GB tier."""
    fp16 = estimate_memory_bytes(*SVD_XT, "fp16")
    bf16 = estimate_memory_bytes(*SVD_XT, "bf16")
    assert smallest_card(16) < fp16 <= smallest_card(24)
    assert smallest_card(12) < bf16 <= smallest_card(16)
    assert route(*SVD_XT, "auto", allow_cpu=False).queue == "svd.cuda.fp16.24g"
    assert route(*SVD_XT, "fp16", allow_cpu=False).queue == "svd.cuda.fp16.24g"
    assert route(*SVD_XT, "bf16", allow_cpu=False).queue == "svd.cuda.bf16.16g"


def test_route_respects_the_cpu_memory_limit() -> None:
    """A job larger than ``cpu_max_gb`` is not sent to the CPU, even when CPU is allowed."""
    assert route(*LONG, "auto", allow_cpu=True, cpu_max_gb=24).queue == "svd.cuda.fp16.40g"
    assert route(*SVD_XT, "auto", allow_cpu=True, cpu_max_gb=24).queue == "svd.cpu.fp32.24g"
    assert route(*SVD_XT, "auto", allow_cpu=True, cpu_max_gb=16).queue == "svd.cuda.fp16.24g"


def test_online_queues_accepts_any_iterable() -> None:
    """``online_queues`` may be a list, set or generator of names."""
    names = queues_for(PROFILES["T4 16GB"])
    for online in (names, set(names), iter(names)):
        assert route(*TINY, "auto", allow_cpu=True, online_queues=online).queue == (
            "svd.cuda.fp16.8g"
        )


@pytest.mark.parametrize("allow_cpu", [True, False])
def test_unroutable_names_the_memory_and_the_largest_class(allow_cpu: bool) -> None:
    """A job above every class raises Unroutable with the GB it needs and the largest tier."""
    job = (128, 2048, 2048, 64)
    need = estimate_memory_bytes(*job, "fp32")
    assert need > 141 * GB
    with pytest.raises(Unroutable) as caught:
        route(*job, "fp32", allow_cpu=allow_cpu, online_queues=ONLINE["H100"])
    message = str(caught.value)
    assert f"about {need / GB:.0f} GB" in message
    assert "fp32" in message
    assert "largest worker class (141 GB cards) holds about 127 GB" in message
    assert "fewer frames" in message  # says what to change
    assert isinstance(caught.value, ValueError)


def test_a_job_between_the_largest_card_and_its_nominal_size_is_unroutable() -> None:
    """A job over 126.9 GB (90% of 141) is refused even if under 141 GB: a card admitted to the
    141 GB tier may not hold it."""
    job = (128, 1664, 1664, 8)
    need = estimate_memory_bytes(*job, "fp32")
    assert smallest_card(141) < need < 141 * GB
    with pytest.raises(Unroutable):
        route(*job, "fp32", allow_cpu=True)


def test_unroutable_at_auto_counts_the_gpu_class() -> None:
    """For an auto job the message gives the fp16 GPU estimate, the smallest it could need."""
    job = (128, 2048, 2048, 128)
    need = estimate_memory_bytes(*job, "fp16")
    with pytest.raises(Unroutable, match=rf"about {need / GB:.0f} GB at auto precision"):
        route(*job, "auto", allow_cpu=True)


def test_worker_class_describe_reads_as_a_sentence() -> None:
    """``describe`` is what the status page says is needed."""
    assert WorkerClass("cpu", "fp32", 40).describe() == "a cpu worker with fp32 and >= 40 GB"
    assert WorkerClass("cuda", "bf16", 80).queue == "svd.cuda.bf16.80g"


# ---- properties the routing owes the workers -----------------------------------------------


def test_a_mac_worker_gets_the_jobs_it_can_run() -> None:
    """With only an Apple M2 online, a small job goes to an mps queue that Mac consumes.

    ``queues_for`` subscribes MPS workers to ``svd.mps.*`` queues, so ``route`` must send jobs
    there: otherwise a Mac-only farm (or a Mac with CPU not allowed) never runs a job.
    """
    online = queues_for(PROFILES["Apple M2"])
    for allow_cpu in (False, True):
        routed = route(*TINY, "auto", allow_cpu=allow_cpu, online_queues=online)
        assert routed.queue in online, (allow_cpu, routed.queue)


def _jobs_near_16_gb() -> list[tuple[int, int, int, int]]:
    """Job sizes whose fp16 estimate lies between a T4's memory and 16 GB."""
    return [(14, 832, 832, 8), (6, 1600, 1600, 2), (10, 768, 768, 16)]


def _too_small_consumers(queue: str, need: int) -> list[str]:
    """The profiles that consume ``queue`` with less memory than ``need``."""
    return [
        name
        for name, capabilities in PROFILES.items()
        if queue in queues_for(capabilities) and capabilities["total_memory_bytes"] < need
    ]


@pytest.mark.parametrize("job", _jobs_near_16_gb())
def test_a_routed_job_fits_every_worker_of_its_queue(job: tuple[int, int, int, int]) -> None:
    """Every profile that consumes the routed queue has at least the job's estimated memory.

    ``tier_of`` admits cards down to 90% of a tier (a T4 reports 15.84e9 bytes, in the 16 GB
    tier), so a job estimated at 15.9 GB must not go to the 16 GB tier: it goes to 24 GB.
    """
    need = estimate_memory_bytes(*job, "fp16")
    assert PROFILES["T4 16GB"]["total_memory_bytes"] < need <= 16 * GB
    routed = route(*job, "auto", allow_cpu=False)
    assert routed.queue == "svd.cuda.fp16.24g"
    too_small = _too_small_consumers(routed.queue, routed.memory_bytes)
    assert too_small == [], f"{routed.queue} ({routed.memory_bytes / GB:.2f} GB) -> {too_small}"


PROPERTY_JOBS = [
    TINY,
    SVD_XT,
    SVD_XT_CHUNK4,
    LONG,
    LARGE,
    HUGE_BF16,
    *_jobs_near_16_gb(),
    (14, 1024, 576, 8),
    (25, 768, 768, 8),
    (50, 1024, 576, 16),
    (128, 1664, 1664, 8),
]


@pytest.mark.parametrize("online", list(ONLINE))
@pytest.mark.parametrize("allow_cpu", [True, False])
@pytest.mark.parametrize("precision", ["auto", "bf16", "fp16", "fp32"])
def test_no_route_ever_reaches_a_worker_too_small(
    precision: str, allow_cpu: bool, online: str
) -> None:
    """Over many jobs, whoever is online: the routed estimate fits the smallest card of its
    tier, and no profile consuming the routed queue has less memory than the estimate."""
    for job in PROPERTY_JOBS:
        try:
            routed = route(*job, precision, allow_cpu=allow_cpu, online_queues=ONLINE[online])
        except Unroutable:
            continue
        assert routed.memory_bytes <= smallest_card(routed.worker_class.tier_gb), job
        too_small = _too_small_consumers(routed.queue, routed.memory_bytes)
        assert too_small == [], f"{job}: {routed.queue} -> {too_small}"
        if routed.queue not in ONLINE[online]:
            # Nobody online can take it: the CPU when allowed and a CPU class fits, else CUDA.
            cpu_fits = estimate_memory_bytes(*job, "fp32") <= smallest_card(TIERS_GB[-1])
            expected = "cpu" if allow_cpu and cpu_fits else "cuda"
            assert routed.worker_class.device == expected, (job, routed.queue)


# ---- a queue per model ---------------------------------------------------------------------


def test_a_model_queue_parses_to_its_class_and_model() -> None:
    """``svd.cuda.bf16.24g.svd-xt`` is the 24 GB bf16 class's queue for SVD-XT; a bare class
    name (the scheme before models) still parses, without a model."""
    assert with_model("svd.cuda.bf16.24g", "svd-xt") == "svd.cuda.bf16.24g.svd-xt"
    assert parse_queue("svd.cuda.bf16.24g.svd-xt") == WorkerClass("cuda", "bf16", 24)
    assert queue_model("svd.cuda.bf16.24g.svd-xt") == "svd-xt"
    assert queue_model("svd.cuda.bf16.24g.svd-xt-1.1") == "svd-xt-1.1"
    assert queue_model("svd.cuda.bf16.24g") is None
    assert with_model("svd.cuda.bf16.24g", "") == "svd.cuda.bf16.24g"


def test_a_worker_consumes_its_classes_for_each_model_it_advertises() -> None:
    """A T4 advertising SVD-XT and the tiny model consumes each of its class queues twice,
    once per model, and no queue of a model it lacks; ``--queues`` names without a model
    are expanded the same way."""
    bare = queues_for(PROFILES["T4 16GB"])
    both = queues_for(PROFILES["T4 16GB"], ["svd-xt", "tiny"])
    assert len(both) == 2 * len(bare) and len(set(both)) == len(both)
    assert {queue_model(q) for q in both} == {"svd-xt", "tiny"}
    assert "svd.cuda.fp16.8g.svd-xt" in both and "svd.cuda.fp16.8g.svd" not in both
    assert expand_queues(["svd.cuda.fp16.8g", "svd.cpu.fp32.8g.svd"], ["svd-xt", "tiny"]) == [
        "svd.cuda.fp16.8g.svd-xt",
        "svd.cuda.fp16.8g.tiny",
        "svd.cpu.fp32.8g.svd",
    ]
    assert set(both) <= set(all_queues(["svd-xt", "svd", "tiny"]))


def test_a_job_routes_to_its_models_queue_and_counts_only_workers_with_it() -> None:
    """A job of SVD-XT goes to a queue of SVD-XT's; a live T4 that consumes only the tiny
    model's queues does not take it (CPU allowed: the CPU's SVD-XT queue; not allowed: the
    T4 class's SVD-XT queue, where it waits for a worker with the model)."""
    tiny_t4 = queues_for(PROFILES["T4 16GB"], ["tiny"])
    xt_t4 = queues_for(PROFILES["T4 16GB"], ["svd-xt"])
    routed = route(*TINY, "auto", allow_cpu=True, online_queues=tiny_t4, model_key="svd-xt")
    assert routed.queue == "svd.cpu.fp32.12g.svd-xt" and routed.worker_class.device == "cpu"
    waits = route(*TINY, "auto", allow_cpu=False, online_queues=tiny_t4, model_key="svd-xt")
    assert waits.queue == "svd.cuda.fp16.8g.svd-xt" and waits.queue not in tiny_t4
    served = route(*TINY, "auto", allow_cpu=True, online_queues=xt_t4, model_key="svd-xt")
    assert served.queue == "svd.cuda.fp16.8g.svd-xt" and served.queue in xt_t4
    assert route(*TINY, "auto", allow_cpu=True, online_queues=tiny_t4, model_key="tiny").queue == (
        "svd.cuda.fp16.8g.tiny"
    )


def test_a_models_queue_key_is_its_catalog_id() -> None:
    """The key is the catalog id (any case, found by id or source); a source outside the
    catalog gets a slug with a hash, never a ``/`` (and two such sources never share one)."""
    entries = parse_models("SVD-XT=stabilityai/stable-video-diffusion-img2vid-xt,tiny=tiny")
    assert queue_key(entries, "stabilityai/stable-video-diffusion-img2vid-xt") == "svd-xt"
    assert queue_key(entries, "tiny") == "tiny"
    assert catalog_keys(entries) == ["svd-xt", "tiny"]
    mine, other = queue_key(entries, "/models/My SVD"), queue_key(entries, "/models/my-svd")
    assert mine != other
    for key in (mine, other):
        assert queue_model(with_model("svd.cpu.fp32.8g", key)) == key
        assert parse_queue(with_model("svd.cpu.fp32.8g", key)).tier_gb == 8
