"""DynASyn Train and its companions: Scene Prompt, Load Run, Continue Training.

Train is content-addressed: a hash of everything that decides the trained weights names the run, and a
finished run with that hash (``user/__dynasyn/runs/<run_name>/<key16>``, see ``dynasyn/runs.py``) is loaded
instead of trained again. The scene to draw lives in the light Scene Prompt node, so editing it never
re-executes Train.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, fields, replace

import torch

import comfy.model_management as mm
import comfy.utils
import folder_paths

from ..dynasyn import runs
from ..dynasyn.errors import DynASynError
from ..dynasyn.export import MAX_NAME_LENGTH, embedding_tensor, save_embedding, unique_name, validate_export_name
from ..dynasyn.memory import PRESET_CHOICES, preflight, scaled_size
from ..dynasyn.plots import loss_curve_image
from ..dynasyn.state import remove_owned
from ..dynasyn.train import MODES, Cancelled, DynASynTrainer, StepLog, TrainConfig, describe_mode
from . import bridge, paths
from .common import class_nouns as parse_class_nouns, one_image, subject_masks, user_error

log = logging.getLogger("DynASyn")

RUN_TYPE = "DYNASYN_RUN"


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


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) if module is not None else 0


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


def _has_state(state_dir: str) -> bool:
    return os.path.isfile(os.path.join(state_dir, "state.json"))


def _emb_dir() -> str:
    return folder_paths.get_folder_paths("embeddings")[0]


def _whole(name: str, value, lo: int = 0) -> int:
    """An INT widget's value checked here too (a workflow sent to the API skips the page's limits)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise DynASynError(f"{name} must be a whole number >= {lo}" + (" (0 = off)" if lo == 0 else "") + f"; got {value!r}.")
    return value


def _with_save_every(cfg: TrainConfig, save_every: int) -> TrainConfig:
    """``save_every`` goes to the trainer (a versioned resumable state every N steps) once TrainConfig has it."""
    if "save_every" in {f.name for f in fields(TrainConfig)}:
        return replace(cfg, save_every=save_every)
    return cfg


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


# ------------------------------------------------------------------ exports
def _export_checkpoint(record, model, clip, vae, base) -> None:
    """models/checkpoints/<prefix>.safetensors, once per run (a later queue of the run finds it)."""
    ckpt_dir = folder_paths.get_folder_paths("checkpoints")[0]
    exports = dict(record.meta.get("exports") or {})
    done = exports.get("checkpoint")
    if isinstance(done, str) and validate_export_name(done, "checkpoint") and os.path.isfile(os.path.join(ckpt_dir, done + ".safetensors")):
        return
    need = sum(_bytes(m) for m in (model.model.diffusion_model, clip.cond_stage_model, getattr(vae, "first_stage_model", None)))
    runs.check_free_space(ckpt_dir, need, "the checkpoint")
    name = unique_name(ckpt_dir, record.meta["prefix"])
    meta = {"dynasyn.mode": record.meta["config"].get("mode"), "dynasyn.class_nouns": ", ".join(record.meta["class_nouns"]),
            "dynasyn.steps": str(record.meta["steps"]), "dynasyn.embeddings": " ".join(record.meta["embeddings"]),
            "dynasyn.run": record.label}
    bridge.save_checkpoint(ckpt_dir, name, model, clip, vae, metadata=meta)
    record.update(exports={**exports, "checkpoint": name})


LORA_RANK = 64


def _export_lora(record, model, clip, vae, base) -> None:
    """models/loras/<prefix>.safetensors: the trained-minus-base difference at rank 64 (stock LoraLoader loads it;
    DynASyn Save LoRA offers other ranks), once per run."""
    lora_dir = folder_paths.get_folder_paths("loras")[0]
    exports = dict(record.meta.get("exports") or {})
    done = exports.get("lora")
    if isinstance(done, str) and validate_export_name(done, "LoRA") and os.path.isfile(os.path.join(lora_dir, done + ".safetensors")):
        return
    base_model, base_clip = base
    name = unique_name(lora_dir, record.meta["prefix"])
    path, summary = bridge.save_lora(lora_dir, name, base_model, model, base_clip, clip, rank=LORA_RANK,
                                     metadata={"dynasyn.run": record.label,
                                               "dynasyn.embeddings": " ".join(record.meta["embeddings"])})
    log.info("[DynASyn] wrote %s (rank %d; %.1f%% of the change dropped)", path, LORA_RANK,
             100 * float(summary.get("rel_error") or 0.0))
    record.update(exports={**exports, "lora": name})


