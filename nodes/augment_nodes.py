"""Augmentation nodes: describe subjects, augment prompts, the augmentation stage, dataset save/load.

Thin wrappers over ``dynasyn.describe`` / ``prompts`` / ``augment`` / ``dataset``. The API key is
never an input: it comes from DYNASYN_API_KEY (or OPENAI_API_KEY) or a key file.
"""

from __future__ import annotations

import logging
import os

import torch

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import folder_paths

from ..dynasyn.errors import DynASynError
from ..dynasyn.export import unique_name, validate_export_name
from .aux_models import SAM_INPUTS, sam_module, used_on_device
from .common import class_nouns, one_image, subject_masks, user_error

log = logging.getLogger("DynASyn")

DEFAULT_ENDPOINT = "http://127.0.0.1:11434/v1"


def _cache_dir() -> str:
    return os.path.join(folder_paths.get_user_directory(), "dynasyn_llm_cache")


def _datasets_dir() -> str:
    # user/__dynasyn/datasets: datasets are read back, so never under output/ (served, and writable by /upload/image)
    from .paths import datasets_dir

    return datasets_dir()


DEFAULT_DATASET = "dynasyn_dataset"
MAX_LISTED_DATASETS = 2000
_listing: dict = {}


def list_datasets() -> list[str]:
    """The dataset names in the datasets folder: one bounded scandir, cached on the folder's mtime (this runs on
    every /object_info). Only real folders with a valid name and a dataset.json are listed; symlinks are not."""
    root = _datasets_dir()
    try:
        mtime = os.stat(root).st_mtime_ns
    except OSError:
        return []
    if _listing.get("key") == (root, mtime):
        return _listing["names"]
    names = []
    try:
        with os.scandir(root) as it:
            for k, entry in enumerate(it):
                if k >= MAX_LISTED_DATASETS:
                    break
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                try:
                    validate_export_name(entry.name, "dataset")
                except DynASynError:
                    continue
                if os.path.isfile(os.path.join(entry.path, "dataset.json")):
                    names.append(entry.name)
    except OSError:
        return []
    names.sort()
    _listing.update(key=(root, mtime), names=names)
    return names


def _dataset_path(name: str) -> str:
    """The folder of dataset ``name``, checked before any filesystem call; errors never say what exists elsewhere."""
    if not isinstance(name, str):
        raise DynASynError("Pick a dataset from the list (written by DynASyn Save Dataset).")
    try:
        validate_export_name(name, "dataset")
    except DynASynError:
        raise DynASynError(f"{name[:80]!r} is not a dataset name: pick a dataset from the list (a name, never a path).") from None
    return os.path.join(_datasets_dir(), name)


_nouns = class_nouns  # one parser for every node (Train included)


def _lines(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _interrupt_if_cancelled(e: Exception) -> None:
    """An LLM call stopped by Cancel ends the prompt with ComfyUI's own exception, not as an error."""
    from ..dynasyn.llm import LLMCancelled

    if isinstance(e, LLMCancelled):
        mm.throw_exception_if_processing_interrupted()
        raise mm.InterruptProcessingException(str(e)) from e


SAM_INPUTS_AUGMENT = {
    "sam": ("DYNASYN_SAM", {"tooltip": "SAM for the pseudo-masks (recommended); without it the attention map is the mask."}),
    "sam_model": SAM_INPUTS["sam_model"],
}
DETECTOR_INPUT = ("DYNASYN_DETECTOR", {"tooltip": "Optional zero-shot detector: finds each subject by its description "
                                                  "(its box prompts SAM) instead of by its attention."})

LLM_SETTINGS_INPUT = ("DYNASYN_LLM", {"tooltip": (
    "DynASyn LLM Settings: one endpoint / model for Describe Subjects and Augment Prompts. When connected, its "
    "endpoint, model, timeout and unload_after replace this node's own widgets.")})

LLM_INPUTS = {
    "endpoint": ("STRING", {"default": DEFAULT_ENDPOINT, "tooltip": (
        "OpenAI-compatible base URL: Ollama http://127.0.0.1:11434/v1, LM Studio http://127.0.0.1:1234/v1, vLLM, or "
        "https://api.openai.com/v1. The key comes from the DYNASYN_API_KEY (or OPENAI_API_KEY) environment variable "
        "or ~/.config/dynasyn/api_key, never from the workflow, and is sent only to hosts the operator lists in "
        "DYNASYN_API_HOSTS (default api.openai.com); other endpoints get no key. No '?', '#' or credentials.")}),
    "timeout": ("FLOAT", {"default": 120.0, "min": 1.0, "max": 3600.0, "step": 1.0, "tooltip": (
        "Seconds the node waits for the model in all (every subject's call, retries after 429 / 5xx replies included).")}),
}


def _llm(llm, endpoint: str, model: str, timeout: float) -> dict:
    """The endpoint / model / timeout / unload_after a call uses: the connected LLM Settings, else the widgets."""
    if llm is None:
        return {"endpoint": endpoint, "model": model, "timeout": timeout, "unload_after": False}
    if not isinstance(llm, dict) or not {"endpoint", "model", "timeout", "unload_after"} <= set(llm):
        raise DynASynError("The 'llm' input is not a DynASyn LLM Settings output.")
    return llm


class DynASynLLMSettings:
    DESCRIPTION = ("One OpenAI-compatible endpoint and model for DynASyn Describe Subjects (vlm mode) and DynASyn "
                   "Augment Prompts (llm mode): connect 'llm' to both, and their own endpoint / model / timeout "
                   "widgets are ignored. unload_after asks Ollama-style servers to unload the model once it "
                   "answered (keep_alive 0), so it does not hold GPU memory while DynASyn trains. The API key is "
                   "never an input (see 'endpoint'). A model the server does not know gives an error listing the "
                   "models it offers (its /v1/models).")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "settings"
    RETURN_TYPES = ("DYNASYN_LLM",)
    RETURN_NAMES = ("llm",)
    OUTPUT_TOOLTIPS = ("The settings, for the 'llm' input of Describe Subjects and Augment Prompts.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "endpoint": LLM_INPUTS["endpoint"],
            "model": ("STRING", {"default": "qwen2.5vl", "tooltip": (
                "Model name at the endpoint. Describe needs one that sees pictures (qwen2.5vl, llava, gemma3, "
                "gpt-4o-mini...); the same model writes the prompts.")}),
            "timeout": LLM_INPUTS["timeout"],
            "unload_after": ("BOOLEAN", {"default": True, "tooltip": (
                "Ask the server to unload the model after each node's last request (keep_alive 0: Ollama; other "
                "servers ignore it). Off: the server keeps it loaded (faster re-runs, less GPU memory for training).")}),
        }}

    def settings(self, endpoint, model, timeout, unload_after):
        try:
            from ..dynasyn.llm import validate_base_url

            validate_base_url(endpoint)  # a bad URL is refused here, before any node calls it
            if not str(model).strip():
                raise DynASynError("Name the model at the endpoint (e.g. qwen2.5vl for Ollama, gpt-4o-mini for OpenAI).")
            return ({"endpoint": endpoint, "model": str(model).strip(), "timeout": float(timeout),
                     "unload_after": bool(unload_after)},)
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


