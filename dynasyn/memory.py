"""Training memory: an estimate of the peak a configuration needs, and presets that fit a card.

A run has two peaks; the estimate is the larger. With ``precompute_targets`` (the default) the frozen
model's L_ICA / L_AUG targets of every step are computed before training, then the frozen copy is freed:

    target precomputation ≈ overhead + weights + frozen copy + one no-grad pass
    training              ≈ overhead + weights + optimizer state + max(activations + grads/2, grads) + step temporaries

(without precomputation the frozen copy stays through training and is counted in its peak).

Every term is counted from the models' tensor shapes (exact), except the activations, which are per-pixel
figures measured on the real SD architectures (saved-for-backward tensors of one UNet forward at 256 px,
counted with ``torch.autograd.graph.saved_tensors_hooks``, scaled by the latent area) and the overhead
(what a process holds besides the tensors: CUDA context and allocator slack on a GPU, libraries on a CPU).
Checked against the peaks ``bench/train_memory.py`` measured on the CPU (tests/unit/test_memory.py).
GPU figures are estimates until measured on a GPU (``scripts/gpu_check.sh``).
"""

from __future__ import annotations

import math

from dataclasses import dataclass, replace

GIB = 2 ** 30
# what a process holds besides the tensors: measured on the CPU (libraries and glibc's heap holes; bench/
# train_memory.py B and C), 0.8 GiB there when freed blocks go back to the OS (fused_backward_step on the CPU:
# devices.release_freed_host_memory; E and F), assumed on CUDA (context ~0.5 GiB + caching-allocator slack) until
# measured there
OVERHEAD_GIB = {"cpu": 1.5, "cpu_released": 0.8, "cuda": 1.0}

# Saved-for-backward bytes of one fp32 UNet forward with its graph, per latent pixel (SD 1.5 and SD 2.1 measure
# the same: 0.441 GiB at 32x32 latents without checkpointing, 0.072 GiB with diffusers' block checkpointing).
ACT_PER_LATENT_PX = {False: 0.441 * GIB / 32 ** 2, True: 0.0722 * GIB / 32 ** 2}
# Under autocast (bf16 / fp16) with fp32 weights: activations x1.21 (inputs kept in both precisions) without
# checkpointing, x0.5 with it; and the half-precision weight copies autocast caches for backward
# (2 bytes per trained-model weight without checkpointing; ~0.16 of that with it, as measured).
AMP_ACT_FACTOR = {False: 1.21, True: 0.5}
AMP_WEIGHT_COPY = {False: 2.0, True: 0.32}
AUG_ACT_FACTOR = 1.6  # L_AUG's attention-only pass keeps its graph to the last 16x16 layer (most of the UNet)
# The frozen model's no-grad pass while its targets are precomputed: 0.17 GiB at 64x64 latents, as measured
# (bench/train_memory.py E and F: targets peak less the trainer's resident memory before it)
NOGRAD_ACT_PER_LATENT_PX = 0.17 * GIB / 64 ** 2
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class ModelSize:
    """Parameter counts (elements) of one SD checkpoint's parts."""
    unet: int
    text_encoder: int
    vae: int
    token_table: int        # the text encoder's token embedding (trained in both phases)
    frozen_unet: int        # the frozen copy, truncated after the last 16x16 cross-attention layer
    adafactor_unet: int     # Adafactor's factored second-moment elements
    adafactor_te: int
    largest: int            # the largest single tensor (fused_backward_step's transient)


def _adafactor_elements(params) -> int:
    from .optim import factor_dims  # the optimizer's own rule: the two largest dimensions are factored

    n = 0
    for p in params:
        shape = tuple(p.shape)
        if len(shape) >= 2:  # row statistics: every dimension but the last; column: every one but the second-last
            dims = [shape[d] for d in factor_dims(shape)]
            n += math.prod(dims[:-1]) + math.prod(dims[:-2] + dims[-1:])
        else:
            n += p.numel()
    return n