# save_as -> what, besides the embeddings, a finished run is exported as (None: nothing): a function
# (record, trained MODEL, trained CLIP, VAE, (base MODEL, base CLIP)).
EXPORTS = {"checkpoint": _export_checkpoint, "lora": _export_lora, "embeddings": None}
SAVE_AS = tuple(EXPORTS)
SAVE_AS_TIP = ("What to write besides the run itself: checkpoint = also models/checkpoints/<run>.safetensors (~2 GB for "
               "SD 1.5; free disk space is checked first); lora = also models/loras/<run>.safetensors, the trained-minus-"
               "base difference at rank 64 for a stock LoraLoader (DynASyn Save LoRA offers other ranks); embeddings = only models/embeddings/<run>_<noun>. The "
               "embeddings are always written (the prompt uses them), after the checkpoint. A finished run queued "
               "again with another save_as writes what is missing, without training.")


def _write_embeddings(record) -> None:
    """The run's embeddings in models/embeddings (again, if deleted); a different file under a run's name is
    never overwritten."""
    from safetensors.torch import load_file

    emb_dir = _emb_dir()
    vectors = record.tensors("embeddings.safetensors")
    meta = {"dynasyn.mode": str(record.meta["config"].get("mode")), "dynasyn.class_nouns": ", ".join(record.meta["class_nouns"]),
            "dynasyn.steps": str(record.meta["steps"]), "dynasyn.run": record.label}
    for token, name in zip(record.meta["tokens"], record.meta["embeddings"]):
        if token not in vectors:
            raise DynASynError(f"The run {record.label} is damaged (no vector for {token}); delete {record.folder}.")
        path = os.path.join(emb_dir, name + ".safetensors")
        if os.path.exists(path):
            try:
                same = torch.equal(load_file(path).get("emb_params"), embedding_tensor(vectors[token]))
            except Exception:  # noqa: BLE001  (not a safetensors file, another layout)
                same = False
            if not same:
                raise DynASynError(f"{path} exists but is not the embedding of run {record.label}; move it away and "
                                   "queue again (it is never overwritten).")
            continue
        save_embedding(emb_dir, name, vectors[token], meta)


def _deliver(record, trained_model, trained_clip, vae, save_as, base):
    """Exports (the checkpoint or LoRA BEFORE the embeddings), then the outputs every run node returns."""
    exporter = EXPORTS[save_as]
    if exporter is not None:
        exporter(record, trained_model, trained_clip, vae, base)
    _write_embeddings(record)
    prompt = runs.scene_prompt("", record.words)
    history = [StepLog(**{k: h[k] for k in ("step", "phase", "loss", "terms", "lr", "subjects")}) for h in record.history()]
    samples = record.tensors("samples.safetensors").get("samples")
    samples = samples.float() / 255 if samples is not None else torch.zeros(1, 64, 64, 3)
    loss_map = {"loss": [float(h.loss) for h in history]}
    return {"ui": {"text": [prompt]},
            "result": (trained_model, trained_clip, prompt, loss_curve_image(history), record.info, samples, loss_map)}


def _check_base(record, model, clip, vae=None) -> None:
    """A run's stored weights are differences from its base model: refuse another one, naming what differs."""
    fp = bridge.native_fingerprint(model, clip, vae)
    saved = record.meta["base_model"]
    if saved.get("clip") not in (None, fp["clip"]):  # a run saved before the unused projection was left out
        fp["clip"] = bridge.native_fingerprint(model, clip, vae, legacy=True)["clip"]
    changed = [label for part, label in (("unet", "MODEL"), ("clip", "CLIP"), ("vae", "VAE")) if part in fp and saved.get(part) != fp[part]]
    if changed:
        raise DynASynError(f"The run {record.label} was trained from another {' and '.join(changed)}. Connect the "
                           "checkpoint it was trained from (with the same LoRAs and CLIP Set Last Layer).")


def _load_finished(record, model, clip, vae, save_as):
    trained_model, trained_clip = bridge.apply_trained(model, clip, record.tensors("unet.safetensors"),
                                                       record.tensors("text_encoder.safetensors"))
    return _deliver(record, trained_model, trained_clip, vae, save_as, (model, clip))


