"""Loading the SVD pipeline: from the tiny model, a local folder or the Hugging Face Hub.

Every model goes through ``StableVideoDiffusionPipeline.from_pretrained``; each component is
then cast to its plan's dtype and the pipeline moved to the plan's device. A process keeps
the pipeline it loaded, so a worker pays the load once, not once per job.

Hub access never waits without a bound: the local Hugging Face cache is tried first, without
network; then one metadata request with ``hub_timeout_s`` checks that the Hub answers (the
requests huggingface_hub makes inside ``from_pretrained`` have no timeout of their own);
downloads use huggingface_hub's timeouts, set from ``hub_timeout_s``.

The Hub ships SVD's weights twice: full precision (``unet/diffusion_pytorch_model.safetensors``)
and half size (``unet/diffusion_pytorch_model.fp16.safetensors``, diffusers' ``fp16`` variant),
and many folders hold only the half-size files. Each component reads its ``fp16`` files when it
has no others, or when its plan dtype is fp16 (the same values, half the bytes to read); else
its full files, so a bf16 or fp32 plan never starts from weights rounded to fp16 when better
ones are there. fp16 weights loaded for an fp32 plan are upcast exactly.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svdfarm.params import is_tiny
from worker.plans import COMPONENTS, Plan
from worker.tiny import save_tiny

if TYPE_CHECKING:
    # The defining module: diffusers' lazy top-level names type as dummies.
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        StableVideoDiffusionPipeline,
    )

    from worker.placement import Placement

_WHAT_TO_DO = "or set SVDFARM_MODEL to a local folder or to 'tiny'"
# A Hub repository id: "name" or "org/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")

#: diffusers' name for the half-size weight files (``model.fp16.safetensors``).
VARIANT = "fp16"
_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model", "pytorch_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: The class each weighted component loads with, when one is loaded on its own.
_COMPONENT_CLASSES = {
    "unet": ("diffusers", "UNetSpatioTemporalConditionModel"),
    "vae": ("diffusers", "AutoencoderKLTemporalDecoder"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
}

_cache: dict[str, Placement] = {}
_cache_lock = threading.Lock()


class ModelUnavailable(RuntimeError):
    """The model could not be found or fetched; the message says what to do about it."""


def resolve_model(spec: str, models_dir: Path) -> str:
    """Turn ``SVDFARM_MODEL``'s value into what ``from_pretrained`` loads.

    ``tiny`` (any case) writes the tiny model under ``models_dir`` and returns its folder; an
    existing folder is returned as an absolute path; a Hub id (``name`` or ``org/name``) is
    returned unchanged. A path that does not exist raises :class:`ModelUnavailable`.
    """
    spec = spec.strip()
    if not spec:
        raise ModelUnavailable(f"No model given: set SVDFARM_MODEL to a Hub id, {_WHAT_TO_DO}.")
    if is_tiny(spec):
        return str(save_tiny(Path(models_dir) / "tiny").resolve())
    path = Path(spec).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if path.exists():
        raise ModelUnavailable(
            f"Model {spec!r} is a file, not a model folder: give the folder that holds "
            f"model_index.json, a Hub id, {_WHAT_TO_DO}."
        )
    if spec.startswith(_PATH_PREFIXES) or spec in (".", "..") or not _HUB_ID.match(spec):
        raise ModelUnavailable(
            f"Model folder {spec!r} not found (looked in {path.absolute()}). "
            f"Check the path, give a Hugging Face Hub id, {_WHAT_TO_DO}."
        )
    return spec


def load_pipeline(
    spec: str, models_dir: Path, plan: Plan, hub_timeout_s: float = 10.0
) -> StableVideoDiffusionPipeline:
    """The pipeline for ``spec``, loaded once per process and put into ``plan``'s shape.

    The first call loads from disk (or the Hub) with each component in the plan's dtype; later
    calls, retries included, re-cast and re-place the cached pipeline in place
    (:class:`worker.placement.Placement`), never reload it. Loading another model drops the
    previous one first, so a GPU never holds two. Raises :class:`ModelUnavailable` when the
    model cannot be found or fetched.
    """
    from worker.placement import Placement

    resolved = resolve_model(spec, models_dir)
    with _cache_lock:
        placement = _cache.get(resolved)
        if placement is None:
            _drop_cached()
            if os.path.isabs(resolved):
                pipe = _load_folder(resolved, plan)
            else:
                pipe = _load_from_hub(resolved, plan, hub_timeout_s)
            pipe.set_progress_bar_config(disable=True)
            placement = Placement(pipe)
            _cache[resolved] = placement
        placement.apply(plan)
        return placement.pipe


def cached_placement(spec: str, models_dir: Path) -> Placement | None:
    """The cached placement of ``spec``'s pipeline in this process, if it was loaded."""
    try:
        resolved = resolve_model(spec, models_dir)
    except ModelUnavailable:
        return None
    return _cache.get(resolved)


