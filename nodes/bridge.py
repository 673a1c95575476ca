"""The bridge between ComfyUI's native MODEL / CLIP / VAE and diffusers / transformers modules.

This is the only module that knows both worlds. Key maps are ComfyUI's own
(``comfy.utils.unet_to_diffusers``, ``comfy.diffusers_convert``); architectures are read off the
loaded objects, so any SD 1.x / 2.x checkpoint (and the tiny test models built the same way)
converts without a hard-coded config.

Directions:
  * ``native_to_components``: MODEL, CLIP, VAE (as CheckpointLoaderSimple returns them) ->
    ``dynasyn.models.SDComponents`` (fp32 copies, trainable, made outside inference mode);
  * ``components_to_native`` (= ``trained_weights`` + ``apply_trained``): trained weights -> a *patched
    clone* of the MODEL and CLIP (the originals are untouched) that stock CLIPTextEncode / KSampler use at
    once; the patches hold only the changed tensors, in the base weights' dtype;
  * ``native_fingerprint``: the base model's identity, which names a training run;
  * ``save_checkpoint``: a single-file checkpoint written by ComfyUI's own ``save_checkpoint``;
  * ``save_lora``: the trained-minus-base difference as a LoRA file that stock LoraLoader loads;
  * ``components_to_new_native``: diffusers components (e.g. a diffusers folder) -> native MODEL, CLIP, VAE.
"""

from __future__ import annotations

import collections.abc
import inspect
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_sampling
import comfy.sd
import comfy.supported_models
import comfy.utils

from ..dynasyn import lora
from ..dynasyn.errors import DynASynError, TargetExistsError, UnsupportedModelError
from ..dynasyn.export import atomic_target, validate_export_name
from ..dynasyn.models import SUPPORTED_FAMILIES, SDComponents, make_noise_scheduler, normalize_clip_keys

log = logging.getLogger("DynASyn")

COMFY_DIR = Path(comfy.utils.__file__).resolve().parent
TOKENIZER_DIR = COMFY_DIR / "sd1_tokenizer"  # OpenAI CLIP BPE, shared by SD 1.x and 2.x

# Exactly these model classes: subclasses (instruct-pix2pix, unCLIP, inpainting) have other inputs.
_SUPPORTED = {comfy.supported_models.SD15: "sd15", comfy.supported_models.SD20: "sd2"}


# --------------------------------------------------------------------------------------------
# Family and prediction type
# --------------------------------------------------------------------------------------------

def model_family(model) -> str:
    """``sd15`` or ``sd2`` for a supported native MODEL; a clear error for anything else."""
    base = getattr(model, "model", None)
    config = getattr(base, "model_config", None)
    family = _SUPPORTED.get(type(config))
    if family is None:
        name = type(config).__name__ if config is not None else type(model).__name__
        raise UnsupportedModelError(
            f"This model is {name}; DynASyn supports {SUPPORTED_FAMILIES}. "
            "Load an SD 1.5 or SD 2.1 checkpoint with CheckpointLoaderSimple (SDXL, SD3, Flux, "
            "inpainting and unCLIP models are not supported).")
    if config.unet_config.get("in_channels", 4) != 4:
        raise UnsupportedModelError(f"This {type(config).__name__} model has "
                                    f"{config.unet_config['in_channels']} input channels; DynASyn supports {SUPPORTED_FAMILIES}.")
    return family


def prediction_type(model) -> str:
    """The prediction type the MODEL samples with, object patches (ModelSamplingDiscrete) included."""
    ms = comfy.model_sampling
    sampling = model.get_model_object("model_sampling")
    other = tuple(getattr(ms, n) for n in ("EDM", "CONST", "V_PREDICTION_EDM", "IMG_TO_IMG", "X0") if hasattr(ms, n))
    if not isinstance(sampling, other):
        if isinstance(sampling, ms.V_PREDICTION):
            return "v_prediction"
        if isinstance(sampling, ms.EPS):
            return "epsilon"
    raise UnsupportedModelError(f"The model samples with {type(sampling).__name__}; DynASyn supports eps and "
                                f"v-prediction ({SUPPORTED_FAMILIES}).")


# --------------------------------------------------------------------------------------------
# Reading weights (patches such as a LoRA from LoraLoader are applied)
# --------------------------------------------------------------------------------------------

def _patched_weight(patcher, key: str, value: torch.Tensor | None = None) -> torch.Tensor:
    """An fp32 CPU copy of ``patcher.model``'s ``key`` with this patcher's patches applied.

    Clones share one module: after a KSampler loaded some clone, the module holds *that* clone's patched
    weights in place and the originals sit in the shared ``backup`` (as ``ModelPatcher.get_key_patches``
    reads them), so the original is taken from there.
    """
    import comfy.lora

    bk = patcher.backup.get(key)
    hbk = getattr(patcher, "hook_backup", {}).get(key)
    if bk is not None:
        value = bk.weight
    elif hbk is not None:
        value = hbk[0]
    elif value is None:
        value = comfy.utils.get_attr(patcher.model, key)
    with torch.inference_mode(False), torch.no_grad():
        w = value.detach().to("cpu", torch.float32).clone()
        patches = patcher.patches.get(key)
        if patches:
            w = comfy.lora.calculate_weight(patches, w, key)
    return w