class DynASynDescribeSubjects:
    DESCRIPTION = ("Step 1: a noun phrase under 5 words for each subject ('fluffy red panda toy'), from a vision-language "
                   "model on each subject's crop, or offline from the class nouns (or your own phrases). Replies are cached "
                   "in ComfyUI/user/dynasyn_llm_cache: a re-run with the same inputs does not call again.")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "describe"
    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("descriptions", "class_nouns")
    OUTPUT_TOOLTIPS = ("One description per line, subject 1 first.",
                       "The class nouns, cleaned ('ball, box'): link it to Augment Prompts and Train so they are typed once.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The reference picture (one image)."}),
            "masks": ("MASK", {"tooltip": "One mask per subject (MASK batch), in class-noun order."}),
            "class_nouns": ("STRING", {"default": "panda, bowl", "tooltip": "What each subject is, comma-separated."}),
            "mode": (["offline", "vlm"], {"default": "offline", "tooltip": (
                "offline: the class nouns (or 'phrases') are the descriptions; vlm: ask the model at 'endpoint'.")}),
            "model": ("STRING", {"default": "llava", "tooltip": "VLM name at the endpoint (llava, qwen2.5vl, gpt-4o-mini...)."}),
            **LLM_INPUTS,
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False, "tooltip": "Sent to the model; part of the cache key."}),
        }, "optional": {
            "phrases": ("STRING", {"default": "", "multiline": True, "tooltip": "Offline: your own description per line (empty line = class noun)."}),
            "llm": LLM_SETTINGS_INPUT,
        }}

    def describe(self, image, masks, class_nouns, mode, model, endpoint, timeout, seed, phrases="", llm=None):
        try:
            from ..dynasyn.describe import describe_subjects
            from ..dynasyn.llm import resolve_api_key

            nouns = _nouns(class_nouns)
            ref = one_image(image)
            ms = subject_masks(masks, len(nouns), ref.shape[:2])
            if mode == "offline":
                out = describe_subjects(ref, ms, nouns, phrases=phrases.splitlines())
            else:
                use = _llm(llm, endpoint, model, timeout)
                out = describe_subjects(ref, ms, nouns, base_url=use["endpoint"], model=use["model"],
                                        api_key=resolve_api_key(use["endpoint"]), seed=seed, cache_dir=_cache_dir(),
                                        timeout=use["timeout"], should_stop=mm.processing_interrupted,
                                        unload=use["unload_after"])
            return {"ui": {"text": ["\n".join(out)]}, "result": ("\n".join(out), ", ".join(nouns))}
        except Exception as e:  # noqa: BLE001
            _interrupt_if_cancelled(e)
            raise user_error(e) from e


