"""LoRA extraction: a trained model saved small, as the low-rank part of its difference from the base.

For each changed weight ``W`` (linear ``[out, in]``, conv ``[out, in, kh, kw]``, embedding tables) the
difference ``D = W_trained - W_base`` is factored by truncated SVD, ``D ~ up @ down`` with
``up = U_r sqrt(S_r)``, ``down = sqrt(S_r) Vh_r``: the best rank-r approximation in the Frobenius
norm (Eckart-Young). This is the math of ComfyUI's ``LoraSave`` (comfy_extras/nodes_lora_extract.py)
and kohya's ``extract_lora_from_models.py``; a conv kernel is flattened to ``[out, in*kh*kw]``, so
``down`` is a ``[r, in, kh, kw]`` conv and ``up`` a 1x1 conv, as both write it. Differences:
the singular values are split evenly between the factors (both stay well inside fp16's range),
clamping is off unless asked for (so a full rank reproduces ``D`` up to fp precision), and each
layer's ``.alpha`` equals its rank, so loaders apply the product at scale 1.

Biases and 1-D weights (norms) cannot be low-rank; with ``biases_and_norms`` their differences are
stored whole as ``.diff_b`` / ``.diff`` (the keys ComfyUI's LoRA loader and LyCORIS use), which makes
a full-rank LoRA reproduce the trained model exactly rather than only its matrices.

Key names are the caller's (see ``kohya_name``); this module imports nothing from ComfyUI.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from .errors import DynASynError
from .export import save_safetensors, validate_export_name, write_atomic

KOHYA_UNET_PREFIX = "lora_unet_"
KOHYA_TE_PREFIX = "lora_te_"
MAX_RANK = 4096  # as ComfyUI's LoraSave; any rank >= a layer's smaller side is that layer's full rank

# The text-encoder layers kohya trains and ComfyUI maps under ``lora_te_`` (comfy.lora.LORA_CLIP_MAP).
_KOHYA_TE = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


class LoraError(DynASynError):
    """The models cannot be turned into a LoRA (different architectures, bad rank...)."""


def kohya_name(prefix: str, module: str) -> str:
    """kohya's LoRA module name: ``prefix`` + the diffusers/transformers module path with '.' -> '_'."""
    return prefix + module.replace(".", "_")


def kohya_te_name(module: str) -> str | None:
    """``lora_te_...`` for a CLIP encoder-layer linear (``text_model.encoder.layers.N.self_attn.q_proj``), else None."""
    return kohya_name(KOHYA_TE_PREFIX, module) if _KOHYA_TE.match(module) else None


def check_rank(rank) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
        raise LoraError(f"The LoRA rank must be a whole number from 1 to {MAX_RANK}; got {rank!r}. Higher keeps more of "
                        "the trained change (a rank at least the layer width keeps all of it), lower makes a smaller file.")
    return rank


def lora_factors(diff: torch.Tensor, rank: int, clamp_quantile: float | None = None):
    """``(up, down, r, rel_error)`` with ``up @ down`` the best rank-``r`` approximation of ``diff``.

    ``r = min(rank, out, in*kh*kw)``; ``rel_error = ||diff - up @ down||_F / ||diff||_F``, read off the
    dropped singular values. ``clamp_quantile`` (e.g. 0.99, as ComfyUI/kohya) clips outlying factor
    entries, which trades exactness for fewer extreme values.
    """
    shape = diff.shape
    mat = diff.reshape(shape[0], -1).float()
    r = min(rank, *mat.shape)
    U, S, Vh = torch.linalg.svd(mat, full_matrices=False)
    energy = S.square()
    total = energy.sum().item()
    rel_error = math.sqrt(max(energy[r:].sum().item(), 0.0) / total) if total > 0 else 0.0
    s = S[:r].sqrt()
    up, down = U[:, :r] * s, s[:, None] * Vh[:r]
    if clamp_quantile is not None:
        dist = torch.cat([up.flatten(), down.flatten()])
        k = max(1, min(dist.numel(), math.ceil(clamp_quantile * dist.numel())))
        hi = dist.kthvalue(k).values.abs()
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if diff.ndim > 2:  # conv: down is the kernel, up a 1x1 (ComfyUI and kohya layout)
        up = up.reshape(shape[0], r, *([1] * (diff.ndim - 2)))
        down = down.reshape(r, *shape[1:])
    return up, down, r, rel_error