def _patched_state_dict(patcher, module, prefix: str) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of ``module``'s weights with the patcher's patches applied.

    Keys are relative to ``module``; ``prefix`` is the module's path in ``patcher.model``.
    """
    return {key: _patched_weight(patcher, prefix + key, value) for key, value in module.state_dict().items()}


class PatchedWeights(collections.abc.Mapping):
    """``_patched_state_dict`` computed one key at a time (a LoRA extraction holds one layer, not two models)."""

    def __init__(self, patcher, module, prefix: str):
        self.patcher, self.prefix = patcher, prefix
        self.values = module.state_dict()  # references, no copies

    def __getitem__(self, key):
        return _patched_weight(self.patcher, self.prefix + key, self.values[key])

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


# --------------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------------

def diffusers_unet_config(unet_config: Mapping[str, Any], prediction: str = "epsilon") -> dict:
    """A ``UNet2DConditionModel`` config for ComfyUI's ldm ``unet_config`` (any SD-style UNet)."""
    nrb = list(unet_config["num_res_blocks"])
    if len(set(nrb)) != 1:
        raise UnsupportedModelError(f"UNets with uneven res-blocks per level ({nrb}) are not supported; "
                                    f"DynASyn supports {SUPPORTED_FAMILIES}.")
    mult = list(unet_config["channel_mult"])
    ch = int(unet_config["model_channels"])
    td = list(unet_config["transformer_depth"])
    td_out = list(unet_config["transformer_depth_output"])
    levels = len(mult)
    down = ["CrossAttnDownBlock2D" if td[i * nrb[0]] > 0 else "DownBlock2D" for i in range(levels)]
    up = []
    td_up = td_out[::-1]  # ComfyUI lists output depths from the highest resolution; up_blocks start at the lowest
    for j in range(levels):
        up.append("CrossAttnUpBlock2D" if td_up[j * (nrb[0] + 1)] > 0 else "UpBlock2D")
    depths = sorted({d for d in td + td_out if d > 0})
    if len(depths) > 1:
        raise UnsupportedModelError(f"UNets with several transformer depths ({depths}) are not supported; "
                                    f"DynASyn supports {SUPPORTED_FAMILIES}.")
    block_out = [ch * m for m in mult]
    heads = unet_config.get("num_heads", -1)
    head_ch = unet_config.get("num_head_channels", -1)
    n_heads = [heads if heads != -1 else c // head_ch for c in block_out]
    mid_depth = unet_config.get("transformer_depth_middle", 1)
    if mid_depth is None or mid_depth < 1:
        raise UnsupportedModelError(f"UNets without a middle cross-attention block are not supported; "
                                    f"DynASyn supports {SUPPORTED_FAMILIES}.")
    sd2_768 = prediction == "v_prediction" and unet_config.get("context_dim") == 1024
    return dict(
        sample_size=96 if sd2_768 else (64 if ch == 320 else int(unet_config.get("image_size", 32))),
        in_channels=int(unet_config.get("in_channels", 4)), out_channels=int(unet_config.get("out_channels", 4)),
        layers_per_block=nrb[0], block_out_channels=tuple(block_out),
        down_block_types=tuple(down), up_block_types=tuple(up), mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=int(unet_config["context_dim"]),
        attention_head_dim=n_heads[0] if len(set(n_heads)) == 1 else tuple(n_heads),
        transformer_layers_per_block=depths[0] if depths else 1,
        use_linear_projection=bool(unet_config.get("use_linear_in_transformer", False)),
        upcast_attention=unet_config.get("attn_precision") == torch.float32,
        norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0,
    )


def unet_key_map(model) -> dict[str, str]:
    """``{diffusers_key: ldm_key}`` from ComfyUI's own map for this MODEL's config."""
    return comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)


def native_unet_to_diffusers(model, prediction: str):
    from diffusers import UNet2DConditionModel

    cfg = diffusers_unet_config(model.model.model_config.unet_config, prediction)
    ldm = _patched_state_dict(model, model.model.diffusion_model, "diffusion_model.")
    mapping = unet_key_map(model)
    with torch.inference_mode(False):
        with torch.device("meta"):  # no random init and no second copy: the converted tensors are assigned
            unet = UNet2DConditionModel(**cfg)
        expected = unet.state_dict()
        sd, missing = {}, []
        for dk in expected:
            lk = mapping.get(dk)
            if lk is None or lk not in ldm:
                missing.append(dk)
                continue
            sd[dk] = ldm.pop(lk).reshape(expected[dk].shape)
        if missing:
            raise DynASynError(f"The UNet could not be converted: {len(missing)} weights have no match "
                               f"(first: {missing[:3]}). DynASyn supports {SUPPORTED_FAMILIES}.")
        unet.load_state_dict(sd, strict=True, assign=True)
    return unet.eval()