# ------------------------------------------------------------------ training
class _Watch:
    """What the node does after each step: the live event, the progress bar (loss curve or the latest sample),
    ``sample_every`` pictures and ``save_every`` embeddings."""

    def __init__(self, unique_id, total, preview_every, sample_every, save_every, names):
        self.unique_id, self.total, self.names = unique_id, total, names
        self.preview_every, self.sample_every, self.save_every = preview_every, sample_every, save_every
        self.pbar = comfy.utils.ProgressBar(total, node_id=unique_id)
        self.started = time.time()
        self.samples: list[torch.Tensor] = []
        self.trainer = self.sample_text = None
        self._targets_sent = 0.0
        self._targets_started: float | None = None

    def __call__(self, entry):
        trainer = self.trainer
        _send("dynasyn.train", {"node": self.unique_id, "step": entry.step, "total": self.total, "phase": entry.phase,
                                "loss": entry.loss, "terms": entry.terms, "lr": entry.lr,
                                "elapsed": time.time() - self.started})
        if mm.processing_interrupted():
            return  # the loop saves a resumable state before stopping
        preview = None
        if self.sample_every and (entry.step % self.sample_every == 0 or entry.step == self.total):
            preview = self._sample(entry.step)
        if self.save_every and entry.step % self.save_every == 0 and entry.step < self.total:
            self._save_embeddings(entry.step)
        if preview is None and self.preview_every and entry.step % self.preview_every == 0:
            preview = ("PNG", loss_curve_image(trainer.history, as_pil=True), 512)
        try:
            self.pbar.update_absolute(entry.step, self.total, preview)
        except mm.InterruptProcessingException:
            # A Cancel that arrived after the check above: ComfyUI's progress hook raised and cleared the flag.
            # Set it again, so the loop saves a resumable state before the next step (or, after the last
            # step, the export finishes and the next node stops the prompt) instead of failing with no state.
            mm.interrupt_current_processing(True)

    def targets(self, done, total):
        """The frozen model's targets before step 1 (``precompute_targets``): the bar fills once for them, then
        again for the training steps; the page hears of it at most 4 times a second."""
        now = time.time()
        if self._targets_started is None:
            self._targets_started = now
        if done < total and now - self._targets_sent < 0.25:
            return
        self._targets_sent = now
        _send("dynasyn.targets", {"node": self.unique_id, "done": done, "total": total,
                                  "elapsed": now - self._targets_started})
        if mm.processing_interrupted():
            return  # precompute_targets stops at its next pass
        try:
            self.pbar.update_absolute(done, total)
        except mm.InterruptProcessingException:  # as in __call__: keep the Cancel for the loop's own check
            mm.interrupt_current_processing(True)

    def _sample(self, step):
        from PIL import Image

        from ..dynasyn.sampling import render

        t = self.trainer
        try:
            image = render(t.c, self.sample_text, t.cfg.resolution, t.cfg.seed, t.device)
        except mm.OOM_EXCEPTION:
            log.warning("[DynASyn] sample_every: out of memory while drawing the step-%d sample; no more samples "
                        "this run (training goes on).", step)
            self.sample_every = 0
            return None
        image = (image * 255).round() / 255  # as stored with the run, so a reloaded run returns the same
        self.samples.append(image)
        log.info("[DynASyn] step %d: sample of %r drawn.", step, self.sample_text)
        return ("PNG", Image.fromarray((image * 255).round().byte().numpy()), 512)

    def _save_embeddings(self, step):
        vectors = self.trainer.placeholder_embeddings()
        suffix = f"_step{step}"
        for (token, vec), name in zip(vectors.items(), self.names):
            name = name[:MAX_NAME_LENGTH - len(suffix)].rstrip("_.-") + suffix
            if os.path.exists(os.path.join(_emb_dir(), name + ".safetensors")):
                continue  # a resumed run passing this step again
            try:
                save_embedding(_emb_dir(), name, vec, {"dynasyn.steps": str(step), "dynasyn.token": token})
            except DynASynError as e:  # a snapshot that cannot be written never stops training
                log.warning("[DynASyn] save_every: %s", e)
        log.info("[DynASyn] step %d: embeddings %s written.", step, ", ".join(n + suffix for n in self.names))