class DynASynAugmentPrompts:
    DESCRIPTION = ("Step 2: K prompts of the subjects acting alone and interacting. Each keeps a marker per subject ([1], "
                   "[2]...) so it can be written with the descriptions (drafts), the class nouns (training) or the learned "
                   "tokens. Offline: a seeded generator over a vocabulary of actions, relations and places; llm: the model "
                   "at 'endpoint' writes them as JSON (invalid or duplicate ones are dropped and counted).")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "prompts"
    RETURN_TYPES = ("DYNASYN_PROMPTS", "STRING")
    RETURN_NAMES = ("prompts", "text")
    OUTPUT_TOOLTIPS = ("The prompt templates with the subjects' descriptions and class nouns.",
                       "The prompts written with the descriptions, one per line.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "descriptions": ("STRING", {"forceInput": True, "tooltip": "One description per line (from Describe Subjects)."}),
            "class_nouns": ("STRING", {"default": "panda, bowl", "tooltip": "What each subject is, comma-separated."}),
            "count": ("INT", {"default": 30, "min": 1, "max": 500, "tooltip": "K: how many prompts (the paper uses 30)."}),
            "mode": (["offline", "llm"], {"default": "offline", "tooltip": "offline: built-in generator; llm: ask the model at 'endpoint'."}),
            "model": ("STRING", {"default": "llama3.1", "tooltip": "LLM name at the endpoint."}),
            **LLM_INPUTS,
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False, "tooltip": "Same seed, same prompts (offline, and cached online)."}),
        }, "optional": {"llm": LLM_SETTINGS_INPUT}}

    def prompts(self, descriptions, class_nouns, count, mode, model, endpoint, timeout, seed, llm=None):
        try:
            from ..dynasyn.llm import resolve_api_key
            from ..dynasyn.prompts import llm_prompts, offline_prompts

            nouns = _nouns(class_nouns)
            descs = _lines(descriptions)
            if len(descs) != len(nouns):
                raise DynASynError(f"{len(descs)} descriptions for {len(nouns)} class nouns: one description per subject.")
            dropped = 0
            if mode == "offline":
                templates = offline_prompts(len(nouns), count, seed)
            else:
                use = _llm(llm, endpoint, model, timeout)
                templates, dropped = llm_prompts(descs, count, base_url=use["endpoint"], model=use["model"], seed=seed,
                                                 api_key=resolve_api_key(use["endpoint"]), cache_dir=_cache_dir(),
                                                 timeout=use["timeout"], should_stop=mm.processing_interrupted,
                                                 unload=use["unload_after"])
            if dropped:
                log.info("[DynASyn] %d of the LLM's prompts were invalid or duplicates and were dropped.", dropped)
            text = "\n".join(t.render(descs) for t in templates)
            bundle = {"templates": templates, "descriptions": descs, "class_nouns": nouns, "dropped": dropped}
            return {"ui": {"text": [text]}, "result": (bundle, text)}
        except Exception as e:  # noqa: BLE001
            _interrupt_if_cancelled(e)
            raise user_error(e) from e


def _prompt_bundle(prompts) -> tuple[list, list[str], list[str]]:
    """(templates, class nouns, descriptions) of a DYNASYN_PROMPTS input."""
    if not isinstance(prompts, dict) or not {"templates", "class_nouns", "descriptions"} <= set(prompts):
        raise DynASynError("The 'prompts' input is not a DynASyn Augment Prompts output.")
    return list(prompts["templates"]), list(prompts["class_nouns"]), list(prompts["descriptions"])


def _renderer(model, clip, vae, cfg, sampler_name: str, scheduler: str, unique_id, planned):
    """The stage's sampler on the native MODEL (after Train's model check: no hours of sampling on a model the
    method does not fit), with one progress bar over its ``planned(renderer)`` UNet evaluations."""
    from .bridge import model_family
    from .comfy_render import ComfyRenderer

    model_family(model)
    renderer = ComfyRenderer(model, clip, vae, cfg, sampler_name, scheduler)
    total = max(1, int(planned(renderer)))
    pbar = comfy.utils.ProgressBar(total, node_id=unique_id)
    renderer.step = lambda done, preview: pbar.update_absolute(min(done, total), total, preview)
    return renderer, pbar, total


MASK_COLORS = ((79, 195, 247), (255, 183, 77), (129, 199, 132), (229, 115, 115), (186, 104, 200), (255, 241, 118))
GALLERY_LIMIT = 64


def gallery_ui(pairs) -> list[dict]:
    """The web extension's gallery: each pair's image and a pseudo-mask overlay as temp PNGs, with its prompt."""
    import uuid

    import numpy as np
    from PIL import Image

    folder = os.path.join(folder_paths.get_temp_directory(), "dynasyn")
    os.makedirs(folder, exist_ok=True)
    run = uuid.uuid4().hex[:8]
    items = []
    for k, p in enumerate(pairs[:GALLERY_LIMIT]):
        rgb = (p.image.clamp(0, 1).cpu().numpy() * 255).astype(np.float32)
        overlay = rgb * 0.35
        for j, m in enumerate(p.masks.cpu().numpy()):
            color = np.array(MASK_COLORS[p.subjects[j] % len(MASK_COLORS)], np.float32)
            overlay = np.where(m[..., None] > 0.5, 0.45 * rgb + 0.55 * color, overlay)
        entry = {"prompt": p.class_prompt}
        for key, arr in (("image", rgb), ("masks", overlay)):
            name = f"gallery_{run}_{k:03d}_{key}.png"
            Image.fromarray(arr.round().clip(0, 255).astype(np.uint8)).save(os.path.join(folder, name), compress_level=1)
            entry[key] = {"filename": name, "subfolder": "dynasyn", "type": "temp"}
        items.append(entry)
    return items


