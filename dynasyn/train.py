"""The DynASyn trainer: placeholder tokens, then tokens + full UNet + text encoder.

    L = λ_MD·L_MD + λ_M2A·L_M2A + λ_ICA·L_ICA + λ_AUG·L_AUG          (paper, Eq. 5)

Phase 1 trains only the placeholder embeddings (Break-a-Scene: lr 5e-4, 400 steps); phase 2 trains
the embeddings, every UNet weight and the text encoder (lr 2e-6, 400 steps) with a fresh
optimizer. The same loop runs the baselines and ablations (``MODES``) so the paper's Tables 1
and 3 can be reproduced. Progress goes to a callback; ``should_stop`` lets a caller cancel, after
which a resumable state is saved.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .attention import (AttentionStore, capture_layers, install_attention_capture, last_layer, remove_attention_capture,
                        run_until_last_capture, token_maps)
from .distributed import Distributed
from .dataset import AugmentedPair, augmented_prompt_pair
from .errors import DynASynError
from .losses import (augmentation_loss, inter_cross_attention_loss, masked_attention_loss, masked_diffusion_loss,
                     union_mask, union_sample)
from .models import SDComponents
from .optim import FusedBackwardOptimizer, make_optimizer
from .subjects import (DEFAULT_TEMPLATE, Subject, add_placeholder_tokens, make_prompt_pair, placeholder_tokens,
                       token_positions, validate_subjects)

# mode -> (loss terms, phases). Ablations follow the paper's Table 3 (MD, +App = ICA, +Act = AUG).
MODES: dict[str, tuple[frozenset, tuple[int, ...]]] = {
    "textual_inversion": (frozenset({"md"}), (1,)),           # TI (+mask): embeddings only
    "dreambooth": (frozenset({"md"}), (2,)),                  # DB (+mask): tokens + UNet + text encoder
    "break_a_scene": (frozenset({"md", "m2a"}), (1, 2)),
    "dynasyn": (frozenset({"md", "m2a", "ica", "aug"}), (1, 2)),  # Eq. 5, every term
    "dynasyn_md": (frozenset({"md"}), (1, 2)),
    "dynasyn_app": (frozenset({"md", "ica"}), (1, 2)),
    "dynasyn_act": (frozenset({"md", "aug"}), (1, 2)),
    "dynasyn_app_act": (frozenset({"md", "ica", "aug"}), (1, 2)),
}


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
    mixed_precision: str = "no"     # no | fp16 | bf16
    optimizer: str = "adamw"        # adamw | adamw8bit | adafactor
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    frozen_dtype: str = "auto"      # auto = fp16 on GPU, bf16 on CPUs with native bf16, else fp32 | fp16 | bf16 | fp32
    fused_backward_step: bool = False  # optimizer step inside backward: no full set of gradients in memory

    def __post_init__(self):
        if self.mode not in MODES:
            raise DynASynError(f"Unknown mode {self.mode!r}; choose one of {', '.join(MODES)}.")
        if self.resolution % 64 != 0 or self.resolution < 64:
            raise DynASynError(f"Resolution {self.resolution} must be a multiple of 64 (e.g. 512 or 768).")
        if self.optimizer not in ("adamw", "adamw8bit", "adafactor"):
            raise DynASynError(f"Unknown optimizer {self.optimizer!r}; choose adamw, adamw8bit or adafactor.")
        if self.frozen_dtype not in ("auto", "fp16", "bf16", "fp32"):
            raise DynASynError(f"Unknown frozen_dtype {self.frozen_dtype!r}; choose auto, fp16, bf16 or fp32.")

    @property
    def losses(self) -> frozenset:
        return MODES[self.mode][0]

    @property
    def phases(self) -> tuple[int, ...]:
        return MODES[self.mode][1]

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
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(x, size=(size, size), mode=mode, **kw)


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
                 log: Callable[[str], None] = print, accelerator=None):
        self.dist = Distributed(accelerator)
        self.c, self.cfg, self.callback, self.should_stop = comps, config, callback, should_stop
        self.log = log if self.dist.is_main else (lambda _msg: None)
        masks = [torch.as_tensor(m).float() for m in masks]
        validate_subjects(tuple(image.shape[:2]), masks, class_nouns)
        self.device = self.dist.device(device)
        tokens = placeholder_tokens(len(masks))
        self.subjects = [Subject(m, n.strip(), t) for m, n, t in zip(masks, class_nouns, tokens)]
        self.token_ids = add_placeholder_tokens(comps.tokenizer, comps.text_encoder, tokens, [s.class_noun for s in self.subjects])
        for pair in augmented:
            pair.validate(len(self.subjects), [s.class_noun for s in self.subjects])
        self.augmented = list(augmented)
        # c_a / ĉ_a and their token positions from each pair's template markers (refuses pairs that do not line up)
        self.aug_prompts = [augmented_prompt_pair(comps.tokenizer, p, [s.class_noun for s in self.subjects], tokens)
                            for p in self.augmented]
        if "aug" in config.losses and not self.augmented:
            self.log("[DynASyn] no augmented pairs given: training without L_AUG.")
        self.use_aug = "aug" in config.losses and bool(self.augmented)
        self.latent_size = config.resolution // comps.vae_scale_factor
        # each process draws its own subsets, flips, noise and timesteps; process 0 is the single-process run
        self.rng = random.Random(config.seed + self.dist.rank)
        self.gen = torch.Generator("cpu").manual_seed(config.seed + self.dist.rank)
        if self.dist.active:
            self.log(f"[DynASyn] data parallel on {self.dist.world} processes (gradients averaged every step).")
        self.step = 0
        self.history: list[StepLog] = []
        self.frozen = None
        self.class_hidden: dict[str, torch.Tensor] = {}  # frozen base encodings of the class prompts
        self.optimizer = None
        self.phase = None
        self.store = AttentionStore()
        self.capture = capture_layers(comps.unet, self.latent_size, config.attention_resolution)
        install_attention_capture(comps.unet, self.store, self.capture)
        self._prepare_data(image)
        self._make_frozen()  # from the base weights, before any step (also when resuming)

    # ------------------------------------------------------------------ data
    def _prepare_data(self, image: torch.Tensor) -> None:
        """VAE-encode the reference (and its mirror) once; the VAE is frozen, only the noise changes."""
        c, r = self.c, self.cfg.resolution
        vae = c.vae.to(self.device)
        pix = _resize(_image_to_tensor(image), r, "bilinear").to(self.device)
        masks = torch.stack([s.mask for s in self.subjects])[:, None]
        self.ref_masks = _resize(masks, r, "nearest")[:, 0]                        # [N, r, r]
        with torch.no_grad():
            self.ref_dist = [vae.encode(p.to(vae.dtype)).latent_dist for p in (pix, pix.flip(-1))]
        self.aug_latents = []
        for pair in self.augmented:
            apix = _resize(_image_to_tensor(pair.image), r, "bilinear").to(self.device)
            with torch.no_grad():
                dist = vae.encode(apix.to(vae.dtype)).latent_dist
            self.aug_latents.append(dist)

    def _sample_latent(self, dist) -> torch.Tensor:
        noise = torch.randn(dist.mean.shape, generator=self.gen).to(self.device, dist.mean.dtype)
        return (dist.mean + dist.std * noise) * self.c.scaling_factor

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
        unet = copy.deepcopy(self.c.unet)
        truncate_after(unet, last_layer(self.capture))
        unet = unet.to(self.device, dtype).eval().requires_grad_(False)
        prompts = self._class_prompts()
        te = None
        if prompts is None:
            te = copy.deepcopy(self.c.text_encoder).to(self.device, dtype).eval().requires_grad_(False)
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
            if cfg.gradient_checkpointing:
                c.unet.enable_gradient_checkpointing()
                c.text_encoder.gradient_checkpointing_enable()
        self.params = params
        self.optimizer = self._make_optimizer(params, lr)

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

    def _noisy(self, latents: torch.Tensor):
        sched = self.c.noise_scheduler
        noise = torch.randn(latents.shape, generator=self.gen).to(self.device, latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,), generator=self.gen).to(self.device)
        noisy = sched.add_noise(latents, noise, t)
        target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
        return noisy, t, target

    def _maps(self, unet, te, store, prompt, noisy, t, positions, grad: bool, need_pred: bool = True, hidden=None):
        """Cross-attention maps ``[S, r, r]`` of the token ``positions`` for ``prompt`` on ``noisy``.

        Without ``need_pred`` the UNet stops after its last hooked layer (attention-only passes).
        """
        autocast = grad and self.cfg.mixed_precision in ("fp16", "bf16")
        amp_dtype = torch.float16 if self.cfg.mixed_precision == "fp16" else torch.bfloat16
        with torch.set_grad_enabled(grad), torch.autocast(self.device.type, dtype=amp_dtype, enabled=autocast):
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

    def training_step(self) -> StepLog:
        cfg, c = self.cfg, self.c
        subset = union_sample(len(self.subjects), self.rng)
        flip = self.rng.random() < cfg.flip_p
        pair = make_prompt_pair(c.tokenizer, self.subjects, subset, cfg.template)
        masks = self.ref_masks.flip(-1) if flip else self.ref_masks
        latents = self._sample_latent(self.ref_dist[1 if flip else 0])
        noisy, t, target = self._noisy(latents)
        maps, pred = self._maps(c.unet, c.text_encoder, self.store, pair.placeholder_prompt, noisy, t,
                                pair.placeholder_positions, grad=True)
        terms = {}
        sel = masks[subset]
        if "md" in cfg.losses:
            terms["md"] = (cfg.lambda_md, masked_diffusion_loss(pred.float(), target.float(), union_mask(masks, subset)))
        if "m2a" in cfg.losses:
            terms["m2a"] = (cfg.lambda_m2a, masked_attention_loss(maps.float(), sel))
        if "ica" in cfg.losses:
            class_maps = self._class_maps(pair.class_prompt, noisy, t, pair.class_positions)
            terms["ica"] = (cfg.lambda_ica, inter_cross_attention_loss(maps.float(), class_maps, sel))
        if self.use_aug:
            terms["aug"] = (cfg.lambda_aug, self._augmentation_term())
        loss = sum(w * v for w, v in terms.values())
        mean_loss = self.dist.mean(loss)  # every process must agree before any of them stops
        if not torch.isfinite(mean_loss):
            raise NonFiniteLoss(f"The loss became {mean_loss.item()} at step {self.step + 1} "
                                f"({', '.join(f'{k}={v.item():.4g}' for k, (_, v) in terms.items())}). Lower the learning "
                                "rate or use mixed_precision 'no'; the last good state was kept.")
        self.optimizer.zero_grad(set_to_none=True)
        if isinstance(self.optimizer, FusedBackwardOptimizer):
            self._fused_backward(loss)
        else:
            self._backward_and_step(loss)
        if self.phase == 1:  # only the placeholder rows may change (Break-a-Scene restores the rest)
            with torch.no_grad():
                emb = c.text_encoder.get_input_embeddings().weight
                keep = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
                keep[self.token_ids] = False
                emb[keep] = self.orig_embeddings[keep]
        self.step += 1
        return StepLog(self.step, self.phase, float(mean_loss.item()),
                       {k: float(self.dist.mean(v).item()) for k, (_, v) in terms.items()},
                       self.optimizer.param_groups[0]["lr"], [self.subjects[i].token for i in subset])

    def _backward_and_step(self, loss: torch.Tensor) -> None:
        cfg = self.cfg
        loss.backward()
        self.dist.average_gradients(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not torch.isfinite(grad_norm):  # never let a non-finite update reach the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"The gradients became {grad_norm.item()} at step {self.step + 1}. Lower the learning "
                                "rate or use mixed_precision 'no'; the last good state was kept.")
        self.optimizer.step()

    def _fused_backward(self, loss: torch.Tensor) -> None:
        """Each tensor is updated by its hook during backward (no global clipping possible)."""
        loss.backward()
        if self.optimizer.non_finite:
            bad = len(self.optimizer.non_finite)
            self.optimizer.zero_grad()
            raise NonFiniteLoss(f"{bad} gradient tensors became non-finite at step {self.step + 1} and were not applied "
                                "(with fused_backward_step the other tensors were already updated). Lower the learning "
                                "rate or use mixed_precision 'no'.")

    def _augmentation_term(self) -> torch.Tensor:
        """L_AUG on one augmented pair: attention only, no reconstruction loss."""
        k = self.rng.randrange(len(self.augmented))
        pair = self.augmented[k]
        prompts = self.aug_prompts[k]  # c_a, ĉ_a, positions, in the order of pair.masks
        latents = self._sample_latent(self.aug_latents[k])
        noisy, t, _ = self._noisy(latents)
        maps, _ = self._maps(self.c.unet, self.c.text_encoder, self.store, prompts.placeholder_prompt, noisy, t,
                             prompts.placeholder_positions, grad=True, need_pred=False)
        class_maps = self._class_maps(prompts.class_prompt, noisy, t, prompts.class_positions)
        pseudo = _resize(pair.masks[:, None].float(), self.cfg.resolution, "nearest")[:, 0].to(self.device)
        return augmentation_loss(maps.float(), class_maps, pseudo)

    # ------------------------------------------------------------------ loop
    def train(self, state_dir: str | os.PathLike | None = None) -> TrainResult:
        cfg = self.cfg
        for phase in cfg.phases:
            first = sum(cfg.steps_in(p) for p in cfg.phases if p < phase)
            last = first + cfg.steps_in(phase)
            if self.step >= last:
                continue
            if self.phase != phase:
                self._setup_phase(phase)
            while self.step < last:
                if self.dist.any(bool(self.should_stop and self.should_stop()), self.device):
                    saved = self.save_state(state_dir) if state_dir else None
                    raise Cancelled(self.step, saved)
                try:
                    entry = self.training_step()
                except NonFiniteLoss as e:
                    # the failing step never reached the optimizer: the weights are the last good ones
                    if state_dir:
                        self.save_state(state_dir)
                        raise NonFiniteLoss(f"{e} Resumable state of step {self.step}: {state_dir}.") from None
                    raise
                except torch.OutOfMemoryError as e:
                    self.optimizer.zero_grad(set_to_none=True)
                    raise OutOfMemory(f"Out of memory at step {self.step + 1} ({self.device.type}): {MEMORY_ADVICE}.") from e
                self.history.append(entry)
                if self.callback and self.dist.is_main:
                    self.callback(entry)
        self._finish()
        return TrainResult(self.c, self.subjects, self.history, self.use_aug)

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
        self.frozen, self.class_hidden = None, {}

    def placeholder_embeddings(self) -> dict[str, torch.Tensor]:
        emb = self.c.text_encoder.get_input_embeddings().weight
        return {s.token: emb[i].detach().float().cpu().clone() for s, i in zip(self.subjects, self.token_ids)}

    # ------------------------------------------------------------------ state
    def save_state(self, folder: str | os.PathLike) -> Path:
        """Everything needed to resume, written to a temporary folder and renamed into place.

        Called on every process (their RNG states are gathered); only the main process writes.
        """
        from safetensors.torch import save_file

        folder = Path(folder)
        rng_states = self.dist.gather((self.gen.get_state(), self.rng.getstate()))
        if not self.dist.is_main:
            self.dist.wait()
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.c.unet.state_dict().items()}, tmp / "unet.safetensors")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.c.text_encoder.state_dict().items()},
                      tmp / "text_encoder.safetensors")
            torch.save({"optimizer": self.optimizer.state_dict() if self.optimizer else None,
                        "orig_embeddings": getattr(self, "orig_embeddings", None),
                        "torch_gen": self.gen.get_state(), "python_rng": self.rng.getstate(),
                        "rng_per_process": rng_states}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({
                "step": self.step, "phase": self.phase, "config": asdict(self.cfg),
                "tokens": [s.token for s in self.subjects], "class_nouns": [s.class_noun for s in self.subjects],
                "history": [asdict(h) for h in self.history]}, indent=1))
            if folder.exists():
                old = folder.with_name(folder.name + ".old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                tmp.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.dist.wait()
        return folder

    def load_state(self, folder: str | os.PathLike) -> None:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "state.json").read_text())
        if meta["tokens"] != [s.token for s in self.subjects] or meta["class_nouns"] != [s.class_noun for s in self.subjects]:
            raise DynASynError(f"The saved state in {folder} belongs to other subjects ({meta['class_nouns']}).")
        self.c.unet.load_state_dict(load_file(folder / "unet.safetensors"))
        self.c.text_encoder.load_state_dict(load_file(folder / "text_encoder.safetensors"))
        extra = torch.load(folder / "trainer.pt", weights_only=False)
        self.step = meta["step"]
        self.history = [StepLog(**h) for h in meta["history"]]
        if meta["phase"] is not None:
            self._setup_phase(meta["phase"])
            if extra["orig_embeddings"] is not None:
                self.orig_embeddings = extra["orig_embeddings"].to(self.device)
            if extra["optimizer"] is not None:
                self.optimizer.load_state_dict(extra["optimizer"])
        per_process = extra.get("rng_per_process") or [(extra["torch_gen"], extra["python_rng"])]
        gen_state, rng_state = per_process[self.dist.rank % len(per_process)]
        self.gen.set_state(gen_state)
        self.rng.setstate(rng_state)