def _train_run(*, model, clip, vae, picture, masks, nouns, cfg, dataset, run_name, prefix, key, state_dir, watch_args,
               sample_prompt, prepare, meta, save_as):
    """Train (``prepare`` may resume or continue the trainer first), store the finished run, return it with the
    trained MODEL / CLIP made from exactly what was stored."""
    # the run stores at most every UNet and text-encoder tensor in the base dtype: refuse now, not after training
    runs.check_free_space(paths.runs_dir(), _bytes(model.model.diffusion_model) + _bytes(clip.cond_stage_model),
                          "the finished run")
    if save_as == "checkpoint":
        runs.check_free_space(folder_paths.get_folder_paths("checkpoints")[0], sum(_bytes(m) for m in (
            model.model.diffusion_model, clip.cond_stage_model, getattr(vae, "first_stage_model", None))), "the checkpoint")
    emb_dir = _emb_dir()
    prefix = runs.free_prefix(emb_dir, prefix, nouns)
    names = runs.embedding_names(prefix, nouns)
    watch = _Watch(total=cfg.total_steps, names=names, **watch_args)
    with torch.inference_mode(False), torch.enable_grad(), _Released() as run:
        comps = run.comps = bridge.native_to_components(model, clip, vae)
        trainer = watch.trainer = run.trainer = DynASynTrainer(
            comps, picture.clone(), [m.clone() for m in masks], nouns, cfg, augmented=list(dataset or []),
            device=mm.get_torch_device(), callback=watch, should_stop=mm.processing_interrupted,
            log=lambda m: log.info(m), class_image_dir=os.path.join(paths.runs_dir(), run_name, "class_images"))
        trainer.target_progress = watch.targets
        watch.sample_text = runs.scene_prompt(sample_prompt, [s.token for s in trainer.subjects])
        prepare(trainer)
        try:
            trainer.train(state_dir=state_dir)
        except mm.InterruptProcessingException:  # an interrupt raised anywhere inside the loop is a Cancel too
            trainer.save_state(state_dir)
            raise
        vectors = trainer.placeholder_embeddings()
        unet_sd, te_sd = bridge.trained_weights(model, clip, comps, include_text_encoder=cfg.phases != (1,))
        history = [asdict(h) for h in trainer.history]
        steps, tokens = trainer.step, [s.token for s in trainer.subjects]
        watch.trainer = None
    inputs, pairs = runs.pack_inputs(picture, masks, dataset or [])
    files = {"unet.safetensors": unet_sd, "text_encoder.safetensors": te_sd, "embeddings.safetensors": vectors,
             "inputs.safetensors": inputs}
    if watch.samples:
        files["samples.safetensors"] = {"samples": (torch.stack(watch.samples) * 255).round().to(torch.uint8)}
    record = runs.save_run(paths.runs_dir(), run_name, key, {
        **meta, "prefix": prefix, "class_nouns": list(nouns), "tokens": tokens, "embeddings": names, "steps": steps,
        "config": asdict(cfg), "dataset": pairs, "base_model": bridge.native_fingerprint(model, clip, vae),
        "trained": {"unet": len(unet_sd), "text_encoder": len(te_sd)}}, history, files)
    log.info("[DynASyn] finished run %s stored in %s (%s).", record.label, record.folder,
             ", ".join(f"{k} {v / 2 ** 20:.1f} MiB" for k, v in record.meta["files"].items()))
    return record, bridge.apply_trained(model, clip, unet_sd, te_sd)


def _run_node(work):
    """Cancel ends the prompt with ComfyUI's own exception (shown as "interrupted"); every other error is wrapped
    so ComfyUI shows its message (OOM stays ComfyUI's OOM type)."""
    try:
        return work()
    except Cancelled as e:
        log.info("[DynASyn] %s", e)
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException(str(e)) from e
    except mm.InterruptProcessingException:
        raise
    except Exception as e:  # noqa: BLE001
        raise user_error(e) from e


RUN_OUTPUTS = ("MODEL", "CLIP", "STRING", "IMAGE", RUN_TYPE, "IMAGE", "LOSS_MAP")
RUN_OUTPUT_NAMES = ("MODEL", "CLIP", "prompt", "loss_curve", "run", "samples", "loss_map")
RUN_OUTPUT_TIPS = (
    "The trained diffusion model: the base MODEL with the trained tensors as patches in the base dtype (no fp32 copy).",
    "The trained text encoder (a patched copy, likewise).",
    "'a photo of embedding:<run>_<noun> and ...': every subject. For a new scene, connect 'run' to DynASyn Scene Prompt.",
    "The loss of each term per step.",
    "The finished run, for DynASyn Scene Prompt (its embedding words and class nouns).",
    "The pictures sample_every drew while training (the scene of sample_prompt, one per sample step, the last with the "
    "final weights); one black 64x64 picture when sample_every is 0.",
    "The loss per step as ComfyUI's LOSS_MAP ({'loss': [...]}) for core's Plot Loss Graph (LossGraphNode).")
