"""DynASyn Train: MODEL/CLIP/VAE + reference IMAGE + subject MASKs -> trained MODEL, CLIP, prompt, loss curve."""

from __future__ import annotations

import logging
import os
import time

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..dynasyn.errors import DynASynError
from ..dynasyn.export import save_embeddings, unique_name, validate_export_name
from ..dynasyn.memory import PRESET_CHOICES, preflight, scaled_size
from ..dynasyn.plots import loss_curve_image
from ..dynasyn.state import remove_owned
from ..dynasyn.train import MODES, Cancelled, DynASynTrainer, TrainConfig, describe_mode
from . import bridge, paths
from .common import class_nouns as parse_class_nouns, one_image, subject_masks, user_error

log = logging.getLogger("DynASyn")


def _send(event: str, data: dict) -> None:
    """To the client that queued the prompt only (its ``client_id``), never broadcast to every client."""
    try:
        from server import PromptServer
    except ImportError:
        return
    instance = getattr(PromptServer, "instance", None)
    sid = getattr(instance, "client_id", None)  # set by ComfyUI's executor for the running prompt
    if instance is not None and sid is not None:
        instance.send_sync(event, data, sid)


def _free_run_name(emb_dir: str, run_name: str, n: int) -> str:
    """``run_name`` or ``run_name_001``... such that no ``<name>_asset<i>`` embedding exists yet."""
    for k in range(10000):
        cand = run_name if k == 0 else f"{run_name}_{k:03d}"
        if not any(os.path.exists(os.path.join(emb_dir, f"{cand}_asset{i}.safetensors")) for i in range(n)):
            return cand
    raise DynASynError(f"No free run name left for {run_name!r} in {emb_dir}.")


def _scene_template(text: str, n_subjects: int):
    """The new-scene template, checked before training starts (None when empty)."""
    from ..dynasyn.prompts import MARKER, PromptTemplate

    if not (text or "").strip():
        return None
    used = sorted({int(m) for m in MARKER.findall(text)})
    if not used or used[0] < 1 or used[-1] > n_subjects:
        raise DynASynError(f"new_prompt must name the subjects as [1]…[{n_subjects}] (e.g. '[1] hugging [2] on a beach'); "
                           f"got {text!r}.")
    return PromptTemplate(" ".join(text.split()))


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _preflight(cfg, memory_preset, model, clip, vae, with_aug: bool):
    """The memory preset applied and the estimate checked against the free GPU memory, before any work."""
    device = mm.get_torch_device()
    free = mm.get_free_memory(device) if getattr(device, "type", "cpu") == "cuda" else None
    size = scaled_size(_count(model.model.diffusion_model), _count(getattr(clip, "cond_stage_model", None)),
                       _count(getattr(vae, "first_stage_model", None)))
    cfg, _, message = preflight(size, cfg, memory_preset, free, device_type=getattr(device, "type", "cpu"), with_aug=with_aug)
    log.info("[DynASyn] %s", message)
    return cfg


def _state_dir(run_name: str) -> str:
    # user/__dynasyn/runs/<run>/state: never under output/, which ComfyUI serves and accepts uploads into
    return paths.state_dir(run_name)


class _Released:
    """However the training block ends, nothing of the run outlives the node: the trainer lets go of its callbacks
    (``on_step`` refers back to it: a cycle only the garbage collector would free, gigabytes on the device until
    then), its optimizer, frozen copy and data; the components' weights leave the device (the MODEL and CLIP the node
    returns carry their own copies) and ComfyUI gives the cached device memory back."""

    trainer = comps = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.trainer is not None:
            self.trainer.release()
        if self.comps is not None:
            for module in (self.comps.unet, self.comps.text_encoder, self.comps.vae):
                if module is not None:
                    module.to("meta")  # drops the storage without copying it anywhere
        self.trainer = self.comps = None
        mm.soft_empty_cache()
        return False