def _split_key(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality. ComfyUI leaves a weight a checkpoint lacks as uninitialised memory (SD 1.x CLIP's unused
    ``text_projection``), which may hold NaN: such a tensor, untouched by training, is unchanged, not an error."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    bits = lambda t: t.detach().reshape(-1).contiguous().view(torch.uint8)  # noqa: E731
    return torch.equal(bits(a), bits(b).to(a.device))


def extract_lora(base_sd: Mapping[str, torch.Tensor], trained_sd: Mapping[str, torch.Tensor], rank: int, *,
                 names: str | Callable[[str], str | None] = KOHYA_UNET_PREFIX, biases_and_norms: bool = True,
                 clamp_quantile: float | None = None, dtype: torch.dtype = torch.float16,
                 device: torch.device | str | None = None, what: str = "model",
                 stats: list | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors for ``trained_sd - base_sd`` (both keyed ``<module path>.weight`` / ``.bias``).

    ``names`` maps a module path to its LoRA name: a prefix for kohya's rule (``lora_unet_`` + path
    with '.' -> '_'), or a function (None skips the module). Unchanged tensors are skipped. Weights
    with 2+ dims get ``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``; with
    ``biases_and_norms``, 1-D weights get ``.diff`` and biases ``.diff_b``. ``stats``, when a list,
    receives one dict per stored layer (name, kind, rank, rel_error). Mappings may compute their
    values lazily: each key is read once, so only one layer is in memory at a time.
    """
    check_rank(rank)
    name_of = (lambda m: kohya_name(names, m)) if isinstance(names, str) else names
    base_keys, trained_keys = list(base_sd.keys()), set(trained_sd.keys())
    odd = sorted(set(base_keys) ^ trained_keys)
    if odd:
        raise LoraError(f"The trained {what} and the base {what} have different architectures: {len(odd)} weights "
                        f"exist in only one of them (first: {odd[:3]}). Connect the base model the trained one was made from.")
    out: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    for key in base_keys:
        module, leaf = _split_key(key)
        if leaf not in ("weight", "bias"):
            continue  # buffers (position ids...) are not weights a LoRA patches
        base, trained = base_sd[key], trained_sd[key]
        if base.shape != trained.shape:
            raise LoraError(f"The trained {what} and the base {what} have different architectures: {key} is "
                            f"{tuple(trained.shape)} in the trained one and {tuple(base.shape)} in the base. "
                            "Connect the base model the trained one was made from.")
        if _same_bits(base, trained):
            continue  # untouched, also when it holds NaN (see _same_bits)
        diff = trained.to(device or "cpu", torch.float32) - base.to(device or "cpu", torch.float32)
        if not bool(diff.any()):
            continue
        if not bool(torch.isfinite(diff).all()):
            raise LoraError(f"The trained {what} holds NaN or infinite values in {key}; it cannot be saved as a LoRA. "
                            "Train again with a lower learning rate.")
        name = name_of(module)
        if name is None:
            continue
        if owner.setdefault(name, module) != module:
            raise LoraError(f"Two layers ({owner[name]} and {module}) would get the same LoRA name {name!r}.")
        if leaf == "weight" and diff.ndim >= 2:
            up, down, r, err = lora_factors(diff, rank, clamp_quantile)
            tensors = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
            out[f"{name}.alpha"] = torch.tensor(float(r))  # alpha / rank = 1: the product as it is
            kind = "lora"
        elif biases_and_norms:
            r, err = None, 0.0
            kind = "diff" if leaf == "weight" else "diff_b"
            tensors = {f"{name}.{kind}": diff}
        else:
            continue
        for k, t in tensors.items():
            t = t.to("cpu", dtype).contiguous()
            if not bool(torch.isfinite(t).all()):
                raise LoraError(f"The change of {key} does not fit in {dtype}; save with a wider dtype (float32).")
            out[k] = t
        if stats is not None:
            stats.append({"name": name, "key": key, "kind": kind, "rank": r, "rel_error": err,
                          "norm": diff.norm().item(), "base_norm": base.float().norm().item()})
    return out


def summarize(stats: list[dict]) -> dict:
    """Counts and the change kept: the energy-weighted relative error over the low-rank layers."""
    lora = [s for s in stats if s["kind"] == "lora"]
    energy = sum(s["norm"] ** 2 for s in lora)
    lost = sum((s["rel_error"] * s["norm"]) ** 2 for s in lora)
    change = math.sqrt(sum(s["norm"] ** 2 for s in stats))
    base = math.sqrt(sum(s["base_norm"] ** 2 for s in stats))
    return {"layers": len(lora), "whole_diffs": len(stats) - len(lora),
            "rel_error": math.sqrt(lost / energy) if energy > 0 else 0.0,
            "worst_rel_error": max((s["rel_error"] for s in lora), default=0.0),
            "relative_change": change / base if base > 0 else float("inf")}


def lora_metadata(rank: int, family: str | None = None, extra: Mapping | None = None) -> dict[str, str]:
    """safetensors metadata: kohya's ``ss_*`` keys (shown by LoRA browsers) and a ``dynasyn`` JSON record."""
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    if family in ("sd15", "sd2"):
        meta["ss_base_model_version"] = "sd_v1" if family == "sd15" else "sd_v2"
        meta["ss_v2"] = str(family == "sd2")
    meta["dynasyn"] = json.dumps({"rank": rank, "family": family, **dict(extra or {})}, default=str, sort_keys=True)
    return meta


def save_lora_file(folder: str | Path, name: str, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``<folder>/<name>.safetensors`` atomically, never overwriting an existing file."""
    validate_export_name(name, "LoRA")
    if not tensors:
        raise LoraError("The trained model equals the base model: there is no change to save as a LoRA. "
                        "Connect the trained MODEL (and CLIP) from DynASyn Train and the base they were trained from.")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    return write_atomic(Path(folder) / f"{name}.safetensors", lambda tmp: save_safetensors(tensors, tmp, meta))