WATCH_TIPS = {
    "preview_every": "Show the loss curve in the progress bar every N steps (0 = never).",
    "sample_every": ("Every N steps (and at the last step) draw sample_prompt with the current weights (20 DDIM steps, "
                     "guidance 7.5, the run's seed, at the training resolution) into the progress preview and the "
                     "'samples' output. Does not change what is trained. 0 = off."),
    "save_every": ("Every N steps write the embeddings as models/embeddings/<run>_<noun>_step<N> (and, with a trainer "
                   "that supports it, a resumable state). 0 = off."),
    "sample_prompt": ("What sample_every draws, with [1] = subject 1, [2] = subject 2…, e.g. '[1] hugging [2] on a "
                      "beach'. Empty: 'a photo of' every subject."),
}


def _watch_inputs():
    return {"preview_every": ("INT", {"default": 50, "min": 0, "max": 10000, "tooltip": WATCH_TIPS["preview_every"]}),
            "sample_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": WATCH_TIPS["sample_every"]}),
            "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": WATCH_TIPS["save_every"]})}


def _checked_watch(preview_every, sample_every, save_every, sample_prompt, n_subjects) -> dict:
    _whole("preview_every", preview_every)
    _whole("sample_every", sample_every)
    _whole("save_every", save_every)
    runs.scene_prompt(sample_prompt, [f"[{i + 1}]" for i in range(n_subjects)])  # refused now, not after training
    return {"preview_every": preview_every, "sample_every": sample_every, "save_every": save_every}


def _save_as(value) -> str:
    if value not in EXPORTS:
        raise DynASynError(f"save_as must be one of {', '.join(SAVE_AS)}; got {value!r}.")
    return value