def pipeline_ready(spec: str, models_dir: Path, plan: Plan) -> bool:
    """True when this process holds ``spec``'s pipeline already in ``plan``'s shape, so
    :func:`load_pipeline` returns it at once."""
    placement = cached_placement(spec, models_dir)
    return placement is not None and placement.ready_for(plan)


def clear_cache() -> None:
    """Forget every cached pipeline and free the memory it held."""
    with _cache_lock:
        _drop_cached()


def free_memory() -> None:
    """Collect garbage and hand cached accelerator memory back (before a retry)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    mps = getattr(torch, "mps", None)
    if mps is not None and torch.backends.mps.is_available():
        mps.empty_cache()


def _drop_cached() -> None:
    """Empty the cache and free the memory it held (callers hold the lock)."""
    if not _cache:
        return
    _cache.clear()
    free_memory()


def weight_kinds(files: Iterable[str]) -> dict[str, set[str]]:
    """Which weight files each component has, from a model's file names (relative paths):
    ``""`` for full precision, ``"fp16"`` for the half-size variant."""
    kinds: dict[str, set[str]] = {c: set() for c in COMPONENTS}
    for name in files:
        folder, _, base = str(name).replace("\\", "/").partition("/")
        if folder not in kinds or "/" in base or not base.startswith(_WEIGHT_PREFIXES):
            continue
        is_index = base.endswith(".json") and ".index" in base
        if not (base.endswith(_WEIGHT_SUFFIXES) or is_index):
            continue
        kinds[folder].add(VARIANT if f".{VARIANT}." in base else "")
    return kinds


def choose_variants(files: Iterable[str], plan: Plan) -> dict[str, str | None]:
    """The weights each component should read: ``"fp16"`` when it has only those, or has both
    and its plan dtype is fp16; ``None`` (its full-precision files) otherwise."""
    chosen: dict[str, str | None] = {}
    for component, kinds in weight_kinds(files).items():
        half = VARIANT in kinds and ("" not in kinds or plan.dtype_of(component) == "fp16")
        chosen[component] = VARIANT if half else None
    return chosen


def folder_files(folder: str | Path) -> list[str]:
    """The weight-bearing component folders' files of a model folder, as relative paths."""
    root = Path(folder)
    found: list[str] = []
    for component in COMPONENTS:
        sub = root / component
        if sub.is_dir():
            found.extend(f"{component}/{entry.name}" for entry in sub.iterdir())
    return found


