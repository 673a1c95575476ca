"""The DynASyn trainer: placeholder tokens, then tokens + full UNet + text encoder.

    L = λ_MD·L_MD + λ_M2A·L_M2A + λ_ICA·L_ICA + λ_AUG·L_AUG          (paper, Eq. 5)

Phase 1 trains only the placeholder embeddings (Break-a-Scene: lr 5e-4, 400 steps); phase 2 trains
the embeddings, every UNet weight and the text encoder (lr 2e-6, 400 steps) with a fresh
optimizer. The same loop runs the baselines and ablations (``MODES``) so the paper's Tables 1
and 3 can be reproduced: TI / DB (+mask) with one subject per step, Break-a-Scene and DreamBooth with
their class-prior preservation (``prior.py``), Table 3's rows MD (L_MD + L_M2A), + App, + Act, Eq. 5. Progress goes to a callback; ``should_stop`` lets a caller cancel, after
which a resumable state is saved.

Every random draw of a step (subset, flip, augmented pair, class image, latent noise, noise, timestep)
comes from the seeded streams in a fixed order and depends on nothing the training computes. So the
frozen base model's targets of L_ICA / L_AUG (its class-prompt maps) are computed for every step before
training, from copies of the streams, and the frozen copy is freed before the first step
(``precompute_targets``): the same losses, without the frozen model in the training peak.

Nothing lost: ``train(state_dir)`` writes a versioned state (``state.py``) every ``save_every`` steps, on
Cancel, and on any error that escapes a step, as the state of the last completed step (a failed step's
draws are undone); never after an update that was only partly applied.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .attention import (AttentionStore, capture_layers, install_attention_capture, last_layer, map_side, remove_attention_capture,
                        run_until_last_capture, token_maps)
from .devices import (PRECISIONS, cuda_capability, enable_gradient_checkpointing, is_out_of_memory, noise_generator,
                      release_freed_host_memory, resolve_mixed_precision)
from .distributed import Distributed
from .dataset import AugmentedPair, augmented_prompt_pair
from .errors import DynASynError
from .losses import (augmentation_loss, inter_cross_attention_loss, masked_attention_loss, masked_diffusion_loss,
                     resize_masks, union_mask, union_sample)
from .models import SDComponents
from .state import (MARKER as MARKER_NAME, StateNotSaved, check_fingerprint, input_fingerprint, is_owned, read_pointer,
                    sweep, version_folder, write_version)
from .optim import FusedBackwardOptimizer, make_optimizer
from .subjects import (DEFAULT_TEMPLATE, Subject, add_placeholder_tokens, make_prompt_pair, placeholder_tokens,
                       token_positions, validate_subjects)

class ModeSpec(NamedTuple):
    """What a mode trains: loss terms, phases, which subjects each step shows, class-prior default."""
    losses: frozenset
    phases: tuple[int, ...]
    subsets: str            # "union": a random non-empty subset per step (Break-a-Scene); "single": one subject
    prior: bool             # default of ``prior_preservation`` (class images from the base model, unmasked MSE)
    source: str


_EQ5 = frozenset({"md", "m2a", "ica", "aug"})
# Table 1 baselines, Eq. 5 (= Table 1's DynASyn = Table 3's last row), and Table 3's ablation rows. The paper's
# "Masked Diffusion" section defines L_MD *and* L_M2A as the base every row starts from (Table 3 "MD"); "App" adds
# the appearance alignment L_ICA (Fig. 2 (a)), "Act" the action alignment on augmented pairs L_AUG (Fig. 2 (b), (c)).
MODES: dict[str, ModeSpec] = {
    "textual_inversion": ModeSpec(frozenset({"md"}), (1,), "single", False,
                                  "paper's TI (+mask): one subject per step, embeddings only"),
    "dreambooth": ModeSpec(frozenset({"md"}), (2,), "single", True,
                           "paper's DB (+mask): one subject per step, tokens + UNet + text encoder; DreamBooth's prior"),
    "break_a_scene": ModeSpec(frozenset({"md", "m2a"}), (1, 2), "union", True,
                              "Break-a-Scene's train.py defaults, run 'without modification' (paper)"),
    "dynasyn": ModeSpec(_EQ5, (1, 2), "union", False, "paper Eq. 5; Table 1 DynASyn = Table 3 MD+App+Act"),
    "dynasyn_md": ModeSpec(frozenset({"md", "m2a"}), (1, 2), "union", False, "paper Table 3 row MD (L_MD + L_M2A)"),
    "dynasyn_app": ModeSpec(frozenset({"md", "m2a", "ica"}), (1, 2), "union", False, "paper Table 3 row MD + App (L_ICA)"),
    "dynasyn_act": ModeSpec(frozenset({"md", "m2a", "aug"}), (1, 2), "union", False, "paper Table 3 row MD + Act (L_AUG)"),
}
TERM_NAMES = {"md": "L_MD", "m2a": "L_M2A", "ica": "L_ICA", "aug": "L_AUG"}


def describe_mode(mode: str) -> str:
    """One line per mode for --help, tooltips and the README: terms, phases, subsets, prior, source."""
    m = MODES[mode]
    terms = " + ".join(TERM_NAMES[t] for t in ("md", "m2a", "ica", "aug") if t in m.losses)
    phases = {(1,): "phase 1 only (embeddings)", (2,): "phase 2 only (tokens + UNet + text encoder)",
              (1, 2): "phases 1 + 2"}[m.phases]
    subsets = "one subject per step" if m.subsets == "single" else "union sampling"
    return f"{mode}: {terms}; {phases}; {subsets}; prior preservation {'on' if m.prior else 'off'} ({m.source})"


@dataclass
class TrainConfig:
    mode: str = "dynasyn"
    phase1_steps: int = 400
    phase2_steps: int = 400
    phase1_lr: float = 5e-4
    phase2_lr: float = 2e-6
    lambda_md: float = 1.0
    lambda_m2a: float = 1e-2        # Break-a-Scene's lambda_attention
    lambda_ica: float = 1e-2
    lambda_aug: float = 1e-2
    seed: int = 0
    resolution: int = 512
    attention_resolution: int = 16
    template: str = DEFAULT_TEMPLATE
    flip_p: float = 0.5
    train_text_encoder: bool = True
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"   # auto (bf16 on Ampere+, fp16 + loss scaling on older cards, none on CPU) | no | fp16 | bf16
    optimizer: str = "adamw"        # adamw | adamw8bit | adafactor
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    frozen_dtype: str = "auto"      # auto = fp16 on GPU, bf16 on CPUs with native bf16, else fp32 | fp16 | bf16 | fp32
    fused_backward_step: bool = False  # optimizer step inside backward: no full set of gradients in memory
    # Class-prior preservation (DreamBooth / Break-a-Scene): None = the mode's default (on for break_a_scene and
    # dreambooth, off for dynasyn, whose L_ICA / L_AUG are its class prior). Break-a-Scene's defaults.
    prior_preservation: bool | None = None
    class_prompt: str = "a photo at the beach"
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_image_steps: int = 50     # DDIM steps per class image (Break-a-Scene: the pipeline default, 50)
    class_guidance_scale: float = 7.5
    aspect: str = "crop"            # non-square pictures: crop (centre square, masks alike) | pad
    # train(state_dir) also writes its resumable state every N completed steps (0: only on Cancel or an error)
    save_every: int = 0
    # the frozen model's L_ICA / L_AUG targets for every step before training, then the frozen copy freed (the
    # same losses, bit for bit); False: computed at each step, the frozen copy kept through training
    precompute_targets: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise DynASynError(f"Unknown mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.resolution % 64 != 0 or self.resolution < 64:
            raise DynASynError(f"Resolution {self.resolution} must be a multiple of 64 (e.g. 512 or 768).")
        if self.optimizer not in ("adamw", "adamw8bit", "adafactor"):
            raise DynASynError(f"Unknown optimizer {self.optimizer!r}; choose adamw, adamw8bit or adafactor.")
        if self.mixed_precision not in PRECISIONS:
            raise DynASynError(f"Unknown mixed_precision {self.mixed_precision!r}; choose one of {', '.join(PRECISIONS)}.")
        if self.frozen_dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise DynASynError(f"Unknown frozen_dtype {self.frozen_dtype!r}; choose auto, fp16, bf16 or fp32.")
        if self.aspect not in ("crop", "pad"):
            raise DynASynError(f"Unknown aspect {self.aspect!r}; choose crop (centre square) or pad.")
        if self.save_every < 0:
            raise DynASynError(f"save_every must be 0 (off) or a number of steps; got {self.save_every}.")
        if self.use_prior and (self.num_class_images < 1 or not self.class_prompt.strip()):
            raise DynASynError("Prior preservation needs num_class_images >= 1 and a class_prompt "
                               "(Break-a-Scene: 100 images of 'a photo at the beach').")

    @property
    def losses(self) -> frozenset:
        return MODES[self.mode].losses

    @property
    def phases(self) -> tuple[int, ...]:
        return MODES[self.mode].phases

    @property
    def subsets(self) -> str:
        return MODES[self.mode].subsets

    @property
    def use_prior(self) -> bool:
        return MODES[self.mode].prior if self.prior_preservation is None else bool(self.prior_preservation)

    @property
    def total_steps(self) -> int:
        return sum(self.steps_in(p) for p in self.phases)

    def steps_in(self, phase: int) -> int:
        if self.phases == (1,):
            return self.phase1_steps + self.phase2_steps if phase == 1 else 0
        if self.phases == (2,):
            return self.phase1_steps + self.phase2_steps if phase == 2 else 0
        return self.phase1_steps if phase == 1 else self.phase2_steps


@dataclass
class StepLog:
    step: int
    phase: int
    loss: float
    terms: dict
    lr: float
    subjects: list


class Cancelled(Exception):
    """Training was stopped by ``should_stop``; ``state_dir`` holds a resumable state."""

    def __init__(self, step: int, state_dir: Path | None):
        super().__init__(f"Training cancelled at step {step}" + (f"; resumable state in {state_dir}" if state_dir else ""))
        self.step, self.state_dir = step, state_dir


class NonFiniteLoss(DynASynError):
    pass


class OutOfMemory(DynASynError):
    pass


class _Draws(NamedTuple):
    """One step's random draws. Python stream: subset, flip, augmented pair, class image; torch stream: the
    reference's (latent sample, noise, timestep), then the pair's, then the class image's."""
    subset: list
    flip: bool
    ref: tuple
    aug: tuple | None       # (pair index, (latent sample, noise, timestep))
    prior: tuple | None     # (class image index, (latent sample, noise, timestep))