class DynASynTrain:
    DESCRIPTION = (
        "Trains one placeholder token per subject, then the tokens + every UNet weight + the text encoder on ONE reference "
        "image (DynASyn, AAAI-25): L = λ_MD·L_MD + λ_M2A·L_M2A + λ_ICA·L_ICA + λ_AUG·L_AUG. A hash of the inputs names "
        "the run: queueing the same inputs again loads the finished run (user/__dynasyn/runs/<run>/<hash>) instead of "
        "training. Writes each subject's embedding to models/embeddings and (save_as) a checkpoint or a LoRA, and returns the "
        "trained MODEL and CLIP for a KSampler; connect 'run' to DynASyn Scene Prompt to write a new scene. Cancel saves "
        "a resumable state; queue again with 'resume' on to continue.")
    CATEGORY = "DynASyn/train"
    FUNCTION = "train"
    OUTPUT_NODE = True
    RETURN_TYPES = RUN_OUTPUTS
    RETURN_NAMES = RUN_OUTPUT_NAMES
    OUTPUT_TOOLTIPS = RUN_OUTPUT_TIPS

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
            "run_name": ("STRING", {"default": "dynasyn", "tooltip": (
                "A human prefix: the run is user/__dynasyn/runs/<run_name>/<hash of the inputs>, its embeddings "
                "models/embeddings/<run_name>_<noun> (a number is added to run_name if taken). Not part of the hash: "
                "the same inputs under another name load the finished run.")}),
            "save_as": (list(SAVE_AS), {"default": "checkpoint", "tooltip": SAVE_AS_TIP}),
            "resume": ("BOOLEAN", {"default": True, "tooltip": (
                "Continue from the state a cancelled run of the same run_name saved (in ComfyUI/user/__dynasyn/runs/<run>). "
                "Refused, naming what changed, if the picture, masks, class nouns, model or settings differ.")}),
            "preview_every": _watch_inputs()["preview_every"],
        }, "optional": {
            "dataset": ("DYNASYN_DATASET", {"tooltip": "Augmented (image, prompt, pseudo-mask) pairs for L_AUG."}),
            # optional, so API prompts written before they existed still validate
            "sample_every": _watch_inputs()["sample_every"],
            "sample_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": WATCH_TIPS["sample_prompt"]}),
            "save_every": _watch_inputs()["save_every"],
            "force_retrain": ("BOOLEAN", {"default": False, "tooltip": (
                "Train even when a finished run of these exact inputs exists (it is replaced). Off: that run is loaded "
                "in seconds. A finished run keeps the trained tensors that differ from the base in the base dtype "
                "(SD 1.5 fp16 full fine-tune: ~2 GB; textual inversion: a few KB), the embeddings, the training "
                "inputs and the samples; delete its folder to reclaim the space.")}),
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

    def train(self, **inputs):
        return _run_node(lambda: self._train(**inputs))

    def _train(self, model, clip, vae, image, masks, class_nouns, mode, phase1_steps, phase2_steps, phase1_lr, phase2_lr,
               lambda_md, lambda_m2a, lambda_ica, lambda_aug, seed, resolution, gradient_checkpointing, mixed_precision,
               optimizer, fused_backward_step, frozen_dtype, train_text_encoder, run_name, save_as, resume,
               force_retrain=False, preview_every=50, sample_every=0, save_every=0, dataset=None, memory_preset="auto",
               prior_preservation="mode default", class_prompt="a photo at the beach", num_class_images=100,
               prior_loss_weight=1.0, aspect="crop", sample_prompt="", unique_id=None):
        validate_export_name(run_name, "run")
        save_as = _save_as(save_as)
        bridge.model_family(model)  # an unsupported model is refused before anything else looks at it
        nouns = parse_class_nouns(class_nouns)  # the same parsing and checks as every other node
        ref = one_image(image)
        masks = subject_masks(masks, len(nouns), ref.shape[:2])
        watch_args = _checked_watch(preview_every, sample_every, save_every, sample_prompt, len(nouns))
        if memory_preset not in PRESET_CHOICES:
            raise DynASynError(f"memory_preset must be one of {', '.join(PRESET_CHOICES)}; got {memory_preset!r}.")
        cfg = TrainConfig(mode=mode, phase1_steps=phase1_steps, phase2_steps=phase2_steps, phase1_lr=phase1_lr,
                          phase2_lr=phase2_lr, lambda_md=lambda_md, lambda_m2a=lambda_m2a, lambda_ica=lambda_ica,
                          lambda_aug=lambda_aug, seed=seed, resolution=resolution,
                          gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision,
                          optimizer=optimizer, fused_backward_step=fused_backward_step, frozen_dtype=frozen_dtype,
                          train_text_encoder=train_text_encoder,
                          prior_preservation={"on": True, "off": False}.get(prior_preservation),
                          class_prompt=class_prompt, num_class_images=num_class_images,
                          prior_loss_weight=prior_loss_weight, aspect=aspect)
        # the run's name: a hash of what decides the weights (the settings as asked, before the memory preset
        # adapts them to the free memory of the moment), so the same inputs always find the same run
        def key_for(base_model):
            return runs.run_key(picture=ref, masks=masks, class_nouns=nouns, base_model=base_model, config=cfg,
                                memory_preset=memory_preset, dataset=list(dataset or []))

        key = key_for(bridge.native_fingerprint(model, clip, vae))
        if not force_retrain:
            record = (runs.find_run(paths.runs_dir(), key, prefer=run_name)  # or one saved by an earlier version
                      or runs.find_run(paths.runs_dir(), key_for(bridge.native_fingerprint(model, clip, vae, legacy=True)),
                                       prefer=run_name))
            if record is not None:
                log.info("[DynASyn] loaded the finished run %s (trained from these same inputs, %d steps); nothing to "
                         "train. Turn force_retrain on to train it again.", record.label, record.meta["steps"])
                return _load_finished(record, model, clip, vae, save_as)
        mm.unload_all_models()  # free ComfyUI's loaded models before heavy work
        mm.soft_empty_cache()
        cfg = _with_save_every(_preflight(cfg, memory_preset, model, clip, vae, with_aug=bool(dataset)), save_every)
        state_dir = _state_dir(run_name)

        def prepare(trainer):
            if resume and _has_state(state_dir):  # run_name validated above
                trainer.load_state(state_dir)
                log.info("[DynASyn] resuming %s from step %d", run_name, trainer.step)

        record, (trained_model, trained_clip) = _train_run(
            model=model, clip=clip, vae=vae, picture=ref, masks=masks, nouns=nouns, cfg=cfg, dataset=dataset,
            run_name=run_name, prefix=run_name, key=key, state_dir=state_dir, sample_prompt=sample_prompt,
            watch_args={"unique_id": unique_id, **watch_args}, prepare=prepare, save_as=save_as,
            meta={"memory_preset": memory_preset, "parent": None})
        out = _deliver(record, trained_model, trained_clip, vae, save_as, (model, clip))
        remove_owned(state_dir)  # finished and stored: the next queue starts a new run (only a folder the trainer marked)
        return out