def _from_pretrained(
    source: str, plan: Plan, files: Iterable[str] = (), **kwargs: Any
) -> StableVideoDiffusionPipeline:
    """Call ``from_pretrained`` with each component loaded in its plan dtype, reading the
    weights :func:`choose_variants` picks from ``files`` (the model's file names)."""
    import diffusers
    import torch
    import transformers
    from diffusers import StableVideoDiffusionPipeline
    from packaging.version import Version

    # Our own progress reporting replaces the loaders' bars, which clutter worker logs.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    # Each component is loaded straight into its plan dtype: no cast of a loaded model, and
    # later re-casts from these weights are exact (see worker.placement).
    dtype = {c: plan.torch_dtype(c) for c in COMPONENTS}
    dtype["default"] = torch.float32
    # diffusers 0.42 renamed torch_dtype to dtype and warns on the old name.
    dtype_arg = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    # transformers did the same in 4.56.
    tf_dtype_arg = (
        "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    )
    names = list(files)
    variants = choose_variants(names, plan)
    kinds = weight_kinds(names)
    # diffusers reads the variant in every component that has it, so the pipeline's call gets
    # it when one of the components it loads wants it.
    rest = VARIANT if any(variants[c] for c in COMPONENTS if c != "unet") else None
    local = {k: v for k, v in kwargs.items() if k == "local_files_only"}
    for component in COMPONENTS:
        beside = rest and not variants[component] and VARIANT in kinds[component]
        # The UNet, the largest, is loaded on its own and first: loading a model holds its
        # file's pages and its weights at once, and the others are not in memory yet then.
        # So is a component that must read its full files beside the variant's.
        if component == "unet" or beside:
            library, class_name = _COMPONENT_CLASSES[component]
            loader = getattr(importlib.import_module(library), class_name)
            own = {"variant": variants[component]} if variants[component] else {}
            kwargs[component] = loader.from_pretrained(
                source,
                subfolder=component,
                **{tf_dtype_arg if library == "transformers" else dtype_arg: dtype[component]},
                **own,
                **local,
            )
    if rest:
        kwargs["variant"] = rest
    kwargs[dtype_arg] = dtype
    return StableVideoDiffusionPipeline.from_pretrained(source, **kwargs)


def _load_folder(folder: str, plan: Plan) -> StableVideoDiffusionPipeline:
    """Load a model saved on disk, turning a malformed folder into :class:`ModelUnavailable`."""
    try:
        return _from_pretrained(folder, plan, folder_files(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ModelUnavailable(
            f"Could not load the model in folder {folder!r}: it should hold a diffusers "
            "StableVideoDiffusionPipeline (model_index.json and the unet, vae, image_encoder, "
            f"scheduler and feature_extractor folders). Fix the folder {_WHAT_TO_DO}. "
            f"({type(error).__name__}: {error})"
        ) from error


def _load_from_hub(repo_id: str, plan: Plan, timeout_s: float) -> StableVideoDiffusionPipeline:
    """Load a Hub model from the local cache, else download it, never waiting unbounded."""
    from huggingface_hub import HfApi, constants, snapshot_download

    # huggingface_hub reads these at call time: they bound each file's metadata and download.
    constants.HF_HUB_ETAG_TIMEOUT = timeout_s  # type: ignore[assignment]
    constants.HF_HUB_DOWNLOAD_TIMEOUT = timeout_s  # type: ignore[assignment]
    errors = _fetch_errors()
    try:
        snapshot = snapshot_download(repo_id, local_files_only=True)
        return _from_pretrained(repo_id, plan, folder_files(snapshot), local_files_only=True)
    except errors:
        pass  # not (fully) cached: go online
    try:
        info = HfApi().model_info(repo_id, timeout=timeout_s)
        files = [sibling.rfilename for sibling in info.siblings or []]
        return _from_pretrained(repo_id, plan, files)
    except errors as error:
        raise ModelUnavailable(_hub_message(repo_id, error, timeout_s)) from error


def _hub_message(repo_id: str, error: BaseException, timeout_s: float) -> str:
    """Say why ``repo_id`` could not be fetched and what to do, with the original error."""
    from huggingface_hub import constants
    from huggingface_hub.errors import GatedRepoError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(error, GatedRepoError):
        reason = (
            f"it is gated: accept its licence at {constants.ENDPOINT}/{repo_id} and log in "
            "(hf auth login, or set HF_TOKEN)"
        )
    elif isinstance(error, RepositoryNotFoundError):
        reason = "no such model on the Hub (check the name; a private model needs HF_TOKEN)"
    elif isinstance(error, OfflineModeIsEnabled):
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache"
    elif _is_timeout(error):
        reason = (
            f"the Hub at {constants.ENDPOINT} did not answer within {timeout_s:g} s "
            "and it is not in the local cache"
        )
    elif _is_network_error(error):
        reason = (
            f"the Hub at {constants.ENDPOINT} could not be reached and it is not in the local cache"
        )
    else:
        reason = "it is not in the local cache and could not be downloaded"
    return (
        f"Could not load model {repo_id!r} from the Hugging Face Hub: {reason}. Download it "
        f"first (hf download {repo_id}, cache {constants.HF_HUB_CACHE}) {_WHAT_TO_DO}. "
        f"({type(error).__name__}: {error})"
    )


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "could not fetch", across huggingface_hub's HTTP clients."""
    return (OSError, ValueError) + _installed_types(
        "huggingface_hub.errors:EntryNotFoundError",
        "huggingface_hub.errors:CachedRepoTreeNotFoundError",
        "huggingface_hub.errors:XetDownloadError",
        "httpx2:HTTPError",
        "httpx:HTTPError",
        "requests:RequestException",
    )


def _is_timeout(error: BaseException) -> bool:
    """True when a request to the Hub ran out of time, whichever HTTP client raised it."""
    timeouts = (TimeoutError,) + _installed_types(
        "httpx2:TimeoutException", "httpx:TimeoutException", "requests:Timeout"
    )
    return isinstance(error, timeouts)


def _is_network_error(error: BaseException) -> bool:
    """True for connection failures, whichever HTTP client raised them."""
    network = (ConnectionError,) + _installed_types(
        "httpx2:TransportError", "httpx:TransportError", "requests:ConnectionError"
    )
    return isinstance(error, network)


def _installed_types(*names: str) -> tuple[type[BaseException], ...]:
    """The exception classes named ``module:Class`` whose module is installed."""
    found: list[type[BaseException]] = []
    for name in names:
        module_name, class_name = name.split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if isinstance(getattr(module, class_name, None), type):
            found.append(getattr(module, class_name))
    return tuple(found)