def _gallery(pairs) -> torch.Tensor:
    """The pairs' images as one IMAGE batch (resized to the first one's size when they differ)."""
    if not pairs:
        return torch.zeros(1, 64, 64, 3)
    h, w = pairs[0].image.shape[:2]
    imgs = []
    for p in pairs:
        img = p.image.permute(2, 0, 1)[None]
        if img.shape[-2:] != (h, w):
            img = torch.nn.functional.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        imgs.append(img[0].permute(1, 2, 0))
    return torch.stack(imgs).clamp(0, 1)


class DynASynAugment:
    DESCRIPTION = ("Steps 4-6 in one node, sampled by ComfyUI's own sampler on this MODEL: for each prompt, a draft is drawn "
                   "with the subjects' descriptions (draft_batch at a time); the cross-attention "
                   "of each subject's words points SAM (or, without SAM, the attention itself) to a pseudo-mask; the real "
                   "subjects are pasted there (aspect kept), the gaps inpainted by the same model, Guided SDE "
                   "Augmentation re-noises the result to t = 700/1000 and denoises it under the prompt, and the subjects "
                   "are segmented again on that output (pose and outline changed). Drafts where a "
                   "subject was not found are skipped and counted. Output: the DYNASYN_DATASET for DynASyn Train.")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "augment"
    OUTPUT_NODE = True
    RETURN_TYPES = ("DYNASYN_DATASET", "IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "augmented", "drafts", "report")
    OUTPUT_TOOLTIPS = ("(image, class-noun prompt, pseudo-masks) pairs for DynASyn Train.", "The augmented images.",
                       "The drafts.", "What was made and what was skipped.")

    @classmethod
    def INPUT_TYPES(cls):
        from ..dynasyn.gsa import SAMPLERS

        return {"required": {
            "model": ("MODEL", {"tooltip": "SD 1.5 / 2.1 MODEL (the one you will train)."}),
            "clip": ("CLIP", {"tooltip": "Its CLIP."}),
            "vae": ("VAE", {"tooltip": "Its VAE."}),
            "image": ("IMAGE", {"tooltip": "The reference picture."}),
            "masks": ("MASK", {"tooltip": "One mask per subject."}),
            "prompts": ("DYNASYN_PROMPTS", {"tooltip": "From DynASyn Augment Prompts."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64, "tooltip": "Draft / augmented image size (512 for SD 1.5 / 2.1-base)."}),
            "draft_steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "Sampling steps of each draft."}),
            "inpaint_steps": ("INT", {"default": 20, "min": 1, "max": 200, "tooltip": "Steps filling the gaps around pasted subjects."}),
            "gsa_strength": ("FLOAT", {"default": 0.7, "min": 0.05, "max": 1.0, "step": 0.05, "tooltip": "GSA start: t = strength x 1000 (paper: 0.7)."}),
            "gsa_steps": ("INT", {"default": 30, "min": 1, "max": 1000, "tooltip": "GSA schedule length; int(steps x strength) steps run. A multiple of 10 starts exactly at t = 700."}),
            "gsa_sampler": (list(SAMPLERS), {"default": "ddpm", "tooltip": (
                "GSA reverse pass. ddpm (default): the paper's stochastic SDE (ancestral, fresh noise every step); "
                "ddim / euler: deterministic (the output depends on the start noise only).")}),
            "paper_exact": ("BOOLEAN", {"default": False, "tooltip": "GSA as in the paper: 700 DDPM steps from t = 700 (slow)."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": "Classifier-free guidance scale."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False, "tooltip": "Prompt k uses seed + k."}),
            "draft_sampler": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler", "tooltip": "ComfyUI sampler for the drafts and the inpainting."}),
            "draft_scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal", "tooltip": "ComfyUI scheduler for the drafts and the inpainting."}),
            "draft_batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Drafts sampled together (more is faster on a GPU, needs more memory). Prompt k's noise depends only on seed + k."}),
        }, "optional": {
            "pseudo_masks": (["resegmented", "pasted"], {"default": "resegmented", "tooltip": (
                "The masks L_AUG trains on. resegmented (default): found again on the GSA output, which changes pose "
                "and outline (SAM prompted by each pasted mask's box and inner point; without SAM, the subject's "
                "cross-attention during GSA). pasted: the silhouettes pasted before GSA. Both are kept in the dataset.")}),
            **SAM_INPUTS_AUGMENT,
            "detector": DETECTOR_INPUT,
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def augment(self, model, clip, vae, image, masks, prompts, size, draft_steps, inpaint_steps, gsa_strength, gsa_steps,
                gsa_sampler, paper_exact, guidance, seed, draft_sampler="euler", draft_scheduler="normal", draft_batch=4,
                pseudo_masks="resegmented", sam=None, detector=None, unique_id=None, sam_model=None):
        try:
            from ..dynasyn.augment import AugmentConfig, augment
            from ..dynasyn.gsa import GSAConfig

            ref = one_image(image)
            templates, nouns, descriptions = _prompt_bundle(prompts)
            ms = subject_masks(masks, len(nouns), ref.shape[:2])
            cfg = AugmentConfig(size=size, draft_steps=draft_steps, inpaint_steps=inpaint_steps, guidance_scale=guidance,
                                seed=seed, draft_batch=draft_batch, pseudo_masks=pseudo_masks,
                                gsa=GSAConfig(strength=gsa_strength, steps=gsa_steps, sampler=gsa_sampler,
                                              guidance_scale=guidance, paper_exact=paper_exact))
            segmenter = sam_module(sam, sam_model)
            renderer, pbar, total = _renderer(model, clip, vae, cfg, draft_sampler, draft_scheduler, unique_id,
                                              lambda r: r.planned_evaluations(len(templates)))
            made = []
            try:
                with used_on_device(segmenter, detector.model if detector is not None else None):
                    report = augment(renderer, ref, ms, nouns, descriptions, templates, cfg, sam=segmenter,
                                     detector=detector, should_stop=mm.processing_interrupted, on_pair=made.append)
                mm.throw_exception_if_processing_interrupted()
            except mm.InterruptProcessingException:
                _keep_made(made, "cancelled")
                raise
            except Exception as e:  # noqa: BLE001  (any failure: the finished pairs are kept, and the error says where)
                kept = _keep_made(made, "failed")
                if kept is None:
                    raise
                what = str(e) if isinstance(e, DynASynError) else f"{type(e).__name__}: {e}"
                raise DynASynError(f"{what} The {len(made)} augmented pairs finished before this are kept in {kept} "
                                   f"(DynASyn Load Dataset '{os.path.basename(kept)}' reads them).") from e
            pbar.update_absolute(total, total)
            lines = [f"{len(report.pairs)} augmented pairs from {len(templates)} prompts in {report.seconds:.0f} s "
                     f"({report.unet_evaluations} UNet evaluations); {len(report.skipped)} skipped"]
            lines += [f"  prompt {k + 1}: {why}" for k, why in report.skipped]
            text = "\n".join(lines)
            log.info("[DynASyn] %s", text)
            drafts = torch.stack(report.drafts) if report.drafts else torch.zeros(1, size, size, 3)
            return {"ui": {"text": [text], "dynasyn_gallery": gallery_ui(report.pairs)},
                    "result": (report.pairs, _gallery(report.pairs), drafts, text)}
        except mm.InterruptProcessingException:
            raise
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


# ------------------------------------------------------------------------------------------ stage nodes
# The Augment node's steps as nodes an artist can rewire: Drafts -> Compose -> any inpaint / sampler / ControlNet
# graph -> Make Pair. Each calls the same dynasyn.augment functions as the Augment node.

def _batch(images: torch.Tensor, what: str) -> torch.Tensor:
    if images.ndim != 4 or images.shape[-1] not in (3, 4):
        raise DynASynError(f"{what} must be an IMAGE batch; got a tensor of shape {tuple(images.shape)}.")
    return images[..., :3].detach().float()


def _per_image_masks(masks: torch.Tensor, images: int, n: int, size, what: str, source: str) -> torch.Tensor:
    """``[images * n, H, W]`` masks (image 1's n subjects first), checked against the count and the image size."""
    masks = masks if masks.ndim == 3 else masks[None]
    if masks.shape[0] != images * n:
        raise DynASynError(f"{masks.shape[0]} {what} for {images} image(s) of {n} subjects: give {images * n}, one per "
                           f"subject per image, image 1's subjects first ({source}).")
    if tuple(masks.shape[-2:]) != tuple(size):
        raise DynASynError(f"The {what} ({masks.shape[-1]}x{masks.shape[-2]}) must have the images' size "
                           f"({size[1]}x{size[0]}).")
    return masks.detach().float()


class DynASynDrafts:
    DESCRIPTION = ("Augment's step 4 as its own node: drafts of the augmented prompts drawn by ComfyUI's sampler on "
                   "this MODEL, written with the subjects' descriptions, and each subject's pseudo-mask (where its "
                   "words' cross-attention points SAM, or that attention itself without SAM). Prompt k uses seed + k - 1, "
                   "as in Augment. Drafts where a subject was not found are dropped and reported. Next: DynASyn "
                   "Compose, any inpaint graph, then DynASyn Make Pair.")
    CATEGORY = "DynASyn/augment/stages"
    FUNCTION = "drafts"
    RETURN_TYPES = ("IMAGE", "MASK", "STRING", "STRING", "STRING")
    RETURN_NAMES = ("drafts", "pseudo_masks", "templates", "text", "report")
    OUTPUT_TOOLTIPS = (
        "The kept drafts (an IMAGE batch).",
        "Their pseudo-masks: one per subject per draft, draft 1's subjects first (for DynASyn Compose).",
        "The kept prompts with subject markers ('[1] hugging [2] on a beach'), one per line: DynASyn Make Pair's prompt.",
        "The kept prompts written with the descriptions, one per line: the text for CLIPTextEncode when you inpaint "
        "or re-noise (with count 1 it is exactly one prompt).",
        "What was drawn and what was dropped.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "SD 1.5 / 2.1 MODEL."}),
            "clip": ("CLIP", {"tooltip": "Its CLIP."}),
            "vae": ("VAE", {"tooltip": "Its VAE."}),
            "prompts": ("DYNASYN_PROMPTS", {"tooltip": "From DynASyn Augment Prompts."}),
            "first": ("INT", {"default": 1, "min": 1, "max": 500, "tooltip": "The first prompt drawn (1 = the first line of Augment Prompts' text)."}),
            "count": ("INT", {"default": 1, "min": 1, "max": 500, "tooltip": "How many prompts from 'first' on (fewer when the list ends)."}),
            "size": ("INT", {"default": 512, "min": 64, "max": 1024, "step": 64, "tooltip": "Draft size (512 for SD 1.5 / 2.1-base)."}),
            "steps": ("INT", {"default": 25, "min": 1, "max": 200, "tooltip": "Sampling steps of each draft."}),
            "guidance": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.5, "tooltip": "Classifier-free guidance scale."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                             "tooltip": "Prompt k uses seed + k - 1 (the same drafts as Augment with this seed)."}),
            "sampler_name": (comfy.samplers.KSampler.SAMPLERS, {"default": "euler", "tooltip": "ComfyUI sampler."}),
            "scheduler": (comfy.samplers.KSampler.SCHEDULERS, {"default": "normal", "tooltip": "ComfyUI scheduler."}),
            "batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "Drafts sampled together (faster on a GPU, more memory); the images do not depend on it."}),
        }, "optional": {**SAM_INPUTS_AUGMENT, "detector": DETECTOR_INPUT}, "hidden": {"unique_id": "UNIQUE_ID"}}

    def drafts(self, model, clip, vae, prompts, first, count, size, steps, guidance, seed, sampler_name, scheduler,
               batch, sam=None, sam_model=None, detector=None, unique_id=None):
        try:
            from ..dynasyn.augment import AugmentConfig, drafts_with_masks
            from ..dynasyn.compose import found

            templates, nouns, descriptions = _prompt_bundle(prompts)
            if not 1 <= first <= len(templates):
                raise DynASynError(f"first = {first}, but Augment Prompts gave {len(templates)} prompts.")
            chosen = templates[first - 1:first - 1 + count]
            cfg = AugmentConfig(size=size, draft_steps=steps, guidance_scale=guidance, seed=seed, draft_batch=batch)
            segmenter = sam_module(sam, sam_model)
            renderer, pbar, total = _renderer(model, clip, vae, cfg, sampler_name, scheduler, unique_id,
                                              lambda r: len(chosen) * steps)
            kept, dropped = [], []
            with used_on_device(segmenter, detector.model if detector is not None else None):
                for k, draft, pseudo in drafts_with_masks(renderer, chosen, descriptions, len(nouns), cfg, sam=segmenter,
                                                          detector=detector, first=first - 1,
                                                          should_stop=mm.processing_interrupted):
                    missing = [nouns[i] for i in range(len(nouns)) if not found(pseudo[i], cfg.min_mask_pixels)]
                    (dropped if missing else kept).append((first + k, draft, pseudo, missing))
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(total, total)
            lines = [f"{len(kept)} drafts kept of {len(chosen)} (prompts {first} to {first + len(chosen) - 1})"]
            lines += [f"  prompt {k}: no pseudo-mask for {', '.join(missing)}" for k, _, _, missing in dropped]
            report = "\n".join(lines)
            if not kept:
                raise DynASynError(f"No draft showed every subject. {report.strip()}. Try other prompts, another seed "
                                   "or more steps.")
            return {"ui": {"text": [report]}, "result": (
                torch.stack([d.image for _, d, _, _ in kept]).float().cpu(),
                torch.cat([p for _, _, p, _ in kept]).float().cpu(),
                "\n".join(d.template.text for _, d, _, _ in kept),
                "\n".join(d.prompt for _, d, _, _ in kept),
                report)}
        except mm.InterruptProcessingException:
            raise
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