def _run_combo(tooltip: str):
    return (runs.list_runs(paths.runs_dir()), {"tooltip": tooltip})


class DynASynContinueTraining:
    DESCRIPTION = ("N more steps of a finished run, from its stored weights, on the inputs it was trained on (kept with "
                   "the run). The result is a new finished run (its embeddings <run>_<steps>_<noun>); continuing the "
                   "same run by the same steps again loads it. The optimizer starts afresh (a finished run keeps no "
                   "optimizer state); on a fp16 base the stored weights are the fp16 ones.")
    CATEGORY = "DynASyn/train"
    FUNCTION = "continue_training"
    OUTPUT_NODE = True
    RETURN_TYPES = RUN_OUTPUTS
    RETURN_NAMES = RUN_OUTPUT_NAMES
    OUTPUT_TOOLTIPS = RUN_OUTPUT_TIPS

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL the run was trained from (checked)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP the run was trained from (checked)."}),
            "vae": ("VAE", {"tooltip": "The VAE the run was trained from (checked)."}),
            "run": _run_combo("The finished run to continue (user/__dynasyn/runs/<run_name>/<hash>), newest first."),
            "steps": ("INT", {"default": 100, "min": 1, "max": 100000, "tooltip": (
                "How many more steps, at the run's last phase and learning rate.")}),
            "save_as": (list(SAVE_AS), {"default": "embeddings", "tooltip": SAVE_AS_TIP}),
            "force_retrain": ("BOOLEAN", {"default": False, "tooltip": (
                "Train even when this run was already continued by these steps (that result is replaced).")}),
            **_watch_inputs(),
        }, "optional": {
            "sample_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": WATCH_TIPS["sample_prompt"]}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def continue_training(self, **inputs):
        return _run_node(lambda: self._continue(**inputs))

    def _continue(self, model, clip, vae, run, steps, save_as, force_retrain=False, preview_every=50, sample_every=0,
                  save_every=0, sample_prompt="", unique_id=None):
        save_as = _save_as(save_as)
        _whole("steps", steps, 1)
        parent = runs.resolve_run(paths.runs_dir(), run)
        bridge.model_family(model)
        _check_base(parent, model, clip, vae)
        nouns = list(parent.meta["class_nouns"])
        watch_args = _checked_watch(preview_every, sample_every, save_every, sample_prompt, len(nouns))
        name = parent.folder.parent.name
        key = runs.continued_key(parent.key, steps)
        if not force_retrain:
            record = runs.find_run(paths.runs_dir(), key, prefer=name)
            if record is not None:
                log.info("[DynASyn] loaded the finished run %s (%s continued by %d steps); nothing to train.",
                         record.label, parent.label, steps)
                return _load_finished(record, model, clip, vae, save_as)
        known = {f.name for f in fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in parent.meta["config"].items() if k in known})
        cfg = _with_save_every(replace(cfg, phase2_steps=cfg.phase2_steps + steps), save_every)
        picture, masks, pairs = runs.unpack_inputs(parent)
        mm.unload_all_models()
        mm.soft_empty_cache()
        state_dir = paths.continue_state_dir(name, key)

        def prepare(trainer):
            if _has_state(state_dir):  # a cancelled continuation of the same run and steps
                trainer.load_state(state_dir)
                log.info("[DynASyn] resuming the continuation of %s from step %d", parent.label, trainer.step)
            else:
                runs.continue_from(trainer, parent)
                log.info("[DynASyn] continuing %s from step %d by %d steps", parent.label, trainer.step, steps)

        record, (trained_model, trained_clip) = _train_run(
            model=model, clip=clip, vae=vae, picture=picture, masks=masks, nouns=nouns, cfg=cfg, dataset=pairs,
            run_name=name, prefix=f"{parent.meta['prefix'][:MAX_NAME_LENGTH - 40]}_{cfg.total_steps}", key=key,
            state_dir=state_dir, sample_prompt=sample_prompt, watch_args={"unique_id": unique_id, **watch_args},
            prepare=prepare, save_as=save_as, meta={"memory_preset": parent.meta.get("memory_preset"),
                                   "parent": {"run": parent.label, "key": parent.key, "steps": steps}})
        out = _deliver(record, trained_model, trained_clip, vae, save_as, (model, clip))
        remove_owned(state_dir)
        try:
            os.rmdir(os.path.dirname(state_dir))  # continue_<key>/, when nothing else is in it
        except OSError:
            pass
        return out


