"""DynASyn's training losses (AAAI-25, "Masked Diffusion" and "Class-Specific Attention Regularization").

Shapes: latents / predictions ``[B, C, h, w]``; attention maps ``[S, r, r]`` (one 16x16 map per
selected subject, already averaged over heads and layers); masks ``[S, H, W]`` in [0, 1] at any
size (resized here). Every loss is a mean squared error, summed over the selected subjects as in
the paper (``Σ_{i∈s} ||·||²``) and averaged over pixels as in Break-a-Scene's code.
"""

from __future__ import annotations

import itertools
import random
from typing import Sequence

import torch
import torch.nn.functional as F

EPS = 1e-8


def normalize_max(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The paper's ``g(x) = x / max(x)``, per map over its last two (spatial) dimensions."""
    peak = x.flatten(-2).amax(dim=-1)[..., None, None]
    return x / (peak + eps)


def resize_masks(masks: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """``[S, H, W]`` masks -> ``[S, size, size]`` by nearest sampling (Break-a-Scene's choice)."""
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]


def union_mask(masks: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """``M_s = ∪_{i∈s} M_i`` as the pixel-wise max of the chosen masks, ``[H, W]``."""
    return masks[list(subset)].amax(dim=0)


def union_sample(num_subjects: int, rng: random.Random) -> list[int]:
    """A uniformly sized, random non-empty subset ``s ⊆ {0..N-1}`` in random order (Break-a-Scene)."""
    k = rng.randrange(1, num_subjects + 1)
    return rng.sample(range(num_subjects), k=k)


def all_nonempty_subsets(num_subjects: int) -> list[frozenset[int]]:
    return [frozenset(c) for k in range(1, num_subjects + 1) for c in itertools.combinations(range(num_subjects), k)]


def masked_diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_MD = ||ε ⊙ M_s − ε_θ(z_t, t, γ(c)) ⊙ M_s||² (mean over all latent elements).

    ``target`` is ε for eps models or the velocity for v-prediction; ``mask`` is ``M_s`` as
    ``[H, W]`` or ``[B, 1, H, W]`` at any size (nearest-resized to the latent).
    """
    if mask.ndim == 2:
        mask = mask[None, None]
    mask = F.interpolate(mask.float(), size=model_pred.shape[-2:], mode="nearest").to(model_pred.dtype)
    return F.mse_loss((model_pred * mask).float(), (target * mask).float(), reduction="mean")


def masked_attention_loss(placeholder_maps: torch.Tensor, masks: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """L_M2A = Σ_{i∈s} ||A_t,i(γ(c), z_t) − M_i||².

    ``placeholder_maps`` ``[S, r, r]`` are the selected placeholders' maps, ``masks`` ``[S, H, W]``
    their masks. As in Break-a-Scene's code each map is divided by its max first (``normalize``), so
    a probability map (values near 1/77) is compared with a 0/1 mask on the same scale.
    """
    a = normalize_max(placeholder_maps) if normalize else placeholder_maps
    m = resize_masks(masks, a.shape[-2:]).to(a.dtype)
    return ((a.float() - m.float()) ** 2).flatten(1).mean(dim=1).sum()


def inter_cross_attention_loss(placeholder_maps: torch.Tensor, class_maps: torch.Tensor, masks: torch.Tensor,
                               normalize: bool = True) -> torch.Tensor:
    """L_ICA = Σ_{i∈s} ||A_t,i(γ(c), z_t) − g(M_i ⊙ A_t,i(γ(ĉ), z_t))||².

    ``class_maps`` are the class nouns' maps from the *frozen base model* given the class prompt ĉ;
    they are a fixed target (stop-gradient). Masking suppresses the class prior outside the
    subject, ``g`` rescales it to max 1; the placeholder map is max-normalised likewise.
    """
    m = resize_masks(masks, class_maps.shape[-2:]).to(class_maps.dtype)
    target = normalize_max(m * class_maps.detach()).detach()
    a = normalize_max(placeholder_maps) if normalize else placeholder_maps
    return ((a.float() - target.float()) ** 2).flatten(1).mean(dim=1).sum()


def augmentation_loss(placeholder_maps: torch.Tensor, class_maps: torch.Tensor, pseudo_masks: torch.Tensor,
                      normalize: bool = True) -> torch.Tensor:
    """L_AUG: the L_ICA form on an augmented pair (c_a, ĉ_a) with its pseudo-masks M_i^a.

    Attention only: there is deliberately no reconstruction term on augmented images, whose
    subjects are re-rendered and would blend identities into the placeholders.
    """
    return inter_cross_attention_loss(placeholder_maps, class_maps, pseudo_masks, normalize=normalize)
