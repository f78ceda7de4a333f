"""The built-in tiny SVD model: random weights in the shapes of diffusers' own fast tests.

It renders 8 frames of 64 x 64 in a few seconds on a CPU, so the whole farm can be run and
tested without downloading SVD. It is saved to disk with ``save_pretrained`` and then loaded
like any real model, so the tiny path and the real path share every line of loading code.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # The defining module: diffusers' lazy top-level names type as dummies.
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        StableVideoDiffusionPipeline,
    )

SEED = 0
#: Rendering at this size needs no resizing: UNet sample_size (32) times the tiny VAE's
#: downscale factor (2, from its two blocks).
NATIVE_SIDE = 64
#: The pipeline always resizes the CLIP input to 224 x 224, whatever the config says.
CLIP_IMAGE_SIZE = 224


def build_tiny_pipeline() -> StableVideoDiffusionPipeline:
    """Build the tiny pipeline from configs, with the same weights every time (seed 0)."""
    import torch
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        UNetSpatioTemporalConditionModel,
    )
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        StableVideoDiffusionPipeline,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    # fork_rng keeps the caller's global RNG state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        unet = UNetSpatioTemporalConditionModel(
            sample_size=NATIVE_SIDE // 2,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            block_out_channels=(32, 64),
            layers_per_block=2,
            cross_attention_dim=32,
            num_attention_heads=8,
            projection_class_embeddings_input_dim=96,
            addition_time_embed_dim=32,
        )
        torch.manual_seed(SEED)
        vae = AutoencoderKLTemporalDecoder(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            block_out_channels=(32, 64),
            latent_channels=4,
        )
        torch.manual_seed(SEED)
        image_encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                projection_dim=32,
                num_hidden_layers=5,
                num_attention_heads=4,
                intermediate_size=37,
                image_size=CLIP_IMAGE_SIZE,
                patch_size=14,
            )
        )
    # SVD-XT's own scheduler settings.
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        interpolation_type="linear",
        use_karras_sigmas=True,
        sigma_min=0.002,
        sigma_max=700.0,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": CLIP_IMAGE_SIZE},
        crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE},
    )
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )


def save_tiny(directory: Path) -> Path:
    """Write the tiny model to ``directory`` (safetensors) unless it is already there.

    Safe to call from several processes at once: a lock file beside ``directory`` serialises
    them, and the model is written to a temporary sibling folder that is renamed into place,
    so ``directory`` is either absent or complete. Returns ``directory``.
    """
    directory = Path(directory).expanduser()
    if (directory / "model_index.json").is_file():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock_path = directory.parent / f".{directory.name}.lock"
    with open(lock_path, "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (directory / "model_index.json").is_file():
                return directory
            if directory.exists():
                if not directory.is_dir() or any(directory.iterdir()):
                    raise FileExistsError(
                        f"{directory} exists but holds no model_index.json; move it away or "
                        "choose another folder for the tiny model."
                    )
                directory.rmdir()
            staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
            try:
                build_tiny_pipeline().save_pretrained(staging, safe_serialization=True)
                _name_feature_extractor_like_svd(staging)
                # mkdtemp and the safetensors writer make their output private; the model is
                # meant to be read by every process of the farm.
                for path in [staging, *staging.rglob("*")]:
                    path.chmod(0o755 if path.is_dir() else 0o644)
                staging.rename(directory)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return directory


def _name_feature_extractor_like_svd(directory: Path) -> None:
    """Record the feature extractor as ``CLIPImageProcessor``, as SVD's own repositories do.

    transformers 5 without torchvision instantiates ``CLIPImageProcessorPil`` and
    ``save_pretrained`` writes that name, which older transformers cannot load. The saved
    config is the same for both classes.
    """
    index_path = directory / "model_index.json"
    index = json.loads(index_path.read_text())
    library, _class_name = index["feature_extractor"]
    index["feature_extractor"] = [library, "CLIPImageProcessor"]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