class DynASynLoadRun:
    DESCRIPTION = ("A finished training run onto the MODEL / CLIP it was trained from (checked): the trained tensors "
                   "become patches in the base dtype, exactly as Train returned them, and its embeddings are written "
                   "to models/embeddings again if missing. Use a result in any workflow without the training graph; "
                   "the VAE is never trained (use the checkpoint's).")
    CATEGORY = "DynASyn/train"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", RUN_TYPE, "STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("MODEL", "CLIP", "prompt", "run", "words", "class_nouns", "loss_curve")
    OUTPUT_TOOLTIPS = ("The trained diffusion model (the base MODEL with the run's patches).",
                       "The trained text encoder (the base CLIP with the run's patches).",
                       "'a photo of embedding:<run>_<noun> and ...': every subject.",
                       "The run, for DynASyn Scene Prompt.",
                       "The subjects' prompt words, comma-separated, in mask order ('embedding:<run>_<noun>, ...').",
                       "The class nouns, comma-separated, in the same order.",
                       "The loss of each term per step.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The MODEL the run was trained from (CheckpointLoaderSimple of the same file)."}),
            "clip": ("CLIP", {"tooltip": "The CLIP the run was trained from."}),
            "run": _run_combo("A finished run (user/__dynasyn/runs/<run_name>/<hash>), newest first; refresh the page "
                              "after training to see new ones."),
        }}

    def load(self, model, clip, run):
        def work():
            record = runs.resolve_run(paths.runs_dir(), run)
            bridge.model_family(model)
            _check_base(record, model, clip)
            trained_model, trained_clip = bridge.apply_trained(model, clip, record.tensors("unet.safetensors"),
                                                               record.tensors("text_encoder.safetensors"))
            _write_embeddings(record)
            history = [StepLog(**{k: h[k] for k in ("step", "phase", "loss", "terms", "lr", "subjects")})
                       for h in record.history()]
            prompt = runs.scene_prompt("", record.words)
            log.info("[DynASyn] loaded run %s (%d steps).", record.label, record.meta["steps"])
            return {"ui": {"text": [prompt]},
                    "result": (trained_model, trained_clip, prompt, record.info, ", ".join(record.words),
                               ", ".join(record.meta["class_nouns"]), loss_curve_image(history))}
        return _run_node(work)


class DynASynScenePrompt:
    DESCRIPTION = ("A new scene with the trained subjects: '[1] hugging [2] on a beach' -> 'embedding:<run>_panda hugging "
                   "embedding:<run>_bowl on a beach'. A light node: editing the scene never re-executes Train.")
    CATEGORY = "DynASyn/train"
    FUNCTION = "prompt"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("prompt",)
    OUTPUT_TOOLTIPS = ("The scene with each [n] replaced by subject n's embedding word; feed it to CLIPTextEncode "
                       "with the trained CLIP.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "run": (RUN_TYPE, {"tooltip": "The 'run' output of DynASyn Train, Continue Training or Load Run."}),
            "scene": ("STRING", {"multiline": True, "default": "",
                                 "placeholder": "[1] hugging [2] on a beach  (empty: a photo of every subject)",
                                 "tooltip": ("The scene, [1] = subject 1, [2] = subject 2… in mask order, e.g. '[1] "
                                             "hugging [2] on a beach'. Empty: 'a photo of' every subject.")}),
        }}

    def prompt(self, run, scene):
        def work():
            if not isinstance(run, runs.RunInfo):
                raise DynASynError("Connect the 'run' output of DynASyn Train, Continue Training or Load Run.")
            text = runs.scene_prompt(scene, run.words)
            return {"ui": {"text": [text]}, "result": (text,)}
        return _run_node(work)
