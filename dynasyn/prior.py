"""Class-prior preservation (DreamBooth; Break-a-Scene's default): images of a class prompt drawn by the base model.

Break-a-Scene's ``train.py`` (which the paper ran "without modification" as its baseline) generates
``num_class_images`` (100) pictures of ``class_prompt`` ("a photo at the beach") with the base model before
training and adds ``prior_loss_weight`` (1.0) x the plain, unmasked MSE of one of them to every step. Here the
pictures are drawn once per run with DDIM + classifier-free guidance (the pipeline default Break-a-Scene uses:
50 steps, guidance 7.5) and cached as PNGs next to the run, so a resumed or repeated run reuses them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import DynASynError

META = "class_images.json"


def model_fingerprint(comps) -> str:
    """A cheap identity of the base model (a few weight tensors), so a cache from another model is not reused."""
    h = hashlib.sha256()
    rows = min(1000, int(comps.tokenizer.vocab_size))  # the base vocabulary: not the run's placeholder rows
    for t in (comps.unet.conv_in.weight, comps.unet.time_embedding.linear_1.weight,
              comps.text_encoder.get_input_embeddings().weight[:rows], comps.vae.encoder.conv_in.weight):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes()[:1 << 20])
    return h.hexdigest()[:16]


def _read_png(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def _write_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray((image.clamp(0, 1) * 255).round().byte().numpy()).save(path)


def quantize(image: torch.Tensor) -> torch.Tensor:
    """What a PNG round trip gives, so in-memory and cached class images train alike."""
    return (image.clamp(0, 1) * 255).round() / 255


@torch.no_grad()
def generate_class_image(comps, encode: Callable[[str], torch.Tensor], prompt: str, size: int, steps: int,
                         guidance: float, seed: int, device) -> torch.Tensor:
    """One ``[size, size, 3]`` picture in [0, 1] of ``prompt`` from the base model (DDIM, classifier-free guidance)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(comps.noise_scheduler.config, clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(steps)
    unet, vae = comps.unet, comps.vae
    dtype = next(unet.parameters()).dtype
    hidden = torch.cat([encode(""), encode(prompt)]).to(dtype)
    side = size // comps.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn(1, unet.config.in_channels, side, side, generator=g).to(device, dtype) * sched.init_noise_sigma
    for t in sched.timesteps:
        out = unet(torch.cat([x, x]), t.to(device), hidden).sample
        uncond, cond = out.chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    pix = vae.decode((x / comps.scaling_factor).to(vae.dtype)).sample
    return ((pix[0].float().permute(1, 2, 0) + 1) / 2).clamp(0, 1).cpu()


def class_images(comps, encode: Callable[[str], torch.Tensor], prompt: str, count: int, size: int, steps: int,
                 guidance: float, seed: int, device, folder: str | Path | None = None, may_generate: bool = True,
                 log: Callable[[str], None] = print, model_id: str | None = None) -> list[torch.Tensor]:
    """``count`` class pictures, read from ``folder`` where it holds them for the same model and settings,
    else generated (only the missing ones) and written there. ``model_id``: the base model's
    ``model_fingerprint``, taken before training changed it (a resumed run holds trained weights)."""
    settings = {"prompt": prompt, "size": size, "steps": steps, "guidance": guidance, "seed": seed,
                "model": model_id or model_fingerprint(comps)}
    folder = Path(folder) if folder is not None else None
    have: dict[int, torch.Tensor] = {}
    if folder is not None and (folder / META).is_file():
        try:
            same = json.loads((folder / META).read_text()).get("settings") == settings
        except (OSError, ValueError):
            same = False
        if same:
            for k in range(count):
                path = folder / f"class_{k:04d}.png"
                if path.is_file():
                    have[k] = _read_png(path)
    missing = [k for k in range(count) if k not in have]
    if missing and not may_generate:
        raise DynASynError(f"{len(missing)} of the {count} class images for prior preservation are missing"
                           + (f" from {folder}" if folder else "") + " and the model has already been trained, so "
                           "they can no longer come from the base model. Start the run over (resume off).")
    if missing:
        log(f"[DynASyn] prior preservation: drawing {len(missing)} class images of {prompt!r} with the base model "
            f"({steps} DDIM steps, guidance {guidance}, {size}x{size})" + (f" into {folder}" if folder else "") + ".")
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / META).write_text(json.dumps({"settings": settings}, indent=1))
        was_training = comps.unet.training
        comps.unet.eval()
        try:
            for k in missing:
                image = generate_class_image(comps, encode, prompt, size, steps, guidance, seed * 100003 + k, device)
                have[k] = quantize(image)
                if folder is not None:
                    _write_png(have[k], folder / f"class_{k:04d}.png")
        finally:
            comps.unet.train(was_training)
    elif count:
        log(f"[DynASyn] prior preservation: {count} cached class images of {prompt!r} from {folder}.")
    return [have[k] for k in range(count)]
