"""What the farm knows of a model without torch: where its files are on this machine and its
shape (parameter counts and latent sizes) for the memory estimate.

A model is the built-in ``tiny``, a local folder, or a Hugging Face Hub id, found in the local
Hub cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) without
network. Parameter counts come from the weight files' safetensors headers (a few kilobytes
read, whichever variant is there), latent sizes from the UNet's and the VAE's configs. A model
whose files are not on this machine is estimated as SVD-XT, the largest of the family.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TINY = "tiny"
COMPONENTS = ("image_encoder", "unet", "vae")
_WEIGHT_PREFIXES = ("diffusion_pytorch_model", "model")
#: A safetensors header larger than this is not one (the format's own limit is 100 MB).
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class ModelShape:
    """The sizes the memory estimate needs: parameters per component and the latent grid."""

    #: Parameters of the image encoder, the UNet and the VAE.
    params: Mapping[str, int]
    #: The UNet's first block width (its activations scale with it).
    unet_channels: int = 320
    #: The VAE decoder's widest block at full resolution (its first block width).
    vae_channels: int = 128
    #: Pixels per latent pixel along a side: 2 ** (VAE blocks - 1).
    vae_factor: int = 8
    #: Where the figures came from: ``files`` (the model's own) or ``SVD-XT``.
    source: str = "files"


#: SVD-XT's figures (stabilityai/stable-video-diffusion-img2vid-xt): the estimate of a model
#: whose files this machine does not have.
SVD_XT = ModelShape(
    params={"image_encoder": 632_076_800, "unet": 1_524_623_082, "vae": 97_742_847},
    source="SVD-XT",
)
#: The built-in tiny model's figures (worker/tiny.py), for a machine that has not saved it.
TINY_SHAPE = ModelShape(
    params={"image_encoder": 62_169, "unet": 1_793_078, "vae": 671_830},
    unet_channels=32,
    vae_channels=32,
    vae_factor=2,
)


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The Hugging Face Hub cache folder, as huggingface_hub finds it."""
    env = os.environ if env is None else env
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface",
    )
    return Path(home).expanduser() / "hub"