MEMORY_ADVICE = ("turn on gradient_checkpointing, use mixed_precision fp16/bf16, optimizer adamw8bit or adafactor, "
                 "train_text_encoder off, or a lower resolution")


@dataclass
class TrainResult:
    components: SDComponents
    subjects: list[Subject]
    history: list[StepLog] = field(default_factory=list)
    aug_used: bool = False


def _image_to_tensor(image: torch.Tensor) -> torch.Tensor:
    """[H, W, 3] in [0, 1] -> [1, 3, H, W] in [-1, 1]."""
    return image.permute(2, 0, 1)[None].float() * 2 - 1


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Pictures: antialiased bilinear (no aliasing when shrinking a large photo); masks: nearest (stay 0/1)."""
    kw = {"align_corners": False, "antialias": True} if mode == "bilinear" else {}
    return F.interpolate(x, size=(size, size), mode=mode, **kw)


PAD_VALUE = 0.5  # grey; padding lies outside every mask, so no loss term sees it


def to_square(image: torch.Tensor, masks: torch.Tensor, aspect: str) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """``[H, W, 3]`` picture and ``[N, H, W]`` masks made square alike: the centre square (``crop``) or the picture
    padded to its longer side (``pad``). Returns them and a sentence saying what was done (None if square)."""
    h, w = image.shape[:2]
    if h == w:
        return image, masks, None
    if aspect == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return (image[top:top + s, left:left + s], masks[:, top:top + s, left:left + s],
                f"the {w}x{h} picture is not square: trained on its centre {s}x{s} square, masks cropped alike "
                f"(aspect 'pad' keeps the whole picture)")
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    square = torch.full((s, s, image.shape[-1]), PAD_VALUE, dtype=image.dtype)
    square[top:top + h, left:left + w] = image
    padded = torch.zeros((masks.shape[0], s, s), dtype=masks.dtype)
    padded[:, top:top + h, left:left + w] = masks
    return square, padded, (f"the {w}x{h} picture is not square: padded to {s}x{s} with grey (outside every mask), "
                            f"masks alike")


MAX_CACHED_PROMPTS = 512  # class prompts precomputed instead of keeping a frozen text encoder (N <= 5 subjects)


def truncate_after(unet, layer: str) -> None:
    """Drop the up blocks after the one holding ``layer`` and the output head: a UNet stopped at ``layer``
    (``run_until_last_capture``) never reaches them, so a frozen copy need not hold their weights."""
    parts = layer.split(".")
    if parts[0] != "up_blocks":
        return
    keep = int(parts[1]) + 1
    unet.up_blocks = torch.nn.ModuleList(list(unet.up_blocks)[:keep])
    unet.conv_norm_out, unet.conv_act, unet.conv_out = None, None, torch.nn.Identity()


def frozen_copy(model, device, dtype: torch.dtype, after: str | None = None):
    """A frozen copy of ``model`` (a UNet truncated ``after`` a layer: ``truncate_after``), its tensors made
    directly in ``dtype`` on ``device``: the full-precision, untruncated copy that ``deepcopy`` then ``.to``
    would make first (the model's size again, on whichever device holds it) never exists."""
    tensors = list(model.parameters()) + list(model.buffers())
    copy_ = copy.deepcopy(model, memo={id(t): t for t in tensors})  # the modules copied, their tensors still shared
    if after is not None:
        truncate_after(copy_, after)
    for module in copy_.modules():
        for name, p in module._parameters.items():
            if p is not None:  # a tensor of its own (copy=True: never the live, trained one's storage)
                module._parameters[name] = torch.nn.Parameter(p.detach().to(device, dtype, copy=True), requires_grad=False)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.detach().to(device, dtype if b.is_floating_point() else b.dtype, copy=True)
    return copy_.eval()


def _fast_cpu_bf16() -> bool:
    """CPUs without native bf16 (no AVX512-BF16 / AMX) run bf16 UNets several times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class DynASynTrainer:
    """Trains ``comps`` in place on one reference image (+ optional augmented pairs)."""

    def __init__(self, comps: SDComponents, image: torch.Tensor, masks: Sequence[torch.Tensor], class_nouns: Sequence[str],
                 config: TrainConfig, augmented: Sequence[AugmentedPair] = (), device: str | torch.device | None = None,
                 callback: Callable[[StepLog], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 log: Callable[[str], None] = print, accelerator=None, class_image_dir: str | os.PathLike | None = None):
        self.dist = Distributed(accelerator)
        self.c, self.cfg, self.callback, self.should_stop = comps, config, callback, should_stop
        # (done, total) while train() precomputes the frozen model's targets (minutes on a large model): a caller's
        # progress bar for that wait
        self.target_progress: Callable[[int, int], None] | None = None
        self.log = log if self.dist.is_main else (lambda _msg: None)
        masks = [torch.as_tensor(m).float() for m in masks]
        validate_subjects(tuple(image.shape[:2]), masks, class_nouns)
        self.device = self.dist.device(device)
        if self.device.type == "cpu" and config.fused_backward_step and release_freed_host_memory():
            # the low-memory setting on the CPU: freed per-tensor temporaries go back to the OS, not heap holes
            self.log("[DynASyn] fused_backward_step on the CPU: freed blocks over 128 KiB go back to the OS.")
        tokens = placeholder_tokens(len(masks))
        self.subjects = [Subject(m, n.strip(), t) for m, n, t in zip(masks, class_nouns, tokens)]
        self.token_ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, tokens, [s.class_noun for s in self.subjects])
        # what this run starts from (base weights, before any step): a resume must match it
        self.fingerprint = input_fingerprint([comps.unet, comps.text_encoder], image, masks, class_nouns, config)
        for pair in augmented:
            pair.validate(len(self.subjects), [s.class_noun for s in self.subjects])
        self.augmented = list(augmented)
        # c_a / ĉ_a and their token positions from each pair's template markers (refuses pairs that do not line up)
        self.aug_prompts = [augmented_prompt_pair(comps.tokenizer, p, [s.class_noun for s in self.subjects], tokens)
                            for p in self.augmented]
        if "aug" in config.losses and not self.augmented:
            self.log("[DynASyn] no augmented pairs given: training without L_AUG.")
        self.use_aug = "aug" in config.losses and bool(self.augmented)
        self.class_image_dir = class_image_dir
        self.class_dists = None  # VAE latents of the prior-preservation class images, made at the first phase-2 step
        if config.use_prior:  # identifies the class-image cache; taken now, from the base weights (also when resuming)
            from .prior import model_fingerprint
            self.base_fingerprint = model_fingerprint(comps)
        if config.use_prior and 2 not in config.phases:
            self.log(f"[DynASyn] prior preservation has no effect in {config.mode}: only phase 2 trains weights the "
                     "class prompt uses.")
        self.latent_size = config.resolution // comps.vae_scale_factor
        # each process draws its own subsets, flips, noise and timesteps; process 0 is the single-process run
        self.rng = random.Random(config.seed + self.dist.rank)
        self.gen = noise_generator(self.device, config.seed + self.dist.rank)
        self.precision, note = resolve_mixed_precision(config.mixed_precision, self.device, cuda_capability(self.device),
                                                       config.fused_backward_step)
        if note:
            self.log(f"[DynASyn] {note}")
        self.scaler = None  # torch.amp.GradScaler under fp16
        if self.dist.active:
            self.log(f"[DynASyn] data parallel on {self.dist.world} processes (gradients averaged every step).")
        self.step = 0
        self.history: list[StepLog] = []
        self.frozen = None
        self.targets: dict[int, tuple] = {}  # step -> (its draws' key, (L_ICA class maps, L_AUG class maps))
        self.half_applied: int | None = None  # a step whose update an error cut short: no state to save from here
        self._applying = False
        self._last_saved: tuple[Path, int] | None = None
        self.class_hidden: dict[str, torch.Tensor] = {}  # frozen base encodings of the class prompts
        self.optimizer = None
        self.phase = None
        self.store = AttentionStore()
        self.capture = capture_layers(comps.unet, self.latent_size, config.attention_resolution)
        self.map_side = map_side(comps.unet, self.latent_size, config.attention_resolution)
        install_attention_capture(comps.unet, self.store, self.capture)
        self._prepare_data(image)
        self._make_frozen()  # from the base weights, before any step (also when resuming)

    # ------------------------------------------------------------------ data
    def _prepare_data(self, image: torch.Tensor) -> None:
        """VAE-encode the reference (and its mirror) once; the VAE is frozen, only the noise changes."""
        c, r = self.c, self.cfg.resolution
        vae = c.vae.to(self.device)
        image, masks, note = to_square(image, torch.stack([s.mask for s in self.subjects]), self.cfg.aspect)
        if note:
            self.log(f"[DynASyn] {note}; resized to {r}x{r} (antialiased).")
            for s, kept in zip(self.subjects, masks):
                lost = 1 - float((kept > 0.5).sum()) / max(float((s.mask > 0.5).sum()), 1.0)
                if lost > 0.01:
                    self.log(f"[DynASyn] the crop cuts off {lost:.0%} of {s.token} ({s.class_noun}).")
        pix = _resize(_image_to_tensor(image), r, "bilinear").to(self.device)
        ref_masks = _resize(masks[:, None].float(), r, "nearest")[:, 0]      # [N, r, r]
        self._check_masks_survive(ref_masks, cropped=note is not None and self.cfg.aspect == "crop")  # on the host, once
        self.ref_masks = ref_masks.to(self.device)
        with torch.no_grad():
            self.ref_dist = [vae.encode(p.to(vae.dtype)).latent_dist for p in (pix, pix.flip(-1))]
        self.aug_latents, self.aug_masks = [], []
        for pair in self.augmented:
            aimage, amasks, _ = to_square(pair.image, pair.masks.float(), self.cfg.aspect)
            self.aug_masks.append(_resize(amasks[:, None], r, "nearest")[:, 0].to(self.device))
            apix = _resize(_image_to_tensor(aimage), r, "bilinear").to(self.device)
            with torch.no_grad():
                dist = vae.encode(apix.to(vae.dtype)).latent_dist
            self.aug_latents.append(dist)
        if self.device.type not in ("cpu", "meta"):
            c.vae.to("cpu")  # only needed for these encodings: its weights leave the device

    def _check_masks_survive(self, ref_masks: torch.Tensor, cropped: bool) -> None:
        """Refuse a subject whose mask vanishes where its loss terms look: at the attention maps (L_M2A, L_ICA)
        or the latent (L_MD), as the losses resize it (nearest), in both flips."""
        attention = bool({"m2a", "ica"} & self.cfg.losses)
        side = self.map_side if attention else self.latent_size
        where = f"{side}x{side} attention maps" if attention else f"{side}x{side} latent"
        for i, s in enumerate(self.subjects):
            for m in (ref_masks[i], ref_masks[i].flip(-1)):
                if resize_masks(m[None], side).sum() == 0:
                    share = float((ref_masks[i] > 0.5).float().mean())
                    hint = (" The centre crop of the non-square picture cut it off; use aspect 'pad'." if cropped and
                            share == 0 else f" Crop the picture closer to the {s.class_noun} or draw a larger mask.")
                    raise DynASynError(
                        f"Subject {i + 1} ({s.class_noun}) vanishes at the {where}: its mask covers {share:.2%} of the "
                        f"training picture, less than one cell (1/{side * side}), so its loss terms would train on "
                        f"nothing.{hint}")

    def _draw_noise(self, gen: torch.Generator) -> tuple:
        """A latent sample's noise, the diffusion noise and a timestep (every latent has the reference's shape)."""
        shape = self.ref_dist[0].mean.shape
        sample = torch.randn(shape, generator=gen, device=gen.device)
        noise = torch.randn(shape, generator=gen, device=gen.device)
        t = torch.randint(0, self.c.noise_scheduler.config.num_train_timesteps, (1,), generator=gen, device=gen.device)
        return sample, noise, t

    def _noised(self, dist, draw: tuple):
        """``(z_t, t, target)`` of a VAE latent distribution for drawn noise: target is ε, or v for v-prediction."""
        sample, noise, t = draw
        sched = self.c.noise_scheduler
        latents = (dist.mean + dist.std * sample.to(self.device, dist.mean.dtype)) * self.c.scaling_factor
        noise, t = noise.to(self.device, latents.dtype), t.to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return noisy, t, target

    # ------------------------------------------------------------------ models
    def _frozen_dtype(self) -> torch.dtype:
        name = self.cfg.frozen_dtype
        if name == "auto":
            name = "fp16" if self.device.type == "cuda" else "bf16" if _fast_cpu_bf16() else "fp32"
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]

    def _make_frozen(self) -> None:
        """The frozen base model for the class-prompt maps (L_ICA, L_AUG), in ``frozen_dtype``.

        Memory: the UNet copy loses everything after its last 16x16 cross-attention layer (it never
        runs further), and when the class prompts are few enough (every ordered subject subset and
        every augmented prompt, <= ``MAX_CACHED_PROMPTS``) their base-model text encodings are
        computed once here instead of keeping a text-encoder copy.
        """
        if self.frozen is not None or not ("ica" in self.cfg.losses or self.use_aug):
            return
        dtype = self._frozen_dtype()
        unet = frozen_copy(self.c.unet, self.device, dtype, after=last_layer(self.capture))
        prompts = self._class_prompts()
        te = None
        if prompts is None:
            te = frozen_copy(self.c.text_encoder, self.device, dtype)
        else:
            te_live = self.c.text_encoder.to(self.device)
            with torch.no_grad():  # the live encoder still holds the base weights here (also when resuming)
                self.class_hidden = {p: self._encode(te_live, p).to(dtype) for p in prompts}
        store = AttentionStore()
        install_attention_capture(unet, store, self.capture)
        self.frozen = (unet, te, store)

    def _class_prompts(self) -> list[str] | None:
        """Every class prompt training can ask for, or None when there are too many to precompute."""
        n = len(self.subjects)
        ordered = sum(math.perm(n, k) for k in range(1, n + 1))
        if ordered + len(self.augmented) > MAX_CACHED_PROMPTS:
            return None
        subsets = [list(p) for k in range(1, n + 1) for p in itertools.permutations(range(n), k)]
        prompts = [make_prompt_pair(self.c.tokenizer, self.subjects, s, self.cfg.template).class_prompt for s in subsets]
        return sorted(set(prompts) | {pair.class_prompt for pair in self.augmented})

    def _setup_phase(self, phase: int) -> None:
        c, cfg = self.c, self.cfg
        self.phase = phase
        c.unet.to(self.device).train()
        c.text_encoder.to(self.device).train()
        c.vae.requires_grad_(False)
        if phase == 1:
            c.unet.requires_grad_(False)
            c.text_encoder.requires_grad_(False)
            emb = c.text_encoder.get_input_embeddings()
            emb.weight.requires_grad_(True)
            params = [emb.weight]
            self.orig_embeddings = emb.weight.detach().clone()
            lr = cfg.phase1_lr
        else:
            c.unet.requires_grad_(True)
            c.text_encoder.requires_grad_(cfg.train_text_encoder)
            c.text_encoder.get_input_embeddings().weight.requires_grad_(True)
            params = [p for p in list(c.unet.parameters()) + list(c.text_encoder.parameters()) if p.requires_grad]
            lr = cfg.phase2_lr
        if cfg.gradient_checkpointing:  # phase 1 too: its backward runs through the whole UNet as well
            enable_gradient_checkpointing(c.unet, c.text_encoder)
        self.params = params
        self.optimizer = self._make_optimizer(params, lr)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def _make_optimizer(self, params, lr):
        if isinstance(self.optimizer, FusedBackwardOptimizer):
            self.optimizer.remove()
        if self.cfg.fused_backward_step:
            if self.dist.active:
                raise DynASynError("fused_backward_step works in one process; turn it off under accelerate launch.")
            return FusedBackwardOptimizer(params, lr, self.cfg)
        return make_optimizer(params, lr, self.cfg)

    # ------------------------------------------------------------------ one step
    def _encode(self, te, prompt: str) -> torch.Tensor:
        ids = self.c.tokenizer(prompt, padding="max_length", max_length=self.c.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids.to(self.device)
        return te(ids)[0]

    def _autocast(self, enabled: bool):
        """Autocast of the trained model's forward pass (a no-op context when off: any device, ``meta`` included)."""
        if not enabled or self.precision not in ("fp16", "bf16"):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16 if self.precision == "fp16" else torch.bfloat16)

    def _maps(self, unet, te, store, prompt, noisy, t, positions, grad: bool, need_pred: bool = True, hidden=None):
        """Cross-attention maps ``[S, r, r]`` of the token ``positions`` for ``prompt`` on ``noisy``.

        Without ``need_pred`` the UNet stops after its last hooked layer (attention-only passes).
        """
        with torch.set_grad_enabled(grad), self._autocast(grad):
            dtype = next(unet.parameters()).dtype
            store.enabled = True
            hidden = self._encode(te, prompt) if hidden is None else hidden
            pred = None
            if need_pred:
                pred = unet(noisy.to(dtype), t, hidden.to(dtype)).sample
            else:
                run_until_last_capture(unet, store, noisy.to(dtype), t, hidden.to(dtype))
            store.enabled = False
            maps = token_maps(store.aggregate()[0], positions)
            store.clear()
        return maps, pred

    def _class_maps(self, prompt, noisy, t, positions) -> torch.Tensor:
        unet, te, store = self.frozen
        hidden = self.class_hidden[prompt] if te is None else None
        return self._maps(unet, te, store, prompt, noisy, t, positions, grad=False, need_pred=False, hidden=hidden)[0].float()

    def _sample_subset(self, rng: random.Random) -> list[int]:
        if self.cfg.subsets == "single":  # TI / DB (+mask): "a photo of <asset_i>" with mask M_i
            return [rng.randrange(len(self.subjects))]
        return union_sample(len(self.subjects), rng)

    def _phase_of(self, step: int) -> int:
        """The phase the loop is in when it runs step ``step + 1`` (0-based ``step``)."""
        first = 0
        for p in self.cfg.phases:
            first += self.cfg.steps_in(p)
            if step < first:
                return p
        return self.cfg.phases[-1]

    def _draw(self, rng: random.Random, gen: torch.Generator, phase: int) -> _Draws:
        """Every random draw of one step, in the streams' order; the training and the precomputed targets both
        draw through here (the targets from copies of the streams), so they see the same steps."""
        cfg = self.cfg
        subset = self._sample_subset(rng)
        flip = rng.random() < cfg.flip_p
        ref = self._draw_noise(gen)
        aug = prior = None
        if self.use_aug:
            aug = (rng.randrange(len(self.augmented)), self._draw_noise(gen))
        if cfg.use_prior and phase == 2:  # phase 1 trains only placeholder rows: no gradient from the class prompt
            prior = (rng.randrange(cfg.num_class_images), self._draw_noise(gen))
        return _Draws(subset, flip, ref, aug, prior)

    def _aug_inputs(self, aug: tuple):
        """``(k, prompts, z_t, t)`` of the augmented pair a step drew."""
        k, draw = aug
        noisy, t, _ = self._noised(self.aug_latents[k], draw)
        return k, self.aug_prompts[k], noisy, t

    def _target_key(self, d: _Draws) -> tuple:
        return tuple(d.subset), d.flip, d.aug[0] if d.aug else None, "ica" in self.cfg.losses, self.use_aug

    def _frozen_maps(self, pair, noisy, t, aug_in) -> tuple:
        """The frozen model's class-prompt maps of a step: L_ICA's (reference) and L_AUG's (its pair), or None."""
        ica = self._class_maps(pair.class_prompt, noisy, t, pair.class_positions) if "ica" in self.cfg.losses else None
        aug = None
        if aug_in is not None:
            _, prompts, anoisy, at = aug_in
            aug = self._class_maps(prompts.class_prompt, anoisy, at, prompts.class_positions)
        return ica, aug

    def _step_targets(self, d: _Draws, pair, noisy, t, aug_in) -> tuple:
        """This step's frozen-model targets: precomputed, or computed now from the frozen copy."""
        entry = self.targets.get(self.step)
        if entry is not None:
            key, maps = entry
            if key != self._target_key(d):  # the streams went elsewhere than where the targets were drawn
                raise DynASynError(f"Internal error: the precomputed targets of step {self.step + 1} were drawn for "
                                   "another step; set precompute_targets off and report this.")
            return maps
        if "ica" not in self.cfg.losses and aug_in is None:
            return None, None
        if self.frozen is None:
            raise DynASynError(f"Step {self.step + 1} has no precomputed L_ICA / L_AUG target and the frozen base model "
                               "was already freed; start a new trainer for more steps.")
        return self._frozen_maps(pair, noisy, t, aug_in)

    def precompute_targets(self, count: int | None = None, release: bool = True,
                           should_stop: Callable[[], bool] | None = None,
                           progress: Callable[[int, int], None] | None = None) -> bool:
        """The frozen model's L_ICA / L_AUG targets for the next ``count`` steps (all remaining: None), drawn from
        copies of the training streams (which are left as they are), kept on the device (a few KB per step).
        With ``release`` and every remaining step covered, the frozen copy is freed. Returns False when
        ``should_stop`` asked to stop (the targets made so far are kept). ``progress(done, len(todo))`` follows
        each frozen-model pass."""
        if self.frozen is None:
            return True
        total = self.cfg.total_steps
        end = total if count is None else min(total, self.step + count)
        todo = [s for s in range(self.step, end) if s not in self.targets]
        if todo:
            self.log(f"[DynASyn] L_ICA / L_AUG targets of steps {self.step + 1}-{end}: {len(todo)} frozen-model passes "
                     f"before training" + (", then the frozen copy is freed." if release and end == total else "."))
        started = time.perf_counter()
        rng = random.Random()
        rng.setstate(self.rng.getstate())
        gen = torch.Generator(device=self.gen.device)
        gen.set_state(self.gen.get_state())
        c, made = self.c, 0
        with torch.no_grad():
            for s in range(self.step, end):
                d = self._draw(rng, gen, self._phase_of(s))
                if s in self.targets:
                    continue
                if should_stop is not None and should_stop():
                    return False
                pair = make_prompt_pair(c.tokenizer, self.subjects, d.subset, self.cfg.template)
                noisy, t, _ = self._noised(self.ref_dist[1 if d.flip else 0], d.ref) if "ica" in self.cfg.losses else (None,) * 3
                aug_in = self._aug_inputs(d.aug) if d.aug else None
                self.targets[s] = (self._target_key(d), self._frozen_maps(pair, noisy, t, aug_in))
                made += 1
                if progress is not None:
                    progress(made, len(todo))
        if todo:
            self.log(f"[DynASyn] targets ready in {time.perf_counter() - started:.1f} s.")
        if release and end == total:
            self.frozen, self.class_hidden = None, {}  # its memory leaves the training peak
        return True

    def training_step(self) -> StepLog:
        """One step. An error before the update reaches the weights undoes the step's draws (the trainer is then
        exactly at the previous step, and saves as such); an error while the update is applied (optimizer step,
        or backward with ``fused_backward_step``) marks the trainer ``half_applied``: it saves no state."""
        streams = (self.gen.get_state(), self.rng.getstate())
        try:
            return self._training_step()
        except BaseException:
            if self._applying:
                self.half_applied = self.step + 1
            else:
                self.gen.set_state(streams[0])
                self.rng.setstate(streams[1])
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            self.store.clear()
            raise
        finally:
            self._applying = False

    def _training_step(self) -> StepLog:
        cfg, c = self.cfg, self.c
        d = self._draw(self.rng, self.gen, self.phase)
        subset = d.subset
        pair = make_prompt_pair(c.tokenizer, self.subjects, subset, cfg.template)
        masks = self.ref_masks.flip(-1) if d.flip else self.ref_masks
        noisy, t, target = self._noised(self.ref_dist[1 if d.flip else 0], d.ref)
        maps, pred = self._maps(c.unet, c.text_encoder, self.store, pair.placeholder_prompt, noisy, t,
                                pair.placeholder_positions, grad=True)
        aug_in = self._aug_inputs(d.aug) if d.aug else None
        class_maps, aug_class_maps = self._step_targets(d, pair, noisy, t, aug_in)
        terms = {}
        sel = masks[subset]
        if "md" in cfg.losses:
            terms["md"] = (cfg.lambda_md, masked_diffusion_loss(pred.float(), target.float(), union_mask(masks, subset)))
        if "m2a" in cfg.losses:
            terms["m2a"] = (cfg.lambda_m2a, masked_attention_loss(maps.float(), sel))
        if "ica" in cfg.losses:
            terms["ica"] = (cfg.lambda_ica, inter_cross_attention_loss(maps.float(), class_maps, sel))
        if self.use_aug:
            terms["aug"] = (cfg.lambda_aug, self._augmentation_term(aug_in, aug_class_maps))
        if d.prior is not None:
            terms["prior"] = (cfg.prior_loss_weight, self._prior_term(d.prior))
        loss = sum(w * v for w, v in terms.values())
        self.optimizer.zero_grad(set_to_none=True)
        fused = isinstance(self.optimizer, FusedBackwardOptimizer)
        if fused:
            self._applying = True  # each tensor is updated during backward
            bad_grads = self._fused_backward(loss)
        else:
            bad_grads = self._backward(loss)
        # one host sync per step: the loss, its terms and the gradients' check read together, after backward
        # (every process agrees on them before any stops); nothing has reached the weights unless fused
        values = self.dist.mean(torch.stack([loss.detach().float(), *(v.detach().float() for _, v in terms.values()),
                                             bad_grads.float()])).tolist()
        mean_loss, term_values, grad_check = values[0], dict(zip(terms, values[1:-1])), values[-1]
        if not math.isfinite(mean_loss):
            self._applying = False  # a non-finite loss applies nothing, fused or not
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"The loss became {mean_loss} at step {self.step + 1} "
                                f"({', '.join(f'{k}={v:.4g}' for k, v in term_values.items())}). Lower the learning "
                                "rate or use mixed_precision 'no'; the last good state was kept.")
        if fused:
            if grad_check:
                self.optimizer.zero_grad()
                raise NonFiniteLoss(f"Gradients became non-finite at step {self.step + 1}; from the first of them on, "
                                    "tensors were not updated (with fused_backward_step the others already were). Lower "
                                    "the learning rate or use mixed_precision 'no'.")
        else:
            self._step(grad_check)
        if self.phase == 1:  # only the placeholder rows may change (Break-a-Scene restores the rest)
            with torch.no_grad():
                emb = c.text_encoder.get_input_embeddings().weight
                if getattr(self, "_keep_rows", None) is None or self._keep_rows.shape[0] != emb.shape[0]:
                    keep = torch.ones(emb.shape[0], dtype=torch.bool)
                    keep[self.token_ids] = False
                    self._keep_rows = keep.to(emb.device)[:, None]
                emb.copy_(torch.where(self._keep_rows, self.orig_embeddings, emb))  # no boolean indexing: no sync
        self.targets.pop(self.step, None)
        self.step += 1
        self._applying = False
        return StepLog(self.step, self.phase, float(mean_loss), term_values,
                       self.optimizer.param_groups[0]["lr"], [self.subjects[i].token for i in subset])

    def _backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward (loss-scaled under fp16), gradients averaged and clipped; returns the gradient norm (on the device)."""
        cfg = self.cfg
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.dist.average_gradients(self.params)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        return torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))

    def _step(self, grad_norm: float) -> None:
        """The optimizer step unless the gradients are non-finite: under fp16 that is an overflow and the step is
        skipped (the loss scale shrinks); otherwise training stops with the last good weights."""
        finite = math.isfinite(grad_norm)
        if not finite and not self.scaler:  # never let a non-finite update reach the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"The gradients became {grad_norm} at step {self.step + 1}. Lower the learning "
                                "rate or use mixed_precision 'no'; the last good state was kept.")
        self._applying = True  # from here the weights, the optimizer or the loss scale change
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
            if not finite:
                self.skipped_steps = getattr(self, "skipped_steps", 0) + 1
                self.log(f"[DynASyn] fp16 gradients overflowed at step {self.step + 1}: step skipped, loss scale lowered.")

    def _fused_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Each tensor is updated by its hook during backward (no global clipping possible); returns the device flag
        of a non-finite loss or gradient."""
        self.optimizer.begin(loss)
        loss.backward()
        return self.optimizer.found_inf

    def _augmentation_term(self, aug_in: tuple | None = None, class_maps: torch.Tensor | None = None) -> torch.Tensor:
        """L_AUG on one augmented pair: attention only, no reconstruction loss. ``aug_in``: the step's pair and
        noise (``_aug_inputs``; drawn here if None); ``class_maps``: its target (from the frozen model if None)."""
        if aug_in is None:
            aug_in = self._aug_inputs((self.rng.randrange(len(self.augmented)), self._draw_noise(self.gen)))
        k, prompts, noisy, t = aug_in  # c_a, ĉ_a, positions, in the order of the pair's masks
        maps, _ = self._maps(self.c.unet, self.c.text_encoder, self.store, prompts.placeholder_prompt, noisy, t,
                             prompts.placeholder_positions, grad=True, need_pred=False)
        if class_maps is None:
            class_maps = self._class_maps(prompts.class_prompt, noisy, t, prompts.class_positions)
        pseudo = self.aug_masks[k]  # squared like the pair's picture, on the device, in the order of pair.masks
        return augmentation_loss(maps.float(), class_maps, pseudo)

    def _prepare_class_images(self) -> None:
        """Draw (or read the run's cache of) the class images with the base model, and VAE-encode them once."""
        from .prior import class_images

        cfg, c = self.cfg, self.c
        first_phase2 = sum(cfg.steps_in(p) for p in cfg.phases if p < 2)
        main_first = self.dist.active and self.class_image_dir is not None  # one process draws and writes, the others read
        if main_first and not self.dist.is_main:
            self.dist.wait()
        with torch.no_grad(), self._autocast(True):
            images = class_images(c, lambda p: self._encode(c.text_encoder, p), cfg.class_prompt, cfg.num_class_images,
                                  cfg.resolution, cfg.class_image_steps, cfg.class_guidance_scale, cfg.seed, self.device,
                                  folder=self.class_image_dir, may_generate=self.step <= first_phase2, log=self.log,
                                  model_id=self.base_fingerprint)
        if main_first and self.dist.is_main:
            self.dist.wait()
        vae = c.vae.to(self.device)
        with torch.no_grad():
            self.class_dists = [vae.encode(_image_to_tensor(im).to(self.device, vae.dtype)).latent_dist for im in images]

    def _prior_term(self, prior: tuple) -> torch.Tensor:
        """Break-a-Scene / DreamBooth prior preservation: the plain (unmasked) MSE on the class image ``prior`` drew
        (``(index, noise)``)."""
        cfg, c = self.cfg, self.c
        if self.class_dists is None:
            self._prepare_class_images()
        index, draw = prior
        noisy, t, target = self._noised(self.class_dists[index], draw)
        with self._autocast(True):
            dtype = next(c.unet.parameters()).dtype
            hidden = self._encode(c.text_encoder, cfg.class_prompt)
            pred = c.unet(noisy.to(dtype), t, hidden.to(dtype)).sample
        return F.mse_loss(pred.float(), target.float(), reduction="mean")

    # ------------------------------------------------------------------ loop
    def _stop_requested(self) -> bool:
        return self.dist.any(bool(self.should_stop and self.should_stop()), self.device)

    def train(self, state_dir: str | os.PathLike | None = None) -> TrainResult:
        """Train to ``cfg.total_steps``. With ``state_dir``: leftovers of interrupted saves are swept first, and the
        resumable state is written every ``save_every`` steps, on Cancel (``Cancelled``) and on any error escaping
        the loop (re-raised with where the state is; out of memory as ``OutOfMemory``)."""
        cfg = self.cfg
        if self.class_image_dir is None and state_dir is not None:  # the class images live with the run's state
            self.class_image_dir = Path(state_dir).parent / "class_images"
        if state_dir is not None and self.dist.is_main:
            removed = sweep(state_dir)
            if removed:
                self.log(f"[DynASyn] removed what an interrupted save left in {state_dir}: {', '.join(removed)}.")
        try:
            progress = self.target_progress if self.dist.is_main else None
            if cfg.precompute_targets and not self.precompute_targets(should_stop=self._stop_requested, progress=progress):
                raise Cancelled(self.step, self.save_state(state_dir) if state_dir else None)
            for phase in cfg.phases:
                first = sum(cfg.steps_in(p) for p in cfg.phases if p < phase)
                last = first + cfg.steps_in(phase)
                if self.step >= last:
                    continue
                if self.phase != phase:
                    self._setup_phase(phase)
                while self.step < last:
                    if self._stop_requested():
                        raise Cancelled(self.step, self.save_state(state_dir) if state_dir else None)
                    entry = self.training_step()
                    self.history.append(entry)
                    if self.callback and self.dist.is_main:
                        self.callback(entry)
                    if state_dir is not None and cfg.save_every and self.step % cfg.save_every == 0:
                        self.save_state(state_dir)
        except Cancelled:
            raise
        except BaseException as e:
            error = self._failed(e, state_dir)
            if error is e:
                raise
            raise error from (e if isinstance(error, OutOfMemory) else None)
        self._finish()
        return TrainResult(self.c, self.subjects, self.history, self.use_aug)

    def _failed(self, e: BaseException, state_dir) -> BaseException:
        """Save the state of the last completed step after an error (unless the error is the save's own, or the step
        was half applied, or other processes would wait for this one), and say where it is."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)  # an OOM's gradients go before the save copies weights
        saved, why = None, None
        if state_dir is None:
            why = "no state folder was given"
        elif isinstance(e, StateNotSaved) or e is getattr(self, "_save_error", None):
            why = "the state could not be written"
        elif self.dist.active:
            why = "the other training processes cannot join a save"
        else:
            try:
                saved = self.save_state(state_dir)
            except Exception as save_error:  # noqa: BLE001 - the training error is the one to report
                why = f"saving it failed too ({save_error})"
            if saved is None and why is None:
                why = f"step {self.half_applied} stopped while its update was being applied"
        if saved is not None:
            note = f"Resumable state of step {self.step}: {state_dir}."
        else:
            last = f" (the last saved state, step {self._last_saved[1]}, is kept)" if self._last_saved else ""
            note = f"No resumable state was saved: {why}{last}."
        self.log(f"[DynASyn] training stopped at step {self.step + 1} by {type(e).__name__}. {note}")
        if is_out_of_memory(e):  # caused by torch's error: ComfyUI's own OOM handling still sees it
            return OutOfMemory(f"Out of memory at step {self.step + 1} ({self.device.type}): {MEMORY_ADVICE}. {note}")
        if isinstance(e, NonFiniteLoss):
            return NonFiniteLoss(f"{e} {note}")
        if isinstance(e, Exception) and not isinstance(e, StateNotSaved):
            e.add_note(f"DynASyn: {note}")
        return e

    def _finish(self) -> None:
        """Drop what only training needed (gradients, optimizer state, frozen copy, hooks) before handing back."""
        if isinstance(self.optimizer, FusedBackwardOptimizer):
            self.optimizer.remove()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        self.optimizer = None
        remove_attention_capture(self.c.unet)
        self.dist.check_in_sync([self.c.unet, self.c.text_encoder])
        for m in (self.c.unet, self.c.text_encoder):
            m.eval().requires_grad_(False)
        self.frozen, self.class_hidden, self.targets = None, {}, {}

    def release(self) -> None:
        """Let go of everything training holds besides the components and the history: the callbacks (a caller's
        callback that refers back to the trainer makes a cycle only the garbage collector would free), the optimizer,
        the frozen copy, the encoded data and the attention hooks. Called when the caller is done with the trainer
        (also after Cancel or an error), so its device memory is freed when the last reference goes."""
        if isinstance(self.optimizer, FusedBackwardOptimizer):
            self.optimizer.remove()
        self.callback = self.should_stop = self.target_progress = None
        self.optimizer, self.frozen, self.class_hidden, self.params, self.targets = None, None, {}, [], {}
        self.ref_dist, self.aug_latents, self.orig_embeddings = [], [], None
        self.store.clear()
        remove_attention_capture(self.c.unet)

    def placeholder_embeddings(self) -> dict[str, torch.Tensor]:
        emb = self.c.text_encoder.get_input_embeddings().weight
        return {s.token: emb[i].detach().float().cpu().clone() for s, i in zip(self.subjects, self.token_ids)}

    # ------------------------------------------------------------------ state
    def _state_bytes(self) -> int:
        """About what a version of the state takes on disk: weights, optimizer state, the token table's copy."""
        def size(obj) -> int:
            if torch.is_tensor(obj):
                return obj.numel() * obj.element_size()
            if isinstance(obj, dict):
                return sum(size(v) for v in obj.values())
            if isinstance(obj, (list, tuple)):
                return sum(size(v) for v in obj)
            return 0
        n = size(self.c.unet.state_dict()) + size(self.c.text_encoder.state_dict())
        n += size(self.optimizer.state_dict()) if self.optimizer is not None else 0
        return n + size(getattr(self, "orig_embeddings", None)) + 2**20

    def save_state(self, folder: str | os.PathLike) -> Path | None:
        """Everything needed to resume, as a new version of the state in ``folder`` (``state.write_version``: the
        previous version stays current until this one is complete). Returns ``folder``, or None when the trainer
        holds no consistent state (a step's update was cut short: the last saved version stays).

        Called on every process (their RNG states are gathered); only the main process writes. Saving the same
        step to the same folder twice writes nothing the second time.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        if self.half_applied is not None:
            self.log(f"[DynASyn] no state saved: step {self.half_applied} stopped while its update was being applied, "
                     "so the weights are those of no step; the last saved state stays.")
            return None
        if self._last_saved == (folder.absolute(), self.step):
            return folder
        rng_states = self.dist.gather((self.gen.get_state(), self.rng.getstate()))
        if not self.dist.is_main:
            self.dist.wait()
            return folder

        def write(path: Path) -> None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.c.unet.state_dict().items()},
                      path / "unet.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.c.text_encoder.state_dict().items()},
                      path / "text_encoder.safetensors")
            # tensors, dicts, lists and RNG tuples only: load_state reads it with torch.load(weights_only=True)
            torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                        "orig_embeddings": getattr(self, "orig_embeddings", None),
                        "scaler": self.scaler.state_dict() if self.scaler else None,
                        "torch_gen": self.gen.get_state(), "python_rng": self.rng.getstate(),
                        "rng_per_process": rng_states}, path / "trainer.pt")

        meta = {"step": self.step, "phase": self.phase, "config": asdict(self.cfg),
                "tokens": [s.token for s in self.subjects], "class_nouns": [s.class_noun for s in self.subjects],
                "fingerprint": self.fingerprint, "history": [asdict(h) for h in self.history]}
        try:
            write_version(folder, meta, write, self._state_bytes())
        except BaseException as e:
            self._save_error = e  # the loop's error handler does not try a second time
            raise
        finally:
            self.dist.wait()
        self._last_saved = (folder.absolute(), self.step)
        return folder

    def load_state(self, folder: str | os.PathLike) -> None:
        """Resume from the current version of ``folder``: refused unless it is a DynASyn state of the same inputs;
        never unpickles code."""
        import pickle

        from safetensors.torch import load_file

        folder = Path(folder)
        if not is_owned(folder):
            raise DynASynError(f"{folder} is not a DynASyn training state (no {MARKER_NAME} marker); not resuming.")
        meta = read_pointer(folder)
        if meta.get("tokens") != [s.token for s in self.subjects] or meta.get("class_nouns") != [s.class_noun for s in self.subjects]:
            raise DynASynError(f"The saved state in {folder} belongs to other subjects ({meta.get('class_nouns')}).")
        check_fingerprint(meta.get("fingerprint"), self.fingerprint, folder)
        data = version_folder(folder, meta)
        try:  # weights_only: tensors and plain containers only, never code (a planted pickle is refused here)
            extra = torch.load(data / "trainer.pt", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            raise DynASynError(f"The saved state in {folder} holds something other than tensors (trainer.pt was "
                               "refused: it is never unpickled); delete the folder or turn 'resume' off.") from None
        self.c.unet.load_state_dict(load_file(data / "unet.safetensors"))
        self.c.text_encoder.load_state_dict(load_file(data / "text_encoder.safetensors"))
        self.step = meta["step"]
        self.history = [StepLog(**h) for h in meta["history"]]
        self.targets, self.half_applied, self._last_saved = {}, None, None  # targets follow the restored streams
        if meta["phase"] is not None:
            self._setup_phase(meta["phase"])
            if extra["orig_embeddings"] is not None:
                self.orig_embeddings = extra["orig_embeddings"].to(self.device)
            if extra["optimizer"] is not None:
                self.optimizer.load_state_dict(extra["optimizer"])
            if extra.get("scaler") and self.scaler is not None:
                self.scaler.load_state_dict(extra["scaler"])
        per_process = extra.get("rng_per_process") or [(extra["torch_gen"], extra["python_rng"])]
        gen_state, rng_state = per_process[self.dist.rank % len(per_process)]
        self.gen.set_state(gen_state)
        self.rng.setstate(rng_state)
