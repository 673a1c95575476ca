"""Cross-attention capture at the paper's 16x16 layers, through diffusers attention processors.

Only the layers of one UNet level (``capture_level``: SD's ``down_blocks.2`` and ``up_blocks.1``, 16x16 at
512 px and 24x24 at 768 px) get the explicit-probability processor; every other layer
keeps the fast SDPA path. Maps are stored by layer name, with their autograd graph, only while
``store.enabled`` is on, so the recomputation in a gradient-checkpointed backward pass does not
touch them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import torch

from .errors import DynASynError


class NoAttentionLevel(DynASynError, ValueError):
    """The UNet has no cross-attention level DynASyn can capture at this size."""


class StopForward(Exception):
    """Raised after the last hooked layer when the rest of the UNet is not needed."""


class AttentionStore:
    """Cross-attention probabilities of the hooked layers for the current forward pass.

    With ``stop_after`` set (the last hooked layer in execution order), the forward pass ends
    right after that layer by raising ``StopForward``: an attention-only pass (the frozen model's
    class maps, L_AUG) skips the UNet's high-resolution up blocks.
    """

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}  # layer -> [B, heads, HW, T]
        self.enabled = False
        self.stop_after: str | None = None

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        if self.enabled:
            self.maps[layer] = probs.reshape(-1, heads, *probs.shape[1:])
            if layer == self.stop_after:
                raise StopForward()

    def clear(self) -> None:
        self.maps = {}

    def aggregate(self) -> torch.Tensor:
        """Mean over every head of every hooked layer (Break-a-Scene's ``aggregate_attention``): ``[B, r, r, T]``."""
        if not self.maps:
            raise RuntimeError("No cross-attention was recorded: enable the store around the UNet forward pass.")
        maps = torch.cat([m for m in self.maps.values()], dim=1)  # [B, sum(heads), HW, T]
        mean = maps.mean(dim=1)
        r = int(math.isqrt(mean.shape[1]))
        return mean.reshape(mean.shape[0], r, r, mean.shape[-1])


class CaptureAttnProcessor:
    """diffusers' ``AttnProcessor`` math with the probabilities handed to an ``AttentionStore``."""

    def __init__(self, store: AttentionStore, layer: str):
        self.store = store
        self.layer = layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq_len, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = (attn.head_to_batch_dim(x) for x in (query, key, value))
        probs = attention_probs(attn, query, key, attention_mask)  # [B*heads, HW, T]
        self.store.record(self.layer, probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu", "mps")


def attention_probs(attn, query: torch.Tensor, key: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """``attn.get_attention_scores``, in fp32 when the model asks for it (``upcast_attention``: SD 2.x, ComfyUI's
    ``attn_precision`` fp32) also under autocast, which would otherwise run the score product in fp16 / bf16
    whatever the inputs' dtype (SD 2.x's scores overflow fp16)."""
    if not getattr(attn, "upcast_attention", False):
        return attn.get_attention_scores(query, key, attention_mask)
    dev = query.device.type
    off = torch.autocast(dev, enabled=False) if dev in _AUTOCAST_DEVICES else contextlib.nullcontext()
    with off:
        mask = attention_mask.float() if attention_mask is not None else None
        return attn.get_attention_scores(query.float(), key.float(), mask)


def cross_attention_resolutions(unet, latent_size: int) -> dict[str, int]:
    """``{processor name: query map side}`` of every cross-attention (``attn2``) layer at ``latent_size``."""
    levels = len(unet.config.block_out_channels)
    out = {}
    for name in unet.attn_processors:
        if ".attn2." not in name:
            continue
        part = name.split(".")[0]
        if part == "down_blocks":
            level = int(name.split(".")[1])
        elif part == "up_blocks":
            level = levels - 1 - int(name.split(".")[1])
        else:  # mid_block
            level = levels - 1
        out[name] = latent_size // (2 ** level)
    return out


def capture_level(levels: int, sample_size: int, resolution: int = 16) -> int:
    """The UNet level (0 = full latent size) whose cross-attention maps DynASyn uses.

    SD-shaped UNets (4 levels: SD 1.x / 2.x) by block: level 2 = ``down_blocks.2`` / ``up_blocks.1`` (ComfyUI's
    input blocks 7, 8 / output blocks 3, 4, 5), maps of latent ÷ 4: 16x16 at 512 px, 24x24 at 768 px. Other
    UNets (the tiny test models): the level whose maps are ``resolution``² at the UNet's own training size
    (``sample_size`` latents).
    """
    if levels == 4:
        return 2
    level = round(math.log2(max(sample_size, 1) / resolution)) if sample_size >= resolution else -1
    if not 0 <= level < levels or sample_size != resolution * 2 ** level:
        raise NoAttentionLevel(f"This {levels}-level UNet (sample size {sample_size}) has no level with "
                         f"{resolution}x{resolution} cross-attention maps at its training size.")
    return level


def capture_layers(unet, latent_size: int | None = None, resolution: int = 16, include_mid: bool = False) -> list[str]:
    """The attn2 processors of the capture level (``capture_level``), down and up blocks (mid only if asked).

    ``latent_size`` only checks that the latent divides evenly down to that level.
    """
    levels = len(unet.config.block_out_channels)
    level = capture_level(levels, int(unet.config.sample_size), resolution)
    if latent_size is not None and latent_size % 2 ** level:
        raise NoAttentionLevel(f"{latent_size}x{latent_size} latents do not divide down to the attention level "
                         f"(÷{2 ** level}); use a training resolution that is a multiple of {64 * 2 ** level // 8} px.")
    res = cross_attention_resolutions(unet, 2 ** level)  # level l -> side 2**level / 2**l: 1 exactly at level
    layers = [n for n, r in res.items() if r == 1 and (include_mid or not n.startswith("mid_block"))]
    if not layers:
        raise NoAttentionLevel(f"The UNet has no cross-attention in its level-{level} down/up blocks (the "
                         f"{resolution}x{resolution} maps at its training size).")
    return layers


def map_side(unet, latent_size: int, resolution: int = 16) -> int:
    """Side of the captured attention maps for ``latent_size`` latents."""
    return latent_size // 2 ** capture_level(len(unet.config.block_out_channels), int(unet.config.sample_size), resolution)


def execution_order(name: str) -> tuple:
    """Sort key giving the order in which a UNet runs its attention processors."""
    parts = name.split(".")
    block = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
    nums = [int(p) for p in parts if p.isdigit()]
    return (block, *nums)


def last_layer(layers: Iterable[str]) -> str:
    return max(layers, key=execution_order)


def run_until_last_capture(unet, store: AttentionStore, *args, **kwargs) -> None:
    """Run ``unet`` only as far as the last hooked layer (its output is not needed)."""
    # the last hooked layer, noted by install_attention_capture: walking unet.attn_processors on every call took 3 %
    # of a CPU training step
    last = getattr(unet, "_dynasyn_last_capture", None)
    store.stop_after = last or last_layer(n for n, p in unet.attn_processors.items() if isinstance(p, CaptureAttnProcessor))
    try:
        unet(*args, **kwargs)
    except StopForward:
        pass
    finally:
        store.stop_after = None


def install_attention_capture(unet, store: AttentionStore, layers: Iterable[str]) -> list[str]:
    """Explicit-probability processors on ``layers``, SDPA everywhere else; returns the hooked names."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    layers = list(layers)
    procs = {name: (CaptureAttnProcessor(store, name) if name in layers else AttnProcessor2_0())
             for name in unet.attn_processors}
    unet.set_attn_processor(dict(procs))  # diffusers pops entries out of the dict it is given
    hooked = [name for name, proc in procs.items() if isinstance(proc, CaptureAttnProcessor)]
    unet._dynasyn_last_capture = last_layer(hooked) if hooked else None
    return layers


def remove_attention_capture(unet) -> None:
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    unet._dynasyn_last_capture = None


def token_maps(aggregated: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Maps of the given token positions per subject, ``[S, r, r]`` (multi-token words: mean of their columns).

    ``aggregated`` is ``[r, r, T]`` for one sample.
    """
    return torch.stack([aggregated[..., pos].mean(dim=-1) for pos in positions])