# --------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------

def _clip_inner(clip):
    """(the SDClipModel inside CLIP, its attribute name: 'clip_l' / 'clip_h')."""
    outer = clip.cond_stage_model
    name = getattr(outer, "clip", None)
    inner = getattr(outer, name, None) if isinstance(name, str) else None
    if inner is None or not hasattr(inner, "transformer"):
        raise UnsupportedModelError(f"This CLIP ({type(outer).__name__}) is not a single CLIP text encoder; "
                                    f"DynASyn supports {SUPPORTED_FAMILIES}.")
    return inner, name


def _clip_layers_used(inner, clip) -> int:
    """How many transformer layers the conditioning passes (CLIPSetLastLayer and SD 2's penultimate)."""
    n = inner.num_layers
    layer_idx = clip.layer_idx if clip.layer_idx is not None else (inner.layer_idx if inner.layer == "hidden" else None)
    if layer_idx is None or abs(layer_idx) > n:
        return n
    return layer_idx + 1 if layer_idx >= 0 else n + layer_idx + 1


def native_text_encoder_to_transformers(clip):
    """(CLIPTextModel with the layers the conditioning uses, CLIPTokenizer, family)."""
    from comfy.clip_model import ACTIVATIONS
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    inner, name = _clip_inner(clip)
    tm = inner.transformer.text_model
    if not getattr(inner, "layer_norm_hidden_state", True) and _clip_layers_used(inner, clip) != inner.num_layers:
        raise UnsupportedModelError("This CLIP skips the final layer norm on hidden layers, which DynASyn does not support.")
    layers = _clip_layers_used(inner, clip)
    tok_emb = tm.embeddings.token_embedding.weight
    attn = tm.encoder.layers[0].self_attn
    act = next((k for k, f in ACTIVATIONS.items() if f is tm.encoder.layers[0].mlp.activation), None)
    if act is None:
        raise UnsupportedModelError("Unknown CLIP activation; DynASyn supports the CLIP encoders of " + SUPPORTED_FAMILIES)
    family = "sd2" if name == "clip_h" else "sd15"
    pad = inner.special_tokens.get("pad", 49407)
    prefix = f"{name}.transformer."
    sd = _patched_state_dict(clip.patcher, inner.transformer, prefix)
    with torch.inference_mode(False):
        config = CLIPTextConfig(
            vocab_size=tok_emb.shape[0], hidden_size=tok_emb.shape[1],
            intermediate_size=tm.encoder.layers[0].mlp.fc1.weight.shape[0], num_attention_heads=attn.heads,
            num_hidden_layers=layers, max_position_embeddings=tm.embeddings.position_embedding.weight.shape[0],
            hidden_act=act, projection_dim=tok_emb.shape[1], layer_norm_eps=1e-5,
            bos_token_id=inner.special_tokens.get("start", 49406), eos_token_id=inner.special_tokens.get("end", 49407),
            pad_token_id=pad)
        te = CLIPTextModel(config)
        keep = {k: v for k, v in sd.items() if k.startswith("text_model.")
                and not any(k.startswith(f"text_model.encoder.layers.{i}.") for i in range(layers, inner.num_layers))}
        te_sd = normalize_clip_keys(keep, te.state_dict().keys())
        result = te.load_state_dict(te_sd, strict=False)
        missing = [k for k in result.missing_keys if "position_ids" not in k]
        if missing:
            raise DynASynError(f"The text encoder could not be converted: {len(missing)} weights missing (first: {missing[:3]}).")
    tok_kwargs = dict(model_max_length=inner.max_length, local_files_only=True)
    if pad == 0:
        tok_kwargs["pad_token"] = "!"  # SD 2.x pads with id 0
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), **tok_kwargs)
    return te.eval(), tokenizer, family


def te_key_map(clip, te) -> dict[str, str]:
    """``{transformers_key: comfy CLIP patch key}`` for the text-encoder weights the bridge converts."""
    _, name = _clip_inner(clip)
    return {k: _te_comfy_key(name, k) for k in te.state_dict() if "position_ids" not in k}


def _te_comfy_key(name: str, key: str) -> str:
    bare = key[len("text_model."):] if key.startswith("text_model.") else key
    return f"{name}.transformer.text_model.{bare}"


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------

def _ldm_vae_key(key: str, levels: int) -> str:
    """ComfyUI's VAE map assumes SD's 4 levels (``up_blocks.i`` -> ``up.{3-i}``); fix it for other depths."""
    if levels != 4 and key.startswith("decoder.up."):
        i = int(key.split(".")[2])
        return f"decoder.up.{i - (4 - levels)}." + key.split(".", 3)[3]
    return key


