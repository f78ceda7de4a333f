"""Worker classes as Celery queues, the memory a job needs, and routing a job to a queue.

Queue names read ``svd.<device>.<precision>.<tier>g.<model>``:

- ``device``: ``cuda``, ``mps`` or ``cpu``;
- ``precision``: what the job needs of the hardware: ``bf16`` (real bf16), ``fp16`` (fp16
  with an fp32 VAE or better: every GPU; the class of ``auto`` jobs on GPUs) or ``fp32``;
- ``tier``: memory in GB (decimal, as cards are sold): 8, 12, 16, 24, 40, 48, 80, 141;
- ``model``: the job's model, its catalog id (:func:`svdfarm.catalog.queue_key`), so
  ``svd.cuda.bf16.24g.svd-xt``. The first four parts are the worker class.

A worker subscribes to every queue it can serve: its device, each precision its probe
supports (a bf16 card serves bf16, fp16 and fp32 jobs), every tier up to its own, for each
model it advertises, so a job reaches only a worker that has its model and the dispatcher's
count of a queue's idle consumers is a count of those that serve the model. A job goes to the
smallest tier that fits its estimated memory at its precision. A name without the model (the
scheme before models were part of it) still parses: ``--queues`` expands it to the worker's
models. No torch here: the web routes with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from svdfarm.catalog import SVD_XT, ModelShape

PREFIX = "svd"
DEVICES = ("cuda", "mps", "cpu")
PRECISION_CLASSES = ("bf16", "fp16", "fp32")
TIERS_GB = (8, 12, 16, 24, 40, 48, 80, 141)
#: Cards report a little less than their sold size (an "80 GB" card has 79.2 GiB usable).
_TIER_SLACK = 0.9
_GB = 1_000_000_000
#: What a model's part of a queue name holds (a catalog id in lower case).
_MODEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Activation constants, to be calibrated on a GPU: fp32 bytes per latent pixel per frame per
# channel of the UNet's first block (both classifier-free-guidance halves, attention included;
# SVD's 320 channels give 2 x 320 x 24), per decoded pixel per frame per channel of the VAE's
# first block in a decode chunk (SVD's 128 give 128 x 4 x 3), and a fixed overhead (CUDA
# context, allocator slack; on a CPU, the libraries).
UNET_BYTES_PER_CHANNEL = 2 * 24
VAE_BYTES_PER_CHANNEL = 4 * 3
OVERHEAD_BYTES = int(1.5 * _GB)


@dataclass(frozen=True)
class WorkerClass:
    """What a queue promises: a device, a precision class and at least ``tier_gb`` GB."""

    device: str
    precision: str
    tier_gb: int

    @property
    def queue(self) -> str:
        """The Celery queue of this class."""
        return f"{PREFIX}.{self.device}.{self.precision}.{self.tier_gb}g"

    def describe(self) -> str:
        """The class as a person reads it: ``a cuda worker with bf16 and >= 40 GB``."""
        return f"a {self.device} worker with {self.precision} and >= {self.tier_gb} GB"


def with_model(queue: str, model_key: str) -> str:
    """``queue`` (a class's) for jobs of one model: ``svd.cuda.bf16.24g.svd-xt``."""
    return f"{queue}.{model_key}" if model_key else queue


def queue_model(name: str) -> str | None:
    """The model part of a queue name (``svd-xt``), or None for a class's bare queue."""
    parts = name.split(".", 4)
    return parts[4] if len(parts) == 5 and parts[4] else None


def parse_queue(name: str) -> WorkerClass:
    """The worker class of a queue name, with or without its model part; ValueError for
    names outside the scheme."""
    model = queue_model(name)
    parts = name.split(".", 4)[:4] if model else name.split(".")
    if (
        len(parts) != 4
        or (model is not None and not set(model) <= _MODEL_CHARS)
        or parts[0] != PREFIX
        or parts[1] not in DEVICES
        or parts[2] not in PRECISION_CLASSES
        or parts[3] not in {f"{t}g" for t in TIERS_GB}
    ):
        raise ValueError(
            f"{name!r} is not an svdfarm queue: expected {PREFIX}.<device>.<precision>.<tier>g"
            "[.<model>] "
            f"with device in {DEVICES}, precision in {PRECISION_CLASSES}, tier in {TIERS_GB}"
        )
    return WorkerClass(parts[1], parts[2], int(parts[3][:-1]))


def all_queues(model_keys: Iterable[str] = ()) -> list[str]:
    """Every queue name the scheme defines: each class's, for each of ``model_keys`` (the
    catalog's, :func:`svdfarm.catalog.queue_key`); without them, the classes' bare names."""
    classes = [
        WorkerClass(d, p, t).queue for d in DEVICES for p in PRECISION_CLASSES for t in TIERS_GB
    ]
    keys = list(model_keys)
    return [with_model(q, k) for k in keys for q in classes] if keys else classes


def tier_of(total_memory_bytes: int | None) -> int | None:
    """The largest tier a device with this much memory belongs to (None: below the smallest)."""
    if not total_memory_bytes:
        return None
    fits = [t for t in TIERS_GB if total_memory_bytes >= t * _GB * _TIER_SLACK]
    return max(fits) if fits else None


def served_precisions(device: str, bf16: bool, fp16: bool) -> list[str]:
    """The precision classes a worker serves, from its probe."""
    if device == "cpu":
        return ["fp32"]  # bf16 and fp16 are emulated on CPU: slower than fp32, never routed there
    classes = ["fp32"]
    if fp16:
        classes.insert(0, "fp16")
    if bf16:
        classes.insert(0, "bf16")
    return classes


def queues_for(capabilities: Mapping[str, Any], model_keys: Iterable[str] = ()) -> list[str]:
    """Every queue a worker with these capabilities (``Capabilities.as_dict()``) can serve,
    for each model it advertises (``model_keys``; none: the classes' bare names)."""
    device = str(capabilities["device"])
    tier = tier_of(capabilities.get("total_memory_bytes"))
    if tier is None:
        return []
    bf16 = bool(capabilities.get("bf16_driver")) and bool(capabilities.get("bf16_op"))
    precisions = served_precisions(device, bf16, bool(capabilities.get("fp16")))
    classes = [WorkerClass(device, p, t).queue for p in precisions for t in TIERS_GB if t <= tier]
    return expand_queues(classes, model_keys)


def expand_queues(names: Iterable[str], model_keys: Iterable[str]) -> list[str]:
    """``names`` with each bare class queue made one per model of ``model_keys`` (a name
    with its model part stays as it is); with no model keys, ``names`` unchanged."""
    keys = list(model_keys)
    expanded: list[str] = []
    for name in names:
        bare = queue_model(name) is None
        expanded += [with_model(name, k) for k in keys] if bare and keys else [name]
    return list(dict.fromkeys(expanded))


def precision_class(precision: str, device: str) -> str:
    """The precision class a job asking ``precision`` needs on ``device``."""
    if device == "cpu":
        return "fp32"
    return {"auto": "fp16", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[precision]


def class_dtypes(precision_class: str) -> dict[str, str]:
    """The dtype of each component in the plan a worker of this precision class picks: the
    class's dtype, with an fp32 VAE for ``fp16``."""
    return {
        "image_encoder": precision_class,
        "unet": precision_class,
        "vae": "fp32" if precision_class == "fp16" else precision_class,
    }


def estimate_plan_bytes(
    num_frames: int,
    width: int,
    height: int,
    decode_chunk_size: int,
    dtypes: Mapping[str, str],
    shape: ModelShape = SVD_XT,
) -> int:
    """The memory a render needs with each component in ``dtypes`` (``fp32``, ``bf16``,
    ``fp16`` by component), for a model of ``shape`` (:func:`svdfarm.catalog.model_shape`).

    Weights: each component's parameters in its dtype. Activations grow with frames x latent
    pixels (the VAE's downscale factor) x the UNet's first block width, and with decode chunk
    x pixels x the VAE's first block width. The constants are first guesses, to be calibrated
    on real GPUs (docs/ROUTING.md).
    """
    weights = sum(shape.params[c] * _BYTES[dtypes[c]] for c in ("image_encoder", "unet", "vae"))
    factor = shape.vae_factor
    latent_pixels = max(1, width // factor) * max(1, height // factor)
    unet = num_frames * latent_pixels * UNET_BYTES_PER_CHANNEL * shape.unet_channels
    unet = unet * _BYTES[dtypes["unet"]] // 4
    vae = min(decode_chunk_size, num_frames) * width * height
    vae = vae * VAE_BYTES_PER_CHANNEL * shape.vae_channels * _BYTES[dtypes["vae"]] // 4
    return int(weights + unet + vae + OVERHEAD_BYTES)


def estimate_memory_bytes(
    num_frames: int,
    width: int,
    height: int,
    decode_chunk_size: int,
    precision_class: str,
    shape: ModelShape = SVD_XT,
) -> int:
    """The memory a job needs on a worker of ``precision_class``, for a model of ``shape``
    (SVD-XT's unless given): :func:`estimate_plan_bytes` with :func:`class_dtypes`."""
    return estimate_plan_bytes(
        num_frames, width, height, decode_chunk_size, class_dtypes(precision_class), shape
    )


class Unroutable(ValueError):
    """No worker class could ever run the job; the message says why and what to change."""


@dataclass(frozen=True)
class Route:
    """Where a job goes and what it needs."""

    queue: str
    worker_class: WorkerClass
    memory_bytes: int


def route(
    num_frames: int,
    width: int,
    height: int,
    decode_chunk_size: int,
    precision: str,
    allow_cpu: bool,
    online_queues: Iterable[str] = (),
    cpu_max_gb: int = TIERS_GB[-1],
    shape: ModelShape = SVD_XT,
    *,
    model_key: str = "",
) -> Route:
    """The queue for a job: the smallest fitting GPU tier at its precision, or the CPU; the
    queue of its model (``model_key``, :func:`svdfarm.catalog.queue_key`) when given, so only
    a worker that serves the model takes it and "a live worker consumes it" means one that has
    the model.

    The first candidate a live worker consumes wins (``online_queues``), GPU before CPU; with
    none online, the CPU when ``allow_cpu`` (a farm that has only started), else the smallest
    fitting GPU tier, where the job waits. ``shape`` is the job's model's
    (:func:`svdfarm.catalog.model_shape`). Raises :class:`Unroutable` when no class could ever
    run the job.
    """
    online = set(online_queues)
    candidates: list[Route] = []
    for device in DEVICES:
        if device == "cpu" and not allow_cpu:
            continue
        klass = precision_class(precision, device)
        need = estimate_memory_bytes(num_frames, width, height, decode_chunk_size, klass, shape)
        limit = cpu_max_gb if device == "cpu" else TIERS_GB[-1]
        # Fit the smallest card of the tier (tier_of admits cards down to the slack), not the
        # tier's nominal size: every worker consuming the queue must be able to hold the job.
        tier = next((t for t in TIERS_GB if t * _GB * _TIER_SLACK >= need and t <= limit), None)
        if tier is not None:
            worker_class = WorkerClass(device, klass, tier)
            queue = with_model(worker_class.queue, model_key)
            candidates.append(Route(queue, worker_class, need))
    if not candidates:
        need_gb = (
            estimate_memory_bytes(
                num_frames,
                width,
                height,
                decode_chunk_size,
                precision_class(precision, "cuda"),
                shape,
            )
            / _GB
        )
        raise Unroutable(
            f"This job needs about {need_gb:.0f} GB at {precision} precision; the largest "
            f"worker class ({TIERS_GB[-1]} GB cards) holds about "
            f"{TIERS_GB[-1] * _TIER_SLACK:.0f} GB. Use fewer frames, a smaller size or a "
            "smaller decode chunk."
        )
    # Workers of a larger tier consume the smaller tiers' queues too, so "someone consumes
    # this queue" is the test. GPUs first; the CPU when allowed and no GPU can take it now.
    for candidate in candidates:
        if candidate.queue in online:
            return candidate
    by_device = {c.worker_class.device: c for c in reversed(candidates)}
    return by_device.get("cpu") or by_device.get("cuda") or candidates[0]