def cached_snapshot(repo_id: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The folder of ``repo_id``'s main revision in the local Hub cache, or None."""
    if "/" not in repo_id and not repo_id.replace("-", "").replace("_", "").isalnum():
        return None
    repo = hub_cache_dir(env) / f"models--{repo_id.replace('/', '--')}"
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if (snapshot / "model_index.json").is_file() else None


def local_folder(spec: str, models_dir: Path) -> Path | None:
    """The folder that holds ``spec``'s files on this machine, or None when it has none."""
    spec = spec.strip()
    if not spec:
        return None
    if spec.lower() == TINY:
        folder = Path(models_dir) / TINY
        return folder if (folder / "model_index.json").is_file() else None
    path = Path(spec).expanduser()
    if (path / "model_index.json").is_file():
        return path.resolve()
    if path.is_absolute() or spec.startswith((".", "~")):
        return None
    return cached_snapshot(spec)


def read_config(folder: Path, component: str) -> dict[str, object]:
    """A component's saved config (``unet/config.json`` ...); empty when unreadable."""
    try:
        data = json.loads((folder / component / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def safetensors_parameters(path: Path) -> int:
    """The number of values in a safetensors file, from its header alone."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        if size > _MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file")
        header = json.loads(fh.read(size))
    return sum(
        math.prod(entry["shape"])
        for name, entry in header.items()
        if name != "__metadata__" and isinstance(entry, dict)
    )


def component_parameters(folder: Path, component: str) -> int | None:
    """A component's parameter count from its safetensors files (full or ``fp16``, sharded
    or not); None when it has none."""
    sub = folder / component
    try:
        names = sorted(entry.name for entry in sub.iterdir())
    except OSError:
        return None
    # Shards (``...-00001-of-00002.safetensors``) are all counted; the full files when there,
    # else the ``fp16`` ones (the same shapes).
    found = [n for n in names if n.startswith(_WEIGHT_PREFIXES) and n.endswith(".safetensors")]
    weights = [n for n in found if ".fp16" not in n] or found
    if not weights:
        return None
    try:
        return sum(safetensors_parameters(sub / name) for name in weights)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def _int_list(value: object) -> list[int]:
    """A config's list of ints (``block_out_channels``); empty when it is not one."""
    if isinstance(value, list | tuple) and all(isinstance(v, int) for v in value):
        return list(value)
    return []


@lru_cache(maxsize=64)
def _folder_shape(folder: str, stamp: float) -> ModelShape | None:
    """:func:`model_shape` of a folder; ``stamp`` (its index's mtime) renews the cache."""
    del stamp
    path = Path(folder)
    params: dict[str, int] = {}
    for component in COMPONENTS:
        count = component_parameters(path, component)
        if count is None:
            return None
        params[component] = count
    unet = _int_list(read_config(path, "unet").get("block_out_channels"))
    vae = _int_list(read_config(path, "vae").get("block_out_channels"))
    if not unet or not vae:
        return None
    return ModelShape(
        params=params, unet_channels=unet[0], vae_channels=vae[0], vae_factor=2 ** (len(vae) - 1)
    )


def model_shape(spec: str, models_dir: Path) -> ModelShape:
    """``spec``'s shape from its own files when this machine has them, else SVD-XT's."""
    folder = local_folder(spec, models_dir)
    if folder is None:
        return TINY_SHAPE if spec.strip().lower() == TINY else SVD_XT
    try:
        stamp = (folder / "model_index.json").stat().st_mtime
    except OSError:
        return SVD_XT
    return _folder_shape(str(folder), stamp) or (
        TINY_SHAPE if spec.strip().lower() == TINY else SVD_XT
    )


# ---- the catalog: the models a farm offers (SVDFARM_MODELS) ---------------------------------

#: ``SVDFARM_MODELS`` unset: SVD-XT, SVD and the built-in tiny model.
DEFAULT_MODELS = (
    "svd-xt=stabilityai/stable-video-diffusion-img2vid-xt,"
    "svd=stabilityai/stable-video-diffusion-img2vid,"
    "tiny=tiny"
)
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")


@dataclass(frozen=True)
class CatalogEntry:
    """One model the farm offers: the id jobs name it by and what workers load (a Hub id, a
    folder, or ``tiny``)."""

    id: str
    source: str


def parse_models(text: str) -> list[CatalogEntry]:
    """Read ``SVDFARM_MODELS``: ``id=source`` pairs, comma-separated (``svd-xt=stabilityai/
    stable-video-diffusion-img2vid-xt,mine=/models/my-svd,tiny=tiny``); a bare ``source`` is
    its own id. Raises ValueError naming the first bad entry."""
    entries: list[CatalogEntry] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        model_id, sep, source = item.partition("=")
        model_id, source = model_id.strip(), source.strip()
        if not sep:
            model_id = source = item
        if not model_id or not source:
            raise ValueError(f"{item!r} is not id=source")
        if sep and not set(model_id.lower()) <= _ID_CHARS:
            raise ValueError(
                f"model id {model_id!r} may hold only letters, digits, '-', '_' and '.'"
            )
        if any(e.id.lower() == model_id.lower() for e in entries):
            raise ValueError(f"model id {model_id!r} is given twice")
        entries.append(CatalogEntry(model_id, source))
    if not entries:
        raise ValueError("it names no model")
    return entries


def find_entry(entries: list[CatalogEntry], name: str) -> CatalogEntry | None:
    """The entry ``name`` means: its id (any case) or its source."""
    wanted = name.strip()
    for entry in entries:
        if entry.id.lower() == wanted.lower() or entry.source == wanted:
            return entry
    return None


#: Stability AI's SVD checkpoints as the farm knows them without their files (a Hub id not in
#: this machine's cache): the frames each was trained on, its native side, and for SVD-XT 1.1
#: the conditioning it was fine-tuned with, fixed at 6 fps and motion bucket 127 (its model
#: card says so; its configs are SVD-XT's and do not).
KNOWN_MODELS: dict[str, dict[str, int]] = {
    "stabilityai/stable-video-diffusion-img2vid": {"num_frames": 14, "native_side": 768},
    "stabilityai/stable-video-diffusion-img2vid-xt": {"num_frames": 25, "native_side": 768},
    "stabilityai/stable-video-diffusion-img2vid-xt-1-1": {
        "num_frames": 25,
        "native_side": 768,
        "fps": 6,
        "motion_bucket_id": 127,
    },
}
#: The conditioning a model may fix (SVD-XT 1.1): the job's defaults follow it.
FIXED_CONDITIONING = ("fps", "motion_bucket_id")


def model_defaults(source: str, models_dir: Path) -> dict[str, object]:
    """A model's own defaults: the frames it was trained on (the UNet's ``num_frames``) and
    its native side (``sample_size`` x the VAE's factor) from its configs where this machine
    has them; else a known checkpoint's (:data:`KNOWN_MODELS`: SVD 14 frames, SVD-XT 25), else
    SVD-XT's (25 frames, 768); the tiny model's (8, 64). A known checkpoint's fixed
    conditioning (SVD-XT 1.1: ``fps`` 6, ``motion_bucket_id`` 127) comes with them."""
    is_tiny = source.strip().lower() == TINY
    frames, side = (8, 64) if is_tiny else (25, 768)
    defaults: dict[str, object] = {"num_frames": frames, "native_side": side}
    defaults.update(KNOWN_MODELS.get(source.strip(), {}))
    folder = local_folder(source, models_dir)
    if folder is not None and not is_tiny:
        unet, vae = read_config(folder, "unet"), read_config(folder, "vae")
        trained, sample = unet.get("num_frames"), unet.get("sample_size")
        blocks = _int_list(vae.get("block_out_channels"))
        if isinstance(trained, int):
            defaults["num_frames"] = trained
        if isinstance(sample, int) and blocks:
            defaults["native_side"] = sample * 2 ** (len(blocks) - 1)
    return defaults


def advertised_models(
    entries: list[CatalogEntry], wanted: str, default: str, models_dir: Path
) -> list[str]:
    """The models a worker serves, as sources (what jobs record and workers load).

    ``wanted`` (``SVDFARM_WORKER_MODELS``): those it names, by catalog id or source, whether
    here or to be downloaded. Empty: every catalog model whose files are on this machine (a
    folder, the Hub cache), the tiny model (made on demand) and ``default`` (its
    ``SVDFARM_MODEL``, which it fetches when a job needs it).
    """
    if wanted:
        found = [find_entry(entries, e.source) or e for e in parse_models(wanted)]
        sources = [entry.source for entry in found]
    else:
        sources = [
            e.source
            for e in entries
            if e.source.strip().lower() == TINY or local_folder(e.source, models_dir) is not None
        ]
        if default:
            sources.append(default)
    return list(dict.fromkeys(sources))


def queue_key(entries: list[CatalogEntry], source: str) -> str:
    """The model's part of a queue name (svdfarm.queues): its catalog id in lower case, so
    ``svd.cuda.bf16.24g.svd-xt``; a source outside the catalog (an ``SVDFARM_MODEL`` folder)
    gets a slug of itself with a short hash, as queue names take no ``/``."""
    entry = find_entry(entries, source)
    name = (entry.id if entry is not None else source).strip().lower()
    if name and set(name) <= _ID_CHARS:
        return name
    slug = "".join(c if c in _ID_CHARS and c != "." else "-" for c in name).strip("-")[-40:]
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{slug}-{digest}" if slug else digest


def catalog_keys(entries: list[CatalogEntry]) -> list[str]:
    """The queue key of each model of the catalog, in its order (:func:`queue_key`)."""
    return list(dict.fromkeys(queue_key(entries, entry.source) for entry in entries))