def _convert_vae_state_dict(diffusers_sd: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    from comfy.diffusers_convert import convert_vae_state_dict

    return {_ldm_vae_key(k, levels): v for k, v in convert_vae_state_dict(dict(diffusers_sd)).items()}


def _vae_key_map(vae_diffusers) -> dict[str, str]:
    """``{diffusers_key: ldm_key}``, the inverse of ComfyUI's ``convert_vae_state_dict``."""
    probes = {k: torch.empty(2, device="cpu") for k in vae_diffusers.state_dict()}  # distinct storages identify keys
    by_ptr = {t.data_ptr(): k for k, t in probes.items()}
    converted = _convert_vae_state_dict(probes, len(vae_diffusers.config.block_out_channels))
    return {by_ptr[t.data_ptr()]: ldm_key for ldm_key, t in converted.items()}


def native_vae_to_diffusers(vae):
    from diffusers import AutoencoderKL

    fsm = vae.first_stage_model
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in fsm.state_dict().items()}
    if "encoder.conv_in.weight" not in sd or "quant_conv.weight" not in sd:
        raise UnsupportedModelError(f"This VAE ({type(fsm).__name__}) is not an SD 1.x/2.x KL autoencoder; "
                                    f"DynASyn supports {SUPPORTED_FAMILIES}.")
    levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
    block_out = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in range(levels)]
    per_block = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block."))
    with torch.inference_mode(False), torch.device("meta"):
        dv = AutoencoderKL(in_channels=sd["encoder.conv_in.weight"].shape[1], out_channels=sd["decoder.conv_out.weight"].shape[0],
                           latent_channels=sd["quant_conv.weight"].shape[0] // 2, block_out_channels=tuple(block_out),
                           layers_per_block=per_block, down_block_types=("DownEncoderBlock2D",) * levels,
                           up_block_types=("UpDecoderBlock2D",) * levels, norm_num_groups=32, sample_size=512,
                           scaling_factor=0.18215)  # SD 1.x / 2.x latent scale (comfy latent_formats.SD15)
    with torch.inference_mode(False):
        expected = dv.state_dict()
        mapping = _vae_key_map(dv)
        dv.load_state_dict({dk: sd[lk].reshape(expected[dk].shape) for dk, lk in mapping.items()}, strict=True, assign=True)
    return dv.eval()


# --------------------------------------------------------------------------------------------
# Native -> diffusers
# --------------------------------------------------------------------------------------------

def native_to_components(model, clip, vae=None) -> SDComponents:
    """Convert CheckpointLoaderSimple's MODEL / CLIP / VAE into trainable fp32 diffusers modules."""
    if model is None or clip is None:
        raise DynASynError("Both a MODEL and a CLIP are needed (connect CheckpointLoaderSimple's MODEL and CLIP outputs).")
    family = model_family(model)
    pred = prediction_type(model)
    unet = native_unet_to_diffusers(model, pred)
    te, tokenizer, te_family = native_text_encoder_to_transformers(clip)
    if te.config.hidden_size != unet.config.cross_attention_dim:
        raise DynASynError(f"The CLIP (width {te.config.hidden_size}) does not belong to this MODEL "
                           f"(context {unet.config.cross_attention_dim}); connect the CLIP of the same checkpoint.")
    dv = native_vae_to_diffusers(vae) if vae is not None else None
    return SDComponents(unet, te, tokenizer, dv, make_noise_scheduler(pred), family=te_family,
                        extra={"base_family": family})


# --------------------------------------------------------------------------------------------
# Diffusers -> native
# --------------------------------------------------------------------------------------------

def _original(patcher, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The base weight of ``key`` even while ComfyUI has a patched clone loaded (it keeps the originals in the
    ``backup`` every clone of the model shares)."""
    saved = getattr(patcher, "backup", {}).get(key)
    return saved.weight if saved is not None else tensor


def _round_like_comfy(trained: torch.Tensor, base: torch.Tensor, key: str) -> torch.Tensor:
    """``trained`` in ``base``'s dtype, rounded exactly as ComfyUI rounds a patched weight (so a patch held in
    the base dtype gives the very weights an fp32 "set" patch would, at a half or a quarter of the memory)."""
    import comfy.float
    from comfy.model_patcher import string_to_seed

    w = trained.detach().to("cpu", torch.float32).reshape(base.shape)
    return comfy.float.stochastic_rounding(w, base.dtype, seed=string_to_seed(key)).contiguous()


def _changed(out: dict, name: str, trained: torch.Tensor, base: torch.Tensor, key: str) -> None:
    w = _round_like_comfy(trained, base, key)
    if not torch.equal(w, base.detach().to("cpu")):
        out[name] = w.reshape(trained.shape)


def trained_weights(model, clip, comps: SDComponents, *, include_text_encoder: bool = True):
    """``(unet, text_encoder)``: the trained tensors that differ from the base MODEL / CLIP, keyed as diffusers /
    transformers name them, in the base weights' dtype (what a finished run stores and the patches hold).
    Untouched tensors are left out; the token table keeps ComfyUI's vocabulary (placeholders go to embeddings)."""
    mapping = unet_key_map(model)
    base_sd = model.model.diffusion_model.state_dict()
    unet = {}
    with torch.no_grad():
        for dk, w in comps.unet.state_dict().items():
            lk = mapping.get(dk)
            if lk is None or lk not in base_sd:
                raise DynASynError(f"Trained UNet weight {dk} has no place in the base MODEL; was it trained from this model?")
            key = "diffusion_model." + lk
            _changed(unet, dk, w, _original(model, key, base_sd[lk]), key)
        te = {}
        if include_text_encoder:
            clip_sd = clip.cond_stage_model.state_dict()
            te_sd = comps.text_encoder.state_dict()
            for tk, ck in te_key_map(clip, comps.text_encoder).items():
                base = clip_sd.get(ck)
                if base is None:
                    raise DynASynError(f"Trained text-encoder weight {tk} has no place in the base CLIP; was it trained from this model?")
                w = te_sd[tk]
                if w.shape != base.shape:
                    if tk.endswith("token_embedding.weight") and w.shape[0] > base.shape[0]:
                        w = w[: base.shape[0]]  # added placeholder rows live in embedding files
                    else:
                        raise DynASynError(f"Trained text-encoder weight {tk} has shape {tuple(w.shape)}, the base CLIP {tuple(base.shape)}.")
                _changed(te, tk, w, _original(clip.patcher, ck, base), ck)
    return unet, te