class DynASynTrain:
    DESCRIPTION = (
        "Trains one placeholder token per subject, then the tokens + every UNet weight + the text encoder on ONE reference "
        "image (DynASyn, AAAI-25): L = λ_MD·L_MD + λ_M2A·L_M2A + λ_ICA·L_ICA + λ_AUG·L_AUG. Writes each subject's "
        "embedding to models/embeddings and (optionally) a checkpoint to models/checkpoints, and returns the trained MODEL "
        "and CLIP for a KSampler plus a prompt that uses the embeddings. Cancel saves a resumable state; queue again with "
        "'resume' on to continue.")
    CATEGORY = "DynASyn/train"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("MODEL", "CLIP", "prompt", "loss_curve")
    OUTPUT_TOOLTIPS = ("The trained diffusion model (a patched copy; the input model is unchanged).",
                       "The trained text encoder (a patched copy).",
                       "A prompt naming every subject as 'embedding:<run>_assetN'; edit it to describe a new scene.",
                       "The loss of each term per step.")

    @classmethod
    def INPUT_TYPES(cls):
        f = lambda d, lo, hi, step, tip: ("FLOAT", {"default": d, "min": lo, "max": hi, "step": step, "tooltip": tip})
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD 1.5 / SD 2.1 MODEL from CheckpointLoaderSimple."}),
            "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint."}),
            "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint."}),
            "image": ("IMAGE", {"tooltip": "The ONE reference picture holding the subjects (a batch is refused: pick one with ImageFromBatch)."}),
            "masks": ("MASK", {"tooltip": "One mask per subject, as a MASK batch in the order of the class nouns."}),
            "class_nouns": ("STRING", {"default": "panda, bowl", "tooltip": "What each subject is, comma-separated, in mask order."}),
            "mode": (list(MODES), {"default": "dynasyn", "tooltip": (
                "dynasyn = Eq. 5, all terms (Table 1's DynASyn = Table 3's full row MD+App+Act). Table 3 ablations: "
                "dynasyn_md = MD (L_MD + L_M2A), dynasyn_app = MD + App (+ L_ICA), dynasyn_act = MD + Act (+ L_AUG). "
                "Table 1 baselines: textual_inversion, dreambooth (one subject per step), break_a_scene.\n"
                + "\n".join(describe_mode(m) for m in MODES))}),
            "phase1_steps": ("INT", {"default": 400, "min": 0, "max": 100000, "tooltip": "Steps training only the placeholder embeddings."}),
            "phase2_steps": ("INT", {"default": 400, "min": 0, "max": 100000, "tooltip": "Steps training embeddings + UNet + text encoder."}),
            "phase1_lr": f(5e-4, 0.0, 1.0, 1e-5, "Learning rate of phase 1 (Break-a-Scene: 5e-4)."),
            "phase2_lr": f(2e-6, 0.0, 1.0, 1e-7, "Learning rate of phase 2 (Break-a-Scene: 2e-6)."),
            "lambda_md": f(1.0, 0.0, 100.0, 0.01, "Weight of the masked diffusion loss L_MD."),
            "lambda_m2a": f(0.01, 0.0, 100.0, 0.001, "Weight of the mask-to-attention loss L_M2A."),
            "lambda_ica": f(0.01, 0.0, 100.0, 0.001, "Weight of the inter-cross-attention loss L_ICA (class prior from the frozen model)."),
            "lambda_aug": f(0.01, 0.0, 100.0, 0.001, "Weight of the augmentation attention loss L_AUG (needs a dataset)."),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False, "tooltip": "Same seed and inputs give the same weights."}),
            "resolution": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64, "tooltip": "Training size: 512 for SD 1.5 / 2.1-base, 768 for SD 2.1 768-v."}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "Less memory, ~30% slower."}),
            "mixed_precision": (["auto", "no", "fp16", "bf16"], {"default": "auto", "tooltip": (
                "Autocast the trained model's forward pass. auto = bf16 on NVIDIA Ampere (RTX 30xx) and newer, fp16 with "
                "loss scaling on older cards, none on CPU. fp16 skips a step whose gradients overflow.")}),
            "optimizer": (["adamw", "adamw8bit", "adafactor"], {"default": "adamw", "tooltip": "adamw8bit needs bitsandbytes; adafactor keeps the least state."}),
            "fused_backward_step": ("BOOLEAN", {"default": False, "tooltip": (
                "Step the optimizer inside backward, one tensor at a time, so the full set of gradients never exists "
                "(with adafactor + gradient checkpointing this is the low-memory setting: see the README). No global "
                "gradient clipping in this mode.")}),
            "frozen_dtype": (["auto", "fp16", "bf16", "fp32"], {"default": "auto", "tooltip": (
                "Precision of the frozen base model that gives L_ICA / L_AUG their class-prompt targets. auto = fp16 on "
                "GPU; on CPU bf16 where the CPU has native bf16, else fp32 (bf16 is several times slower there).")}),
            "train_text_encoder": ("BOOLEAN", {"default": True, "tooltip": "Phase 2 also trains the text encoder (the paper does)."}),
            "run_name": ("STRING", {"default": "dynasyn", "tooltip": "Names the embeddings (<run>_asset0...) and checkpoint; a number is added if taken."}),
            "save_checkpoint": ("BOOLEAN", {"default": True, "tooltip": "Also write models/checkpoints/<run>.safetensors."}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": (
                "Continue from the state a cancelled run of the same run_name saved (in ComfyUI/user/__dynasyn/runs/<run>). "
                "Refused, naming what changed, if the picture, masks, class nouns, model or settings differ.")}),
            "preview_every": ("INT", {"default": 50, "min": 0, "max": 10000, "tooltip": "Show the loss curve in the progress bar every N steps (0 = never)."}),
        }, "optional": {
            "dataset": ("DYNASYN_DATASET", {"tooltip": "Augmented (image, prompt, pseudo-mask) pairs for L_AUG."}),
            "new_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": (
                "A new scene for the output prompt, [1] = subject 1, [2] = subject 2…, e.g. '[1] hugging [2] on a beach'. "
                "Each [n] becomes embedding:<run>_asset<n-1>. Empty: 'a photo of' every subject.")}),
            "memory_preset": (list(PRESET_CHOICES), {"default": "auto", "tooltip": (
                "Sets gradient_checkpointing, optimizer, fused_backward_step and train_text_encoder for the card. auto = the "
                "largest preset whose estimated peak fits the free GPU memory (on CPU: the switches as set); custom = the "
                "switches as set. Training is refused up front, naming what would fit, when the estimate exceeds the "
                "free memory. Estimates per card: README.")}),
            "prior_preservation": (["mode default", "on", "off"], {"default": "mode default", "tooltip": (
                "Class-prior loss (DreamBooth; Break-a-Scene's default): pictures of class_prompt drawn by the base model, "
                "one unmasked MSE sample per phase-2 step. mode default = on for break_a_scene and dreambooth, off for "
                "dynasyn and its ablations (L_ICA / L_AUG are DynASyn's class prior) and textual_inversion.")}),
            "class_prompt": ("STRING", {"default": "a photo at the beach", "tooltip": (
                "Prompt of the prior-preservation class pictures (Break-a-Scene's default).")}),
            "num_class_images": ("INT", {"default": 100, "min": 1, "max": 10000, "tooltip": (
                "How many class pictures (Break-a-Scene: 100). Drawn once per run at the training resolution (50 DDIM "
                "steps each) and cached in user/__dynasyn/runs/<run>/class_images; later runs of that name reuse them.")}),
            "prior_loss_weight": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01, "tooltip": (
                "Weight of the class-prior loss (Break-a-Scene: 1.0).")}),
            "aspect": (["crop", "pad"], {"default": "crop", "tooltip": (
                "A non-square picture: crop = its centre square (masks cropped alike), pad = the whole picture padded "
                "to a square with grey. Then resized to resolution, antialiased. The log says what was done.")}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def train(self, model, clip, vae, image, masks, class_nouns, mode, phase1_steps, phase2_steps, phase1_lr, phase2_lr,
              lambda_md, lambda_m2a, lambda_ica, lambda_aug, seed, resolution, gradient_checkpointing, mixed_precision,
              optimizer, fused_backward_step, frozen_dtype, train_text_encoder, run_name, save_checkpoint, resume, preview_every, dataset=None, new_prompt="", memory_preset="auto",
              prior_preservation="mode default", class_prompt="a photo at the beach", num_class_images=100,
              prior_loss_weight=1.0, aspect="crop", unique_id=None):
        try:
            return self._train(**{k: v for k, v in locals().items() if k != "self"})
        except Cancelled as e:
            # Cancel ends the prompt with ComfyUI's own exception (shown as "interrupted", not as an error)
            log.info("[DynASyn] %s", e)
            mm.throw_exception_if_processing_interrupted()
            raise mm.InterruptProcessingException(str(e)) from e
        except mm.InterruptProcessingException:
            raise
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e

    def _train(self, model, clip, vae, image, masks, class_nouns, mode, phase1_steps, phase2_steps, phase1_lr, phase2_lr,
               lambda_md, lambda_m2a, lambda_ica, lambda_aug, seed, resolution, gradient_checkpointing, mixed_precision,
               optimizer, fused_backward_step, frozen_dtype, train_text_encoder, run_name, save_checkpoint, resume, preview_every, dataset=None, new_prompt="", memory_preset="auto",
              prior_preservation="mode default", class_prompt="a photo at the beach", num_class_images=100,
              prior_loss_weight=1.0, aspect="crop", unique_id=None):
        validate_export_name(run_name, "run")
        bridge.model_family(model)  # an unsupported model is refused before anything else looks at it
        nouns = parse_class_nouns(class_nouns)  # the same parsing and checks as every other node
        ref = one_image(image)
        masks = subject_masks(masks, len(nouns), ref.shape[:2])
        scene = _scene_template(new_prompt, len(nouns))
        emb_dir = folder_paths.get_folder_paths("embeddings")[0]
        ckpt_dir = folder_paths.get_folder_paths("checkpoints")[0]
        cfg = TrainConfig(mode=mode, phase1_steps=phase1_steps, phase2_steps=phase2_steps, phase1_lr=phase1_lr,
                          phase2_lr=phase2_lr, lambda_md=lambda_md, lambda_m2a=lambda_m2a, lambda_ica=lambda_ica,
                          lambda_aug=lambda_aug, seed=seed, resolution=resolution,
                          gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                          optimizer=optimizer, fused_backward_step=fused_backward_step, frozen_dtype=frozen_dtype,
                          train_text_encoder=train_text_encoder,
                          prior_preservation={"on": True, "off": False}.get(prior_preservation),
                          class_prompt=class_prompt, num_class_images=num_class_images,
                          prior_loss_weight=prior_loss_weight, aspect=aspect)
        mm.unload_all_models()  # free ComfyUI's loaded models before heavy work
        mm.soft_empty_cache()
        cfg = _preflight(cfg, memory_preset, model, clip, vae, with_aug=bool(dataset))
        state_dir = _state_dir(run_name)
        pbar = comfy.utils.ProgressBar(cfg.total_steps, node_id=unique_id)
        started = time.time()

        def on_step(entry):
            _send("dynasyn.train", {"node": unique_id, "step": entry.step, "total": cfg.total_steps, "phase": entry.phase,
                                    "loss": entry.loss, "terms": entry.terms, "lr": entry.lr,
                                    "elapsed": time.time() - started})
            if mm.processing_interrupted():
                return  # the loop saves a resumable state before stopping
            preview = None
            if preview_every and entry.step % preview_every == 0:
                preview = ("PNG", loss_curve_image(trainer.history, as_pil=True), 512)
            try:
                pbar.update_absolute(entry.step, cfg.total_steps, preview)
            except mm.InterruptProcessingException:
                # A Cancel that arrived after the check above: ComfyUI's progress hook raised and cleared the flag.
                # Set it again, so the loop saves a resumable state before the next step (or, after the last
                # step, the export finishes and the next node stops the prompt) instead of failing with no state.
                mm.interrupt_current_processing(True)

        with torch.inference_mode(False), torch.enable_grad(), _Released() as run:
            comps = run.comps = bridge.native_to_components(model, clip, vae)
            trainer = run.trainer = DynASynTrainer(comps, ref.clone(), [m.clone() for m in masks], nouns, cfg,
                                     augmented=list(dataset or []), device=mm.get_torch_device(), callback=on_step,
                                     should_stop=mm.processing_interrupted, log=lambda m: log.info(m),
                                     class_image_dir=os.path.join(os.path.dirname(state_dir), "class_images"))
            if resume and os.path.isfile(os.path.join(state_dir, "state.json")):  # run_name validated above
                trainer.load_state(state_dir)
                log.info("[DynASyn] resuming %s from step %d", run_name, trainer.step)
            try:
                trainer.train(state_dir=state_dir)
            except mm.InterruptProcessingException:  # an interrupt raised anywhere inside the loop is a Cancel too
                trainer.save_state(state_dir)
                raise
            vectors = trainer.placeholder_embeddings()
            trained_model, trained_clip = bridge.components_to_native(model, clip, comps,
                                                                      include_text_encoder=cfg.phases != (1,))
        base = _free_run_name(emb_dir, run_name, len(vectors))
        names = {f"{base}_asset{i}": vec for i, vec in enumerate(vectors.values())}
        meta = {"dynasyn.mode": mode, "dynasyn.class_nouns": ", ".join(nouns), "dynasyn.steps": str(trainer.step)}
        save_embeddings(emb_dir, names, meta)
        words = [f"embedding:{n}" for n in names]
        prompt = scene.render(words) if scene else "a photo of " + " and ".join(words)
        if save_checkpoint:
            bridge.save_checkpoint(ckpt_dir, unique_name(ckpt_dir, base), trained_model, trained_clip, vae,
                                   metadata={**meta, "dynasyn.embeddings": " ".join(names)})
        remove_owned(state_dir)  # finished: the next queue starts a new run (only a folder the trainer marked)
        curve = loss_curve_image(trainer.history)
        return {"ui": {"text": [prompt]}, "result": (trained_model, trained_clip, prompt, curve)}