class DynASynCompose:
    DESCRIPTION = ("Augment's step 5 as its own node: the real subjects are cut from the reference with their masks and "
                   "pasted (aspect kept) where each draft's pseudo-mask put them. Outputs the composed images and the "
                   "inpaint MASK (1 = fill: where the draft's own subject still shows, grown by 'dilation') for any "
                   "inpaint graph: VAEEncode + SetLatentNoiseMask + KSampler on the same model, VAEEncodeForInpaint "
                   "with an inpainting model, or a ControlNet.")
    CATEGORY = "DynASyn/augment/stages"
    FUNCTION = "compose"
    RETURN_TYPES = ("IMAGE", "MASK", "MASK")
    RETURN_NAMES = ("composed", "inpaint_mask", "subject_masks")
    OUTPUT_TOOLTIPS = (
        "Each draft with the real subjects pasted.",
        "Per image, where to inpaint (1 = fill; never over a pasted subject).",
        "Where each pasted subject shows: one per subject per image, image 1's first (DynASyn Make Pair's masks).")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "reference": ("IMAGE", {"tooltip": "The reference picture (one image)."}),
            "masks": ("MASK", {"tooltip": "One mask per subject on the reference, in class-noun order."}),
            "drafts": ("IMAGE", {"tooltip": "The drafts (DynASyn Drafts, or any images)."}),
            "pseudo_masks": ("MASK", {"tooltip": "Where each subject is in each draft: one per subject per draft, draft 1's first (DynASyn Drafts' pseudo_masks)."}),
            "dilation": ("INT", {"default": 8, "min": 0, "max": 64, "tooltip": "Pixels the inpaint mask grows by around the draft's own subjects."}),
        }}

    def compose(self, reference, masks, drafts, pseudo_masks, dilation):
        try:
            from ..dynasyn.augment import AugmentConfig, compose

            ref = one_image(reference)
            ref_masks = masks if masks.ndim == 3 else masks[None]
            ref_masks = subject_masks(ref_masks, ref_masks.shape[0], ref.shape[:2])
            n = len(ref_masks)
            images = _batch(drafts, "drafts")
            pseudo = _per_image_masks(pseudo_masks, images.shape[0], n, images.shape[1:3], "pseudo-masks",
                                      "DynASyn Drafts' pseudo_masks output")
            cfg = AugmentConfig(inpaint_dilation=dilation)
            out = []
            for b in range(images.shape[0]):
                c = compose(images[b], pseudo[b * n:(b + 1) * n], ref, ref_masks, cfg)
                if c.skipped:
                    raise DynASynError(f"Draft {b + 1}: the pseudo-mask of subject(s) {[i + 1 for i in c.skipped]} is "
                                       f"empty or under {cfg.min_mask_pixels} pixels; drop that draft (DynASyn Drafts "
                                       "drops them itself).")
                out.append(c)
            return (torch.stack([c.image for c in out]), torch.stack([c.inpaint_mask for c in out]),
                    torch.cat([c.masks for c in out]))
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