def model_size(unet, text_encoder, vae, frozen_until: str = "up_blocks.1") -> ModelSize:
    """Exact counts from the modules (meta-device modules work: nothing is allocated)."""
    keep = int(frozen_until.split(".")[1]) + 1 if frozen_until.startswith("up_blocks") else None
    frozen = 0
    for name, p in unet.named_parameters():
        part = name.split(".")
        if keep is not None and ((part[0] == "up_blocks" and int(part[1]) >= keep) or part[0] in ("conv_norm_out", "conv_out")):
            continue
        frozen += p.numel()
    tp = list(text_encoder.parameters())
    return ModelSize(unet=sum(p.numel() for p in unet.parameters()), text_encoder=sum(p.numel() for p in tp),
                     vae=sum(p.numel() for p in vae.parameters()),
                     token_table=text_encoder.get_input_embeddings().weight.numel(), frozen_unet=frozen,
                     adafactor_unet=_adafactor_elements(unet.parameters()), adafactor_te=_adafactor_elements(tp),
                     largest=max(p.numel() for p in list(unet.parameters()) + tp))


# The real architectures (random weights have the same shapes): tests/unit/test_memory.py rebuilds them on the
# meta device and checks these numbers.
FAMILIES = {
    "sd15": ModelSize(unet=859_520_964, text_encoder=123_060_480, vae=83_653_863, token_table=37_945_344,
                      frozen_unet=769_285_120, adafactor_unet=1_870_732, adafactor_te=338_253, largest=37_945_344),
    "sd21": ModelSize(unet=865_910_724, text_encoder=340_387_840, vae=83_653_863, token_table=50_593_792,
                      frozen_unet=774_200_320, adafactor_unet=1_878_924, adafactor_te=783_693, largest=50_593_792),
}


@dataclass(frozen=True)
class Estimate:
    parts: dict          # name -> bytes, of the training peak
    total: int           # the run's peak: the larger of the training and the target-precomputation peaks
    precompute: dict | None = None  # name -> bytes of the target precomputation (frozen copy present), if any

    @property
    def gib(self) -> float:
        return self.total / GIB

    @property
    def training(self) -> int:
        return sum(self.parts.values())

    @property
    def precompute_total(self) -> int:
        return sum(self.precompute.values()) if self.precompute else 0

    def describe(self) -> str:
        def line(parts):
            return ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
        text = f"training: {line(self.parts)} = {self.training / GIB:.1f} GiB"
        if self.precompute:
            text += (f"; before it, the frozen model's targets: {line(self.precompute)} = "
                     f"{self.precompute_total / GIB:.1f} GiB")
        return text


