"""Pictures of the subjects with the weights as they are mid-training (``sample_every``).

A short deterministic DDIM run (``prior.generate_class_image``: fixed seed, classifier-free guidance) of a
prompt written with the placeholder tokens, on the trainer's own components. It reads no random state the
training loop uses and leaves the modules as it found them (train/eval mode, device), so sampling does not
change what is trained.
"""

from __future__ import annotations

import torch

from .prior import generate_class_image

SAMPLE_STEPS = 20
SAMPLE_GUIDANCE = 7.5


def encode(comps, prompt: str, device) -> torch.Tensor:
    tok = comps.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    return comps.text_encoder(ids)[0]


@torch.no_grad()
def render(comps, prompt: str, size: int, seed: int, device, steps: int = SAMPLE_STEPS,
           guidance: float = SAMPLE_GUIDANCE) -> torch.Tensor:
    """One ``[size, size, 3]`` picture in [0, 1] of ``prompt`` with the components' current weights."""
    device = torch.device(device)
    modes = [(m, m.training) for m in (comps.unet, comps.text_encoder)]
    vae_device = next(comps.vae.parameters()).device
    try:
        for m, _ in modes:
            m.eval()
        comps.vae.to(device)
        return generate_class_image(comps, lambda p: encode(comps, p, device), prompt, size, steps, guidance, seed,
                                    device)
    finally:
        for m, was in modes:
            m.train(was)
        comps.vae.to(vae_device)