class DynASynMakePair:
    DESCRIPTION = ("Augment's last step as its own node: an augmented IMAGE (made by any sampler, inpaint model or "
                   "ControlNet), its prompt with subject markers and its subject masks become (image, class-noun prompt, "
                   "pseudo-masks) training pairs. Connect 'dataset' to add to the pairs of another Make Pair / Augment / "
                   "Load Dataset, so several pairs make one dataset for DynASyn Train or Save Dataset. With a SAM, the "
                   "masks are found again on the image (pose and outline changed since pasting), as Augment does.")
    CATEGORY = "DynASyn/augment/stages"
    FUNCTION = "make_pair"
    RETURN_TYPES = ("DYNASYN_DATASET", "STRING")
    RETURN_NAMES = ("dataset", "report")
    OUTPUT_TOOLTIPS = ("The connected dataset's pairs followed by the new ones.", "What was added.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE", {"tooltip": "The augmented image(s)."}),
            "prompt": ("STRING", {"default": "[1] hugging [2] on a beach", "multiline": True, "tooltip": (
                "Each image's prompt with the subjects as markers [1], [2] ... in class-noun order, one line per "
                "image (or one line for all); DynASyn Drafts' 'templates' output. Written with the class nouns for "
                "training.")}),
            "class_nouns": ("STRING", {"default": "panda, bowl", "tooltip": "What each subject is, comma-separated (as for Train)."}),
            "masks": ("MASK", {"tooltip": "Where each subject is in each image: one per subject per image, image 1's first (DynASyn Compose's subject_masks)."}),
        }, "optional": {
            "dataset": ("DYNASYN_DATASET", {"tooltip": "Pairs to add the new ones to (from another Make Pair, Augment or Load Dataset)."}),
            **SAM_INPUTS,
        }}

    def make_pair(self, image, prompt, class_nouns, masks, dataset=None, sam=None, sam_model=None):
        try:
            from ..dynasyn.augment import AugmentConfig, make_pair
            from ..dynasyn.compose import found
            from ..dynasyn.prompts import pair_prompt

            nouns = _nouns(class_nouns)
            n = len(nouns)
            images = _batch(image, "image")
            count = images.shape[0]
            lines = _lines(prompt)
            if len(lines) == 1:
                lines = lines * count
            if len(lines) != count:
                raise DynASynError(f"{len(lines)} prompts for {count} images: one prompt per image (a line each), or "
                                   "one for all.")
            templates = [pair_prompt(line, n) for line in lines]
            per_image = _per_image_masks(masks, count, n, images.shape[1:3], "masks", "DynASyn Compose's subject_masks")
            for b, t in enumerate(templates):
                empty = [i + 1 for i in t.subjects if not found(per_image[b * n + i])]
                if empty:
                    raise DynASynError(f"Image {b + 1}: the mask of subject(s) {empty} is empty, but its prompt "
                                       f"{t.text!r} names them.")
            if dataset is not None and not isinstance(dataset, list):
                raise DynASynError("The 'dataset' input is not a DynASyn dataset.")
            segmenter = sam_module(sam, sam_model)
            cfg = AugmentConfig(pseudo_masks="resegmented" if segmenter is not None else "pasted")
            with used_on_device(segmenter):
                pairs = [make_pair(images[b].cpu(), t, nouns, per_image[b * n:(b + 1) * n].cpu(), cfg, sam=segmenter,
                                   meta={"made_by": "DynASyn Make Pair"})
                         for b, t in enumerate(templates)]
            for p in pairs:
                p.validate(n, nouns)
            out = list(dataset or []) + pairs  # a new list: the connected node's cached output stays as it was
            report = (f"{len(pairs)} pair(s) added ({len(out)} in the dataset); masks "
                      f"{'found again by SAM' if segmenter is not None else 'as given'}")
            return {"ui": {"text": [report], "dynasyn_gallery": gallery_ui(pairs)}, "result": (out, report)}
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