def apply_trained(model, clip, unet: dict[str, torch.Tensor], text_encoder: dict[str, torch.Tensor]):
    """Clones of ``model`` / ``clip`` whose "set" patches are the given trained tensors (as ``trained_weights``
    makes them, or as a finished run stores them). The patches hold those tensors, in the base dtype: no fp32
    copy of the model is made. The originals are untouched."""
    mapping = unet_key_map(model)
    base_sd = model.model.diffusion_model.state_dict()
    with torch.inference_mode(False):
        m, c = model.clone(), clip.clone()
        patches = {}
        for dk, w in unet.items():
            lk = mapping.get(dk)
            if lk is None or lk not in base_sd or base_sd[lk].numel() != w.numel():
                raise DynASynError(f"The trained UNet tensor {dk} has no place in this MODEL; connect the model it was trained from.")
            patches["diffusion_model." + lk] = ("set", (w.reshape(base_sd[lk].shape),))
        if len(m.add_patches(patches, 1.0)) != len(patches):
            raise DynASynError("Some trained UNet tensors have no place in this MODEL; connect the model it was trained from.")
        inner, name = _clip_inner(clip)
        clip_sd = clip.cond_stage_model.state_dict()
        patches = {}
        for tk, w in text_encoder.items():
            ck = _te_comfy_key(name, tk)
            if ck not in clip_sd or clip_sd[ck].shape != w.shape:
                raise DynASynError(f"The trained text-encoder tensor {tk} has no place in this CLIP; connect the CLIP it was trained from.")
            patches[ck] = ("set", (w,))
        if len(c.add_patches(patches, 1.0)) != len(patches):
            raise DynASynError("Some trained text-encoder tensors have no place in this CLIP.")
    return m, c


def components_to_native(model, clip, comps: SDComponents, *, include_text_encoder: bool = True):
    """Patched clones of ``model`` / ``clip`` carrying ``comps``' trained weights (originals untouched)."""
    return apply_trained(model, clip, *trained_weights(model, clip, comps, include_text_encoder=include_text_encoder))


# --------------------------------------------------------------------------------------------
# The base model's identity (names a training run; a run is reloaded only onto its own base)
# --------------------------------------------------------------------------------------------

