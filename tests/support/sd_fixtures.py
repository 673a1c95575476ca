"""Random-weight checkpoints of the real SD 1.5 and SD 2.1 (768-v) architectures.

ComfyUI's model detection needs real shapes, so these are full size (fp16 on disk, ~2 GB). They
are built from diffusers / transformers modules and turned into a single-file checkpoint by
ComfyUI's own loaders and ``state_dict_for_saving``, then cached under ``.cache/fixtures``.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from .comfy_env import ROOT, setup_comfy

FIXTURE_DIR = ROOT / ".cache" / "fixtures"

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SD21_UNET = dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                 use_linear_projection=True, upcast_attention=True)
SD15_TE = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
               hidden_act="quick_gelu", projection_dim=768)
# OpenCLIP ViT-H text tower as ComfyUI holds it: 24 layers (SD 2 reads the penultimate one).
SD21_TE = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
               hidden_act="gelu", projection_dim=1024)


def _random_state_dicts(family: str, seed: int):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SD21_UNET))
    with torch.no_grad():
        # Real checkpoints have non-zero norm biases; random init leaves them at 0. ComfyUI decides
        # SD 2.x v-prediction by std(output_blocks.11.1...norm1.bias) > 0.09, so give them spread.
        for name, p in unet.named_parameters():
            if "norm" in name and name.endswith("bias"):
                p.normal_(0, 0.2 if family == "sd21v" else 0.02)
    unet_sd = {k: v.half() for k, v in unet.state_dict().items()}
    del unet
    te_cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                            pad_token_id=49407, **(SD15_TE if family == "sd15" else SD21_TE))
    te = CLIPTextModel(te_cfg)
    te_sd = {(k if k.startswith("text_model.") else "text_model." + k): v.half() for k, v in te.state_dict().items()}
    del te
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)
    vae_sd = {k: v.half() for k, v in vae.state_dict().items()}
    del vae
    return unet_sd, te_sd, vae_sd


def random_checkpoint(family: str, seed: int = 0) -> Path:
    """Path of ``<family>_random_<seed>.safetensors`` (``sd15`` or ``sd21v``), building it once."""
    assert family in ("sd15", "sd21v")
    path = FIXTURE_DIR / f"{family}_random_{seed}.safetensors"
    if path.exists():
        return path
    setup_comfy()
    import comfy.sd
    import comfy.utils

    FIXTURE_DIR.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd, vae_sd = _random_state_dicts(family, seed)
    model = comfy.sd.load_diffusion_model_state_dict(unet_sd)
    clip = comfy.sd.load_text_encoder_state_dicts([te_sd], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    vae = comfy.sd.VAE(sd=vae_sd)
    del unet_sd, te_sd, vae_sd
    sd = model.model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    sd = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}
    del model, clip, vae
    gc.collect()
    tmp = path.with_suffix(".tmp")
    comfy.utils.save_torch_file(sd, str(tmp))
    tmp.rename(path)
    del sd
    gc.collect()
    return path