def _keep_made(pairs, why: str) -> str | None:
    """Cancel or a failure loses nothing: the pairs made before it go to a dataset folder of their own
    (output/dynasyn/datasets/<why>[_NNN]); returns that folder, or None when there was nothing to keep or it
    could not be written (the original error is then what the user sees)."""
    if not pairs:
        return None
    from ..dynasyn.dataset import save_dataset

    try:
        root = _datasets_dir()
        os.makedirs(root, exist_ok=True)
        folder = str(save_dataset(pairs, os.path.join(root, unique_name(root, why, suffix=""))))
    except Exception:  # noqa: BLE001
        log.exception("[DynASyn] augmentation %s and the %d pairs made so far could not be saved", why, len(pairs))
        return None
    log.warning("[DynASyn] augmentation %s: the %d pairs made so far are in %s (DynASyn Load Dataset reads it)",
                why, len(pairs), folder)
    return folder


class DynASynSaveDataset:
    DESCRIPTION = ("Writes the augmented dataset (PNG images + masks + dataset.json) to ComfyUI/user/__dynasyn/datasets/"
                   "<name> (a folder ComfyUI does not serve); an existing folder is never overwritten (a number is added). Load it in another workflow with "
                   "DynASyn Load Dataset.")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING", "DYNASYN_DATASET")
    RETURN_NAMES = ("folder", "dataset")
    OUTPUT_TOOLTIPS = ("The folder written.",
                       "The same dataset, passed on: link DynASyn Train here so the dataset is on disk before training starts.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "dataset": ("DYNASYN_DATASET", {"tooltip": "From DynASyn Augment or Load Dataset."}),
            "name": ("STRING", {"default": "dynasyn_dataset", "tooltip": "Dataset name (a folder under ComfyUI/user/__dynasyn/datasets): letters, digits, '_', '-', '.'."}),
        }}

    def save(self, dataset, name):
        try:
            from ..dynasyn.dataset import save_dataset

            validate_export_name(name, "dataset")
            root = _datasets_dir()
            os.makedirs(root, exist_ok=True)
            folder = save_dataset(dataset, os.path.join(root, unique_name(root, name, suffix="")))
            log.info("[DynASyn] dataset of %d pairs written to %s", len(dataset), folder)
            return {"ui": {"text": [str(folder)], "dynasyn_gallery": gallery_ui(dataset)}, "result": (str(folder), dataset)}
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e