def estimate(size: ModelSize, cfg, device_type: str = "cuda", with_frozen: bool | None = None, with_aug: bool = False,
             precision: str | None = None, phase: int = 2) -> Estimate:
    """Peak bytes of a run of TrainConfig ``cfg`` up to training step ``phase`` (steady state: optimizer state
    allocated): the larger of the training step's and, with ``cfg.precompute_targets``, the target
    precomputation's (the frozen copy then leaves before training; without it, it stays in the training peak).

    ``precision``: the resolved autocast precision (default: ``cfg.mixed_precision``, ``auto`` read as bf16 on
    CUDA and none elsewhere); ``with_frozen``: default from the mode (L_ICA, or L_AUG with pairs).
    """
    if with_frozen is None:
        with_frozen = "ica" in cfg.losses or ("aug" in cfg.losses and with_aug)
    if precision is None:
        precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("bf16" if device_type == "cuda" else "no")
    ckpt = bool(cfg.gradient_checkpointing)
    te_trained = phase == 2 and cfg.train_text_encoder
    unet_trained = phase == 2
    trained = (size.unet if unet_trained else 0) + (size.text_encoder if te_trained else size.token_table)
    weights = 4 * (size.unet + size.text_encoder)
    if device_type == "cpu":  # on a GPU the VAE leaves the device once the reference is encoded
        weights += 4 * size.vae
    frozen_name = cfg.frozen_dtype if cfg.frozen_dtype != "auto" else ("fp16" if device_type == "cuda" else "fp32")
    frozen = DTYPE_BYTES[frozen_name] * size.frozen_unet if with_frozen else 0
    if cfg.optimizer == "adamw":
        state = 8 * trained
    elif cfg.optimizer == "adamw8bit":
        state = 2 * trained
    else:
        fac_te = size.adafactor_te if te_trained else size.token_table // 1000  # the factored token table
        state = 4 * ((size.adafactor_unet if unet_trained else 0) + fac_te)
    latent_px = (cfg.resolution // 8) ** 2
    act = ACT_PER_LATENT_PX[ckpt] * latent_px
    copies = 0.0
    if precision in ("fp16", "bf16"):
        act *= AMP_ACT_FACTOR[ckpt]
        copies = AMP_WEIGHT_COPY[ckpt] * (size.unet + size.text_encoder)
    if with_aug:
        act *= AUG_ACT_FACTOR
    act += copies
    if cfg.fused_backward_step:
        grads = 4 * size.largest * 3  # one gradient at a time, plus the on-device skip's copy of it and its state
        temp = 0
    else:
        grads = 4 * trained
        # CUDA's default foreach AdamW holds a second copy of the weights; the trainer uses fused AdamW on CUDA (and,
        # since it has the kernel, the CPU, where the figures below were measured unfused: they err high there)
        temp = 4 * size.largest * 3
    peak_act = max(act + grads / 2, grads)
    released = device_type == "cpu" and cfg.fused_backward_step
    overhead = OVERHEAD_GIB["cpu_released" if released else device_type if device_type in OVERHEAD_GIB else "cpu"] * GIB
    precomputed = bool(frozen) and getattr(cfg, "precompute_targets", True)
    parts = {"weights": weights, "frozen": 0 if precomputed else frozen, "optimizer": state,
             "activations+grads": peak_act, "temporaries": temp, "overhead": overhead}
    parts = {k: int(v) for k, v in parts.items()}
    pre = None
    if precomputed:  # counted with the trained model's weights on the device (as a library caller may have them)
        pre = {k: int(v) for k, v in {"weights": weights, "frozen": frozen,
                                       "activations": NOGRAD_ACT_PER_LATENT_PX * latent_px, "overhead": overhead}.items()}
    return Estimate(parts, max(sum(parts.values()), sum(pre.values()) if pre else 0), pre)


# Memory presets: settings of the existing switches, largest first.
PRESETS: dict[str, dict] = {
    "24 GB (paper)": dict(gradient_checkpointing=False, optimizer="adamw", fused_backward_step=False,
                          train_text_encoder=True),
    "12 GB": dict(gradient_checkpointing=True, optimizer="adafactor", fused_backward_step=True, train_text_encoder=True),
    "8 GB": dict(gradient_checkpointing=True, optimizer="adafactor", fused_backward_step=True, train_text_encoder=False,
                 frozen_dtype="fp16"),
}
PRESET_CHOICES = ("auto", "custom", *PRESETS)


def apply_preset(cfg, name: str):
    """``cfg`` with the preset's switches (``custom``: unchanged)."""
    if name == "custom":
        return cfg
    if name not in PRESETS:
        raise ValueError(f"Unknown memory preset {name!r}; choose one of {', '.join(PRESET_CHOICES)}.")
    return replace(cfg, **PRESETS[name])


def scaled_size(unet_params: int, text_encoder_params: int, vae_params: int) -> ModelSize:
    """A ModelSize from bare parameter counts (e.g. ComfyUI's native modules): the nearest family, scaled."""
    base = FAMILIES["sd21" if text_encoder_params > 200_000_000 else "sd15"]
    u, t = unet_params / base.unet, text_encoder_params / base.text_encoder
    return ModelSize(unet=unet_params, text_encoder=text_encoder_params, vae=vae_params,
                     token_table=round(base.token_table * t), frozen_unet=round(base.frozen_unet * u),
                     adafactor_unet=round(base.adafactor_unet * u), adafactor_te=round(base.adafactor_te * t),
                     largest=max(base.largest, round(base.token_table * t)))


def fitting(size: ModelSize, cfg, free_bytes: int, **kw) -> list[str]:
    """The presets whose estimate fits ``free_bytes``, largest first."""
    return [n for n in PRESETS if estimate(size, apply_preset(cfg, n), **kw).total <= free_bytes]


def preflight(size: ModelSize, cfg, preset: str, free_bytes: int | None, **kw):
    """``(cfg to train with, estimate, message)`` for ``preset`` on a device with ``free_bytes`` free, or a
    DynASynError, raised before any work, naming the presets / switches that would fit.

    ``auto`` takes the largest preset that fits (without a free-memory figure, e.g. on a CPU: the switches as set).
    """
    from .errors import DynASynError

    if preset not in PRESET_CHOICES:
        raise DynASynError(f"Unknown memory preset {preset!r}; choose one of {', '.join(PRESET_CHOICES)}.")
    if free_bytes is None:
        chosen = cfg if preset == "auto" else apply_preset(cfg, preset)
        est = estimate(size, chosen, **kw)
        return chosen, est, f"estimated peak {est.gib:.1f} GiB"
    fits = fitting(size, cfg, free_bytes, **kw)
    if preset == "auto":
        preset_used = fits[0] if fits else None
        chosen = apply_preset(cfg, preset_used) if preset_used else apply_preset(cfg, list(PRESETS)[-1])
    else:
        preset_used, chosen = preset, apply_preset(cfg, preset)
    est = estimate(size, chosen, **kw)
    free = free_bytes / GIB
    if est.total > free_bytes:
        smaller = [dict(resolution=r) for r in (448, 384) if r < cfg.resolution]
        hints = [f"memory_preset '{n}' ({estimate(size, apply_preset(cfg, n), **kw).gib:.1f} GiB)" for n in fits]
        if est.parts["frozen"]:  # the frozen copy kept through training
            pre = estimate(size, replace(chosen, precompute_targets=True), **kw)
            if pre.total <= free_bytes:
                hints.append(f"precompute_targets on (the frozen copy freed before training: {pre.gib:.1f} GiB)")
        if est.precompute and est.precompute_total > free_bytes and chosen.frozen_dtype not in ("fp16", "bf16"):
            half = estimate(size, replace(chosen, frozen_dtype="fp16"), **kw)
            if half.total <= free_bytes:
                hints.append(f"frozen_dtype fp16 (the frozen copy that computes the targets before training: "
                             f"{half.gib:.1f} GiB)")
        without = estimate(size, chosen, **{**kw, "with_frozen": False})
        if without.total < est.total and without.total <= free_bytes:
            hints.append("a mode without the frozen base model (break_a_scene, dynasyn_md, dynasyn_act without a "
                         f"dataset: {without.gib:.1f} GiB)")
        for change in smaller:
            low = replace(chosen, **change)
            if estimate(size, low, **kw).total <= free_bytes:
                hints.append(f"resolution {change['resolution']} ({estimate(size, low, **kw).gib:.1f} GiB)")
                break
        raise DynASynError(
            f"This training needs about {est.gib:.1f} GiB ({est.describe()}) but the device has {free:.1f} GiB free"
            f" (memory preset '{preset if preset != 'auto' else 'auto: ' + (preset_used or 'none fits')}'). "
            + ("What would fit: " + "; ".join(hints) + "." if hints else
               "No memory preset fits this card: close other programs using the GPU, lower the resolution, or train "
               "on a larger card.") + " The figures are estimates.")
    return chosen, est, (f"memory preset {preset_used or 'custom'}: estimated peak {est.gib:.1f} GiB of {free:.1f} GiB free")


CARD_GIB = (8, 12, 16, 24)
CARD_RESERVE_GIB = 0.5  # what the driver, the display and ComfyUI itself keep on a card


def vram_table(families=(("SD 1.5", "sd15"), ("SD 2.1 (-base, 512 px)", "sd21"))) -> str:
    """The README's table of estimated peaks per memory preset and card (``python -m dynasyn.memory``)."""
    from .train import TrainConfig

    head = ("| model | memory preset | est. GiB, reference only | est. GiB, + augmented pairs | "
            + " | ".join(f"{c} GB card" for c in CARD_GIB) + " |")
    rows = [head, "|" + "---|" * (4 + len(CARD_GIB))]
    for label, fam in families:
        for preset in PRESETS:
            cfg = apply_preset(TrainConfig(mixed_precision="bf16"), preset)
            ref, aug = (estimate(FAMILIES[fam], cfg, with_aug=a).gib for a in (False, True))
            fits = ["yes" if aug <= c - CARD_RESERVE_GIB else "ref. only" if ref <= c - CARD_RESERVE_GIB else "no"
                    for c in CARD_GIB]
            rows.append(f"| {label} | {preset} | {ref:.1f} | {aug:.1f} | " + " | ".join(fits) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(vram_table())