def _patch_values(obj, depth: int = 0):
    """What a patch is made of, for hashing: tensors, numbers, names, recursively (LoRA adapters included)."""
    if depth > 6:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (str, int, float, bool, type(None))):
        yield repr(obj)
    elif isinstance(obj, dict):
        for k in sorted(obj, key=repr):
            yield repr(k)
            yield from _patch_values(obj[k], depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        for x in items:
            yield from _patch_values(x, depth + 1)
    elif isinstance(obj, type) or inspect.isroutine(obj):
        yield f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
    else:
        yield type(obj).__qualname__
        yield from _patch_values(vars(obj) if hasattr(obj, "__dict__") else repr(obj), depth + 1)


def _patched_digest(patcher, module, prefix: str, extra=(), skip=lambda key: False) -> str:
    from ..dynasyn.runs import sampled_digest

    items = []
    for key, t in module.state_dict().items():
        if not skip(key):
            items.append((prefix + key, _original(patcher, prefix + key, t)))
    patches = getattr(patcher, "patches", {}) or {}
    for key in sorted(k for k in patches if k.startswith(prefix)):
        for i, v in enumerate(_patch_values(patches[key])):
            if isinstance(v, torch.Tensor):
                items.append((f"patch|{key}|{i}", v))
            else:
                extra = (*extra, key, v)
    return sampled_digest(items, extra)


def _unused_projection(key: str) -> bool:
    """CLIP's pooled-output projection: SD 1.x / 2.x never condition on it, and ComfyUI leaves SD 1.x's
    uninitialised (checkpoints lack it), so its bytes differ from one load to the next. Right only while
    model_family refuses the models that do use it (SDXL's clip_g, unCLIP)."""
    return key.endswith("transformer.text_projection.weight")


def native_fingerprint(model, clip, vae, *, legacy: bool = False) -> dict[str, str]:
    """Hashes of the base MODEL (weights, patches such as a LoRA, prediction type), CLIP (weights, patches,
    the layer the conditioning uses) and VAE, from a sample of every tensor: no conversion, a fraction of a
    second for SD 1.5, and the same while ComfyUI has a patched clone of the model loaded. ``legacy``: the
    fingerprint of runs saved before the unused projection was left out (read only, to find those runs)."""
    with torch.no_grad():
        out = {"unet": _patched_digest(model, model.model.diffusion_model, "diffusion_model.",
                                       (prediction_type(model), type(model.get_model_object("model_sampling")).__name__))}
        inner, _ = _clip_inner(clip)
        out["clip"] = _patched_digest(clip.patcher, clip.cond_stage_model, "", (_clip_layers_used(inner, clip),),
                                      skip=(lambda key: False) if legacy else _unused_projection)
        if vae is not None:
            from ..dynasyn.runs import sampled_digest

            out["vae"] = sampled_digest(vae.first_stage_model.state_dict().items())
    return out


# --------------------------------------------------------------------------------------------
# Single-file checkpoint (ComfyUI's own save)
# --------------------------------------------------------------------------------------------

def save_checkpoint(folder: str | os.PathLike, name: str, model, clip, vae, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``<folder>/<name>.safetensors`` with ``comfy.sd.save_checkpoint``, atomically, never overwriting."""
    validate_export_name(name, "checkpoint")
    model_family(model)
    if clip is None or vae is None:
        raise DynASynError("A checkpoint needs MODEL, CLIP and VAE; connect all three.")
    extra = {}
    if model.model.model_type == comfy.model_base.ModelType.V_PREDICTION or prediction_type(model) == "v_prediction":
        extra["v_pred"] = torch.tensor([])
    meta = {"dynasyn": json.dumps(dict(metadata or {}), default=str)}
    with atomic_target(Path(folder) / f"{name}.safetensors") as tmp:
        comfy.sd.save_checkpoint(str(tmp), model, clip, vae, metadata=meta, extra_keys=extra)
    return Path(folder) / f"{name}.safetensors"


# --------------------------------------------------------------------------------------------
# LoRA: the trained-minus-base difference (dynasyn.lora), under kohya's names
# --------------------------------------------------------------------------------------------

def _unet_lora_name(model):
    """module path in the ldm UNet -> ``lora_unet_<diffusers path>`` (kohya; A1111 and ComfyUI read it)."""
    inverse = {ldm: d for d, ldm in unet_key_map(model).items()}

    def name(module: str) -> str:
        for leaf in (".weight", ".bias"):
            dk = inverse.get(module + leaf)
            if dk is not None:
                return lora.kohya_name(lora.KOHYA_UNET_PREFIX, dk[: -len(leaf)])
        return lora.kohya_name(lora.KOHYA_UNET_PREFIX, module)  # ComfyUI maps lora_unet_<ldm path> too
    return name


def _te_lora_name(clip_name: str):
    """``lora_te_...`` for the encoder linears; other changed CLIP weights (norms, embedding tables) have no kohya
    name ComfyUI maps, so they get ComfyUI's generic ``text_encoders.<key>`` name."""
    return lambda module: lora.kohya_te_name(module) or f"text_encoders.{clip_name}.transformer.{module}"


def lora_from_models(base_model, trained_model, rank: int, base_clip=None, trained_clip=None, *,
                     biases_and_norms: bool = True, stats: list | None = None) -> dict[str, torch.Tensor]:
    """LoRA tensors (fp16) for trained minus base, UNet and (with both CLIPs) text encoder; patches on either
    side (Train's results, LoraLoader) are applied first."""
    lora.check_rank(rank)
    family = model_family(base_model)
    if model_family(trained_model) != family:
        raise lora.LoraError(f"The base MODEL is {family} and the trained MODEL {model_family(trained_model)}; "
                             "connect the base model the trained one was made from.")
    if (base_clip is None) != (trained_clip is None):
        raise DynASynError("Connect both base_clip and trained_clip to include the text encoder, or neither for a UNet-only LoRA.")
    device = comfy.model_management.get_torch_device()
    prefix = "diffusion_model."
    tensors = lora.extract_lora(
        PatchedWeights(base_model, base_model.model.diffusion_model, prefix),
        PatchedWeights(trained_model, trained_model.model.diffusion_model, prefix),
        rank, names=_unet_lora_name(base_model), biases_and_norms=biases_and_norms, device=device, what="MODEL", stats=stats)
    if base_clip is not None:
        inner, name = _clip_inner(base_clip)
        inner_t, name_t = _clip_inner(trained_clip)
        if name != name_t:
            raise lora.LoraError(f"The base CLIP is {name} and the trained CLIP {name_t}; connect the CLIP the trained one "
                                 "was made from.")
        te = lora.extract_lora(
            PatchedWeights(base_clip.patcher, inner.transformer, f"{name}.transformer."),
            PatchedWeights(trained_clip.patcher, inner_t.transformer, f"{name}.transformer."),
            rank, names=_te_lora_name(name), biases_and_norms=biases_and_norms, device=device, what="CLIP", stats=stats)
        tensors.update(te)
    return tensors


def save_lora(folder: str | os.PathLike, name: str, base_model, trained_model, base_clip=None, trained_clip=None,
              rank: int = 64, metadata: Mapping[str, Any] | None = None, *, biases_and_norms: bool = True):
    """Extract and write ``<folder>/<name>.safetensors`` (never overwriting); returns ``(path, summary)``.

    ``summary`` (also in the file's ``dynasyn`` metadata) has the layer counts and ``rel_error``, the part of
    the trained change the rank drops (0 at full rank)."""
    validate_export_name(name, "LoRA")
    path = Path(folder) / f"{name}.safetensors"
    if path.exists():  # before minutes of SVD; write_atomic checks again at the end
        raise TargetExistsError(f"{path} already exists and will not be overwritten. Choose another name.")
    stats: list = []
    tensors = lora_from_models(base_model, trained_model, rank, base_clip, trained_clip,
                               biases_and_norms=biases_and_norms, stats=stats)
    summary = lora.summarize(stats)
    if summary["relative_change"] > 0.5:
        log.warning("[DynASyn] the trained model differs from the base by %.0f%% of its weights; was it trained from "
                    "this base? The LoRA only reproduces it on top of this base.", 100 * summary["relative_change"])
    extra = {**dict(metadata or {}), "prediction": prediction_type(base_model),
             "text_encoder": base_clip is not None, "biases_and_norms": biases_and_norms,
             **{k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items()}}
    meta = lora.lora_metadata(rank, model_family(base_model), extra)
    return lora.save_lora_file(folder, name, tensors, meta), summary


# --------------------------------------------------------------------------------------------
# Diffusers folder -> native
# --------------------------------------------------------------------------------------------

def _set_v_prediction(model) -> None:
    class ModelSamplingV(comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION):
        pass

    model.add_object_patch("model_sampling", ModelSamplingV(model.model.model_config))


def components_to_new_native(comps: SDComponents, embedding_directory=None):
    """Fresh native MODEL, CLIP, VAE built by ComfyUI's loaders from diffusers components.

    Unlike ComfyUI's DiffusersLoader, text-encoder keys of either transformers layout are accepted
    (transformers 5 drops ``text_model.``, which ComfyUI silently answers with a random CLIP), and
    the scheduler's prediction type is honoured.
    """
    with torch.inference_mode(False):
        unet_sd = {k: v.detach().cpu() for k, v in comps.unet.state_dict().items()}
        model = comfy.sd.load_diffusion_model_state_dict(unet_sd)
        if model is None:
            raise UnsupportedModelError(f"ComfyUI did not recognise this UNet; DynASyn supports {SUPPORTED_FAMILIES}.")
        model_family(model)
        if comps.prediction_type == "v_prediction" and prediction_type(model) != "v_prediction":
            _set_v_prediction(model)
        te_sd = {k: v.detach().cpu() for k, v in comps.text_encoder.state_dict().items()}
        te_sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in te_sd.items()}
        n_vocab = comps.text_encoder.config.vocab_size
        if n_vocab > 49408:  # placeholder rows: ComfyUI's vocabulary is fixed, they become embeddings
            te_sd["text_model.embeddings.token_embedding.weight"] = te_sd["text_model.embeddings.token_embedding.weight"][:49408]
        clip_type = comfy.sd.CLIPType.STABLE_DIFFUSION
        if comps.embedding_dim == 1024 and comps.text_encoder.config.num_hidden_layers == 23:
            # ComfyUI's SD 2 CLIP has 24 layers and uses the penultimate one: add an unused 24th layer
            # so the checkpoint stays complete; diffusers' 23 layers are exactly what it reads.
            last = "text_model.encoder.layers.22."
            te_sd.update({k.replace(last, "text_model.encoder.layers.23."): v.clone() for k, v in te_sd.items() if k.startswith(last)})
        clip = comfy.sd.load_text_encoder_state_dicts([te_sd], embedding_directory=embedding_directory, clip_type=clip_type)
        vae = comfy.sd.VAE(sd={k: v.detach().cpu() for k, v in comps.vae.state_dict().items()}) if comps.vae is not None else None
    return model, clip, vae


def placeholder_vectors(comps: SDComponents) -> dict[str, torch.Tensor]:
    """``{token: vector}`` for tokens added to the tokenizer beyond CLIP's 49,408 (e.g. ``<asset0>``)."""
    emb = comps.text_encoder.get_input_embeddings().weight
    out = {}
    for tok, idx in comps.tokenizer.get_added_vocab().items():
        if idx >= 49408 and idx < emb.shape[0]:
            out[tok] = emb[idx].detach().to("cpu", torch.float32).clone()
    return out


# --------------------------------------------------------------------------------------------
# Tiny native models (ComfyUI cannot detect them; built from their diffusers twins)
# --------------------------------------------------------------------------------------------

def comfy_unet_config(unet) -> dict:
    """ComfyUI's ldm ``unet_config`` for an SD-style diffusers UNet (inverse of ``diffusers_unet_config``)."""
    cfg = unet.config
    levels = len(cfg.block_out_channels)
    nrb = cfg.layers_per_block
    ch = cfg.block_out_channels[0]
    attn_down = [t.startswith("CrossAttn") for t in cfg.down_block_types]
    attn_up_by_level = [cfg.up_block_types[levels - 1 - i].startswith("CrossAttn") for i in range(levels)]
    heads = cfg.attention_head_dim if isinstance(cfg.attention_head_dim, int) else cfg.attention_head_dim[0]
    return dict(use_checkpoint=False, image_size=cfg.sample_size, out_channels=cfg.out_channels, use_spatial_transformer=True,
                legacy=False, adm_in_channels=None, in_channels=cfg.in_channels, model_channels=ch,
                num_res_blocks=[nrb] * levels, transformer_depth=[int(a) for a in attn_down for _ in range(nrb)],
                transformer_depth_output=[int(a) for a in attn_up_by_level for _ in range(nrb + 1)],
                channel_mult=[c // ch for c in cfg.block_out_channels], transformer_depth_middle=1,
                use_linear_in_transformer=bool(cfg.use_linear_projection), context_dim=cfg.cross_attention_dim,
                num_heads=heads, num_head_channels=-1, use_temporal_attention=False, use_temporal_resblock=False)


def tiny_native(comps: SDComponents, embedding_directory=None):
    """Native MODEL, CLIP, VAE carrying ``comps``' weights, for SD-shaped models too small to detect.

    The text encoder must use CLIP's 49,408-token vocabulary (ComfyUI's tokenizer is fixed).
    """
    import comfy.model_patcher
    import comfy.sd1_clip
    import comfy.supported_models_base

    if comps.text_encoder.config.vocab_size < 49408:
        raise DynASynError("A native CLIP needs the full CLIP vocabulary (49,408 tokens).")
    with torch.inference_mode(False):
        unet_config = comfy_unet_config(comps.unet)
        model_config = comfy.supported_models.SD15(dict(unet_config))
        model_config.set_inference_dtype(torch.float32, torch.float32)
        base = model_config.get_model({}, "")
        mapping = comfy.utils.unet_to_diffusers(model_config.unet_config)
        dsd = comps.unet.state_dict()
        base.diffusion_model.load_state_dict({l: dsd[d].float() for d, l in mapping.items() if d in dsd}, strict=True)
        model = comfy.model_patcher.ModelPatcher(base, load_device=comfy.model_management.get_torch_device(),
                                                 offload_device=comfy.model_management.unet_offload_device())
        if comps.prediction_type == "v_prediction":
            _set_v_prediction(model)
        te_cfg = comps.text_encoder.config
        target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
        clip = comfy.sd.CLIP(target, embedding_directory=embedding_directory, model_options={"dtype": torch.float32, "clip_l_model_config": dict(
            hidden_size=te_cfg.hidden_size, intermediate_size=te_cfg.intermediate_size,
            num_attention_heads=te_cfg.num_attention_heads, num_hidden_layers=te_cfg.num_hidden_layers,
            projection_dim=te_cfg.projection_dim, hidden_act=te_cfg.hidden_act)})
        clip.tokenizer.clip_l.embedding_size = te_cfg.hidden_size  # so embedding:<name> files of this width load
        te_sd = {(k if k.startswith("text_model.") else "text_model." + k): v.float()
                 for k, v in comps.text_encoder.state_dict().items() if "position_ids" not in k}
        clip.cond_stage_model.clip_l.transformer.load_state_dict(te_sd, strict=False)
        vae = None
        if comps.vae is not None:
            vcfg = comps.vae.config
            levels = len(vcfg.block_out_channels)
            ddconfig = dict(double_z=True, z_channels=vcfg.latent_channels, resolution=256, in_channels=vcfg.in_channels,
                            out_ch=vcfg.out_channels, ch=vcfg.block_out_channels[0],
                            ch_mult=[c // vcfg.block_out_channels[0] for c in vcfg.block_out_channels],
                            num_res_blocks=vcfg.layers_per_block, attn_resolutions=[], dropout=0.0)
            ldm_vae = _convert_vae_state_dict({k: v.float() for k, v in comps.vae.state_dict().items()}, levels)
            vae = comfy.sd.VAE(sd=ldm_vae, config={"params": {"embed_dim": vcfg.latent_channels, "ddconfig": ddconfig}})
            vae.downscale_ratio = vae.upscale_ratio = 2 ** (levels - 1)
    return model, clip, vae
