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


LLM_INPUTS = {
    "endpoint": ("STRING", {"default": DEFAULT_ENDPOINT, "tooltip": (
        "OpenAI-compatible base URL: Ollama http://127.0.0.1:11434/v1, LM Studio http://127.0.0.1:1234/v1, vLLM, or "
        "https://api.openai.com/v1. The key comes from the DYNASYN_API_KEY (or OPENAI_API_KEY) environment variable "
        "or ~/.config/dynasyn/api_key, never from the workflow, and is sent only to hosts the operator lists in "
        "DYNASYN_API_HOSTS (default api.openai.com); other endpoints get no key. No '?', '#' or credentials.")}),
    "timeout": ("FLOAT", {"default": 120.0, "min": 1.0, "max": 3600.0, "step": 1.0, "tooltip": (
        "Seconds the node waits for the model in all (every subject's call, retries after 429 / 5xx replies included).")}),
}


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
        }}

    def describe(self, image, masks, class_nouns, mode, model, endpoint, timeout, seed, phrases=""):
        try:
            from ..dynasyn.describe import describe_subjects
            from ..dynasyn.llm import resolve_api_key

            nouns = _nouns(class_nouns)
            ref = one_image(image)
            ms = subject_masks(masks, len(nouns), ref.shape[:2])
            if mode == "offline":
                out = describe_subjects(ref, ms, nouns, phrases=phrases.splitlines())
            else:
                out = describe_subjects(ref, ms, nouns, base_url=endpoint, model=model, api_key=resolve_api_key(endpoint),
                                        seed=seed, cache_dir=_cache_dir(), timeout=timeout,
                                        should_stop=mm.processing_interrupted)
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
        }}

    def prompts(self, descriptions, class_nouns, count, mode, model, endpoint, timeout, seed):
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
                templates, dropped = llm_prompts(descs, count, base_url=endpoint, model=model, seed=seed,
                                                 api_key=resolve_api_key(endpoint), cache_dir=_cache_dir(), timeout=timeout,
                                                 should_stop=mm.processing_interrupted)
            if dropped:
                log.info("[DynASyn] %d of the LLM's prompts were invalid or duplicates and were dropped.", dropped)
            text = "\n".join(t.render(descs) for t in templates)
            bundle = {"templates": templates, "descriptions": descs, "class_nouns": nouns, "dropped": dropped}
            return {"ui": {"text": [text]}, "result": (bundle, text)}
        except Exception as e:  # noqa: BLE001
            _interrupt_if_cancelled(e)
            raise user_error(e) from e


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
            "sam": ("DYNASYN_SAM", {"tooltip": "SAM for the pseudo-masks (recommended); without it the attention map is the mask."}),
            "detector": ("DYNASYN_DETECTOR", {"tooltip": "Optional zero-shot detector: finds each subject by its description "
                                                         "(its box prompts SAM) instead of by its attention."}),
        }, "hidden": {"unique_id": "UNIQUE_ID"}}

    def augment(self, model, clip, vae, image, masks, prompts, size, draft_steps, inpaint_steps, gsa_strength, gsa_steps,
                gsa_sampler, paper_exact, guidance, seed, draft_sampler="euler", draft_scheduler="normal", draft_batch=4,
                pseudo_masks="resegmented", sam=None, detector=None, unique_id=None):
        try:
            from ..dynasyn.augment import AugmentConfig, augment
            from ..dynasyn.gsa import GSAConfig
            from .bridge import model_family
            from .comfy_render import ComfyRenderer

            model_family(model)  # Train's check, first: no hours of sampling on a model the method does not fit
            ref = one_image(image)
            nouns = prompts["class_nouns"]
            ms = subject_masks(masks, len(nouns), ref.shape[:2])
            cfg = AugmentConfig(size=size, draft_steps=draft_steps, inpaint_steps=inpaint_steps, guidance_scale=guidance,
                                seed=seed, draft_batch=draft_batch, pseudo_masks=pseudo_masks,
                                gsa=GSAConfig(strength=gsa_strength, steps=gsa_steps, sampler=gsa_sampler,
                                              guidance_scale=guidance, paper_exact=paper_exact))
            templates = prompts["templates"]
            # one bar over every UNet evaluation of the stage, with the latest step's preview
            renderer = ComfyRenderer(model, clip, vae, cfg, draft_sampler, draft_scheduler)
            total = renderer.planned_evaluations(len(templates))
            pbar = comfy.utils.ProgressBar(total, node_id=unique_id)
            renderer.step = lambda done, preview: pbar.update_absolute(min(done, total), total, preview)
            sam_model = sam["model"].to(mm.get_torch_device()) if sam else None
            made = []
            try:
                report = augment(renderer, ref, ms, nouns, prompts["descriptions"], templates, cfg, sam=sam_model,
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
