"""Loading and saving the diffusers / transformers components DynASyn trains.

One ``SDComponents`` bundle (UNet, text encoder, tokenizer, VAE, training noise schedule) is
what every stage works on; it comes from a diffusers folder here, or from ComfyUI's native
MODEL / CLIP / VAE through the pack's bridge.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import DynASynError, UnsupportedModelError

SUPPORTED_FAMILIES = "Stable Diffusion 1.x (512 px, eps), 2.x-base (512 px, eps) and 2.x (768 px, v-prediction)"
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Stable Diffusion's training schedule (all SD 1.x / 2.x checkpoints share it).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class SDComponents:
    """The pieces of a Stable Diffusion model as diffusers / transformers modules."""

    unet: Any                      # diffusers UNet2DConditionModel
    text_encoder: Any              # transformers CLIPTextModel
    tokenizer: Any                 # transformers CLIPTokenizer(Fast)
    vae: Any                       # diffusers AutoencoderKL
    noise_scheduler: Any           # diffusers DDPMScheduler (training schedule)
    family: str = "sd15"           # "sd15" | "sd2" (text-encoder lineage; decides embedding size)
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))


def make_noise_scheduler(prediction_type: str = "epsilon", **overrides):
    """DDPM training schedule of Stable Diffusion with the given prediction type."""
    from diffusers import DDPMScheduler

    if prediction_type not in PREDICTION_TYPES:
        raise UnsupportedModelError(f"Prediction type {prediction_type!r} is not supported; "
                                    f"DynASyn supports {', '.join(PREDICTION_TYPES)} ({SUPPORTED_FAMILIES}).")
    cfg = dict(SD_SCHEDULE, prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    cfg.update(overrides)
    return DDPMScheduler(**cfg)


def family_from_text_encoder_config(te_config) -> str:
    """``sd15`` for CLIP ViT-L-style (pad = EOS) encoders, ``sd2`` for OpenCLIP ViT-H-style ones."""
    return "sd2" if int(getattr(te_config, "hidden_size", 768)) == 1024 else "sd15"


def normalize_clip_keys(state_dict: Mapping[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """Match a CLIP text-encoder state dict to ``model_keys``' naming.

    transformers >= 5 saves ``CLIPTextModel`` keys without the ``text_model.`` prefix that
    transformers 4 (and ComfyUI) use; a mismatch loads nothing and silently keeps random
    weights, so both layouts are mapped onto whatever the target model expects.
    """
    model_keys = set(model_keys)
    wants_prefix = any(k.startswith("text_model.") for k in model_keys)
    out = {}
    for k, v in state_dict.items():
        bare = k[len("text_model."):] if k.startswith("text_model.") else k
        if bare.startswith("text_projection"):
            key = bare
        else:
            key = "text_model." + bare if wants_prefix else bare
        out[key] = v
    return out


def load_clip_state_dict(text_encoder, state_dict: Mapping[str, torch.Tensor], *, allow_missing=("position_ids",)) -> None:
    """Load ``state_dict`` into a CLIPTextModel whatever its key layout; refuse silent partial loads."""
    sd = normalize_clip_keys(state_dict, text_encoder.state_dict().keys())
    result = text_encoder.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not any(a in k for a in allow_missing)]
    if missing:
        raise DynASynError(f"The text encoder weights do not fit the model: {len(missing)} tensors are missing "
                           f"(first: {missing[:3]}). The checkpoint is not a supported CLIP text encoder "
                           f"({SUPPORTED_FAMILIES}).")


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_components(path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> SDComponents:
    """Load a diffusers-format Stable Diffusion folder (``model_index.json`` + subfolders), offline.

    The prediction type is taken from the folder's scheduler config (v-prediction for SD 2.x 768).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    missing = [s for s in ("unet", "text_encoder", "tokenizer", "vae") if not (root / s).is_dir()]
    if not (root / "model_index.json").is_file() or missing:
        raise DynASynError(f"{root} is not a diffusers Stable Diffusion folder (needs model_index.json and the "
                           f"subfolders unet, text_encoder, tokenizer, vae; missing: {', '.join(missing) or 'model_index.json'}).")
    index = _read_json(root / "model_index.json")
    cls = index.get("_class_name", "")
    if "XL" in cls or "3" in cls or "Flux" in cls or "text_encoder_2" in index:
        raise UnsupportedModelError(f"{root} holds a {cls or 'multi-encoder'} model; DynASyn supports {SUPPORTED_FAMILIES}.")
    kw = dict(local_files_only=True, torch_dtype=torch_dtype)
    unet = UNet2DConditionModel.from_pretrained(root, subfolder="unet", **kw)
    check_unet_config(unet.config)
    text_encoder = CLIPTextModel.from_pretrained(root, subfolder="text_encoder", **kw)
    tokenizer = CLIPTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True)
    vae = AutoencoderKL.from_pretrained(root, subfolder="vae", **kw)
    sched_cfg = root / "scheduler" / "scheduler_config.json"
    prediction_type = _read_json(sched_cfg).get("prediction_type", "epsilon") if sched_cfg.is_file() else "epsilon"
    comps = SDComponents(unet.to(device), text_encoder.to(device), tokenizer, vae.to(device),
                         make_noise_scheduler(prediction_type),
                         family=family_from_text_encoder_config(text_encoder.config))
    for m in (comps.unet, comps.text_encoder, comps.vae):
        m.eval()
    return comps


def check_unet_config(config) -> None:
    """Refuse UNets DynASyn does not support (SDXL's added conditioning, inpainting channels...)."""
    problems = []
    if getattr(config, "addition_embed_type", None):
        problems.append(f"it uses added conditioning ({config.addition_embed_type}, as SDXL does)")
    if getattr(config, "in_channels", 4) != 4 or getattr(config, "out_channels", 4) != 4:
        problems.append(f"it has {config.in_channels} input channels (inpainting/instruct models are not supported)")
    if getattr(config, "class_embed_type", None):
        problems.append("it has a class embedding (unCLIP / upscaler models are not supported)")
    if problems:
        raise UnsupportedModelError(f"This UNet is not supported: {'; '.join(problems)}. DynASyn supports {SUPPORTED_FAMILIES}.")


def save_components(comps: SDComponents, path: str | os.PathLike, *, safe_serialization: bool = True) -> Path:
    """Write a diffusers folder that ``StableDiffusionPipeline.from_pretrained`` and ``load_components`` read."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sched = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=comps.prediction_type)
    pipe = StableDiffusionPipeline(vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer,
                                   unet=comps.unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path, safe_serialization=safe_serialization)
    return Path(path)