class DynASynLoadDataset:
    DESCRIPTION = ("Reads a dataset written by DynASyn Save Dataset, picked by name from ComfyUI/user/__dynasyn/datasets. "
                   "Nothing else is read: no paths, every file of the dataset checked to be a PNG inside its folder.")
    CATEGORY = "DynASyn/augment"
    FUNCTION = "load"
    RETURN_TYPES = ("DYNASYN_DATASET", "IMAGE", "STRING")
    RETURN_NAMES = ("dataset", "images", "prompts")
    OUTPUT_TOOLTIPS = ("The pairs, for DynASyn Train.", "Its images.", "Its class-noun prompts, one per line.")

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"folder": (list_datasets() or [DEFAULT_DATASET], {"tooltip": (
            "A dataset written by DynASyn Save Dataset (its name under ComfyUI/user/__dynasyn/datasets; "
            "'cancelled…' ones hold the pairs of a cancelled Augment).")})}}

    @classmethod
    def IS_CHANGED(cls, folder):
        try:
            path = _dataset_path(folder)  # validated before any filesystem call
        except DynASynError:
            return float("nan")
        index = os.path.join(path, "dataset.json")
        if os.path.islink(path) or os.path.islink(index) or not os.path.isfile(index):
            return float("nan")
        return os.path.getmtime(index)

    def load(self, folder):
        try:
            from ..dynasyn.dataset import load_dataset

            path = _dataset_path(folder)
            if folder not in list_datasets():
                raise DynASynError(f"There is no dataset named {folder!r} yet: write one with DynASyn Save Dataset "
                                   "(dynasyn_augment.json), then refresh.")
            pairs = load_dataset(path)
            return {"ui": {"dynasyn_gallery": gallery_ui(pairs)},
                    "result": (pairs, _gallery(pairs), "\n".join(p.class_prompt for p in pairs))}
        except Exception as e:  # noqa: BLE001
            raise user_error(e) from e
