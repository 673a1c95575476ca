"""The Shapes World model: a small Stable-Diffusion-shaped model pretrained on the Shapes World.

Its structure is SD's in diffusers/transformers terms: a ``UNet2DConditionModel`` whose top level
(16x16 latents, the size it was trained at) has cross-attention, a 3-level ``AutoencoderKL``
(64 px pictures <-> 16x16x4 latents, SD's latent scale 0.18215), a small ``CLIPTextModel`` over
CLIP's real BPE vocabulary and SD's noise schedule. ``scripts/train_shapes_world.py`` trains it;
the weights ship in ``weights/`` as fp16 safetensors with a manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..errors import DynASynError
from ..models import SDComponents, make_noise_scheduler

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FILE = WEIGHTS_DIR / "shapes_world.safetensors"
MANIFEST_FILE = WEIGHTS_DIR / "shapes_world.json"
IMAGE_SIZE = 64
LATENT_SIZE = 16
LATENT_SCALE = 0.18215  # SD 1.x's; ComfyUI's SD15 latent format applies it
TEXT_WIDTH = 64


def default_tokenizer_dir() -> Path:
    """ComfyUI's copy of CLIP's BPE files (vocab.json, merges.txt)."""
    here = Path(__file__).resolve().parents[2]
    return here / ".cache" / "ComfyUI" / "comfy" / "sd1_tokenizer"


def clip_tokenizer(folder: str | Path | None = None):
    """CLIP's real tokenizer (49,408 tokens, pads with EOS as SD 1.x)."""
    from transformers import CLIPTokenizer

    folder = Path(folder) if folder is not None else default_tokenizer_dir()
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise DynASynError(f"CLIP tokenizer files (vocab.json, merges.txt) not found in {folder}; "
                           "pass the folder of ComfyUI's comfy/sd1_tokenizer.")
    # Positional vocab/merges: transformers 5 silently ignores vocab_file=/merges_file=.
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=77, bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>")


def build_shapes_components(tokenizer=None, seed: int = 0) -> SDComponents:
    """Freshly initialised (seeded) Shapes World model components."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = tokenizer if tokenizer is not None else clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64, 128),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32)  # 8 heads: ComfyUI's SD15 config
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 32, 64),
                            layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 3,
                            up_block_types=("UpDecoderBlock2D",) * 3, sample_size=IMAGE_SIZE, norm_num_groups=32,
                            scaling_factor=LATENT_SCALE)
        te = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=TEXT_WIDTH,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return SDComponents(unet.eval(), te.eval(), tok, vae.eval(), make_noise_scheduler("epsilon"), family="sd15")


def state_dict_of(comps: SDComponents) -> dict[str, torch.Tensor]:
    """One flat fp16 state dict: ``unet.*``, ``text_encoder.*``, ``vae.*``."""
    out = {}
    for prefix, mod in (("unet.", comps.unet), ("text_encoder.", comps.text_encoder), ("vae.", comps.vae)):
        for k, v in mod.state_dict().items():
            if "position_ids" in k:
                continue
            out[prefix + k] = v.detach().to("cpu", torch.float16).contiguous()
    return out


def save_weights(comps: SDComponents, path: str | Path = WEIGHTS_FILE) -> str:
    """Write the fp16 safetensors file; returns its sha256."""
    from ..export import save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_safetensors(state_dict_of(comps), tmp, {"format": "pt", "model": "dynasyn-shapes-world"})
    tmp.replace(path)
    return sha256_of(path)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_shapes_components(path: str | Path = WEIGHTS_FILE, tokenizer=None, verify: bool = True) -> SDComponents:
    """The pretrained Shapes World model as fp32 diffusers/transformers modules."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise DynASynError(f"Shapes World weights not found at {path}; train them with scripts/train_shapes_world.py.")
    if verify and path == WEIGHTS_FILE and MANIFEST_FILE.is_file():
        want = json.loads(MANIFEST_FILE.read_text()).get("sha256")
        if want and sha256_of(path) != want:
            raise DynASynError(f"{path} does not match its manifest (sha256); re-train or restore the file.")
    comps = build_shapes_components(tokenizer)
    sd = load_file(str(path))
    for prefix, mod in (("unet.", comps.unet), ("text_encoder.", comps.text_encoder), ("vae.", comps.vae)):
        part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
        missing, unexpected = mod.load_state_dict(part, strict=False)
        missing = [m for m in missing if "position_ids" not in m]
        if missing or unexpected:
            raise DynASynError(f"{path} does not fit the Shapes World model ({prefix[:-1]}: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}).")
    return comps


def manifest() -> dict:
    if not MANIFEST_FILE.is_file():
        raise DynASynError(f"No manifest at {MANIFEST_FILE}; train the model with scripts/train_shapes_world.py.")
    return json.loads(MANIFEST_FILE.read_text())


# ----------------------------------------------------------------------------------------------
# Latent normalisation and sampling
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_latent_normalisation(vae, mean: torch.Tensor, std: torch.Tensor, scale: float = LATENT_SCALE) -> None:
    """Reparametrise ``vae`` so its latents, times ``scale``, have zero mean and unit std per channel.

    ``mean``/``std`` are the per-channel statistics of the current posterior means. The encoder's
    ``quant_conv`` is changed to emit ``(z - mean) / (std * scale)`` and ``post_quant_conv`` to
    undo it, so reconstructions are unchanged (exactly, up to float rounding).
    """
    c = mean.numel()
    a = 1.0 / (std * scale)  # new_z = a * (z - mean)
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # (2c, 2c, 1, 1): mean rows then logvar rows
    qw[:c] *= a.view(c, 1, 1, 1)
    qb[:c] = (qb[:c] - mean) * a
    qb[c:] += 2.0 * torch.log(a)
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # (c, c, 1, 1): z = new_z / a + mean
    pb += (pw[:, :, 0, 0] @ mean)
    pw /= a.view(1, c, 1, 1)


def encode_text(comps: SDComponents, captions: list[str]) -> torch.Tensor:
    ids = comps.tokenizer(list(captions), padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids
    return comps.text_encoder(ids).last_hidden_state


@torch.no_grad()
def sample_images(comps: SDComponents, captions: list[str], seeds: list[int], steps: int = 25,
                  guidance: float = 5.0, batch: int = 64, negative: str = "") -> torch.Tensor:
    """DDIM (eta 0) with classifier-free guidance; returns Nx3x64x64 pictures in [0, 1].

    Each picture's starting noise comes from its own seed, so results do not depend on batching.
    """
    from diffusers import DDIMScheduler

    from ..models import SD_SCHEDULE

    if len(captions) != len(seeds):
        raise DynASynError(f"{len(captions)} captions but {len(seeds)} seeds; give one seed per caption.")
    sched = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                          prediction_type=comps.prediction_type)
    sched.set_timesteps(steps)
    unet, vae = comps.unet.eval(), comps.vae.eval()
    comps.text_encoder.eval()
    uncond = encode_text(comps, [negative])
    out = []
    for i in range(0, len(captions), batch):
        caps, sds = captions[i:i + batch], seeds[i:i + batch]
        cond = encode_text(comps, caps)
        ctx = torch.cat([uncond.expand(len(caps), -1, -1), cond])
        x = torch.stack([torch.randn(4, LATENT_SIZE, LATENT_SIZE, generator=torch.Generator().manual_seed(int(s)))
                         for s in sds])
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            eps = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
        img = vae.decode(x / vae.config.scaling_factor).sample
        out.append(((img + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def to_uint8(images: torch.Tensor):
    """Nx3xHxW in [0, 1] -> list of HxWx3 uint8 arrays."""
    return [(im.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for im in images]
