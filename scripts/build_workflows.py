"""Regenerates workflows/*.json and their .jpg thumbnails by building each graph in the real page.

    .venv/bin/python scripts/build_workflows.py

The page itself lays out the widgets (so widgets_values are exactly what the frontend saves);
this file only says which nodes, which values differ from the defaults, and how they connect.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo import example  # noqa: E402
from demo.server import ComfyServer  # noqa: E402
from tests.support.page import prepare_server, run_page  # noqa: E402

OUT = ROOT / "workflows"
SD15 = {"name": "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors"}
SAM_B = {"name": "sam_vit_b_01ec64.pth", "directory": "sams",
         "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"}
NOTE_COLOR = ["#432", "#653"]
SCENE = "[1] rolling next to [2] on a sunny beach"


def note(id_, pos, text, width=420):
    return {"id": id_, "type": "Note", "pos": pos, "size": [width, 300], "widgets": {"": text}, "color": NOTE_COLOR}


def checkpoint(id_, pos, name=SD15["name"], models=(SD15,)):
    return {"id": id_, "type": "CheckpointLoaderSimple", "pos": pos, "widgets": {"ckpt_name": name},
            "properties": {"models": [dict(m) for m in models]}}


def reference_and_masks(x, y):
    """LoadImage + one LoadImageMask per subject + DynASyn Subject Masks (ids 10-13)."""
    return [
        {"id": 10, "type": "LoadImage", "pos": [x, y], "widgets": {"image": example.IMAGE}},
        {"id": 11, "type": "LoadImageMask", "pos": [x, y + 380], "widgets": {"image": example.MASKS[0], "channel": "red"}},
        {"id": 12, "type": "LoadImageMask", "pos": [x, y + 720], "widgets": {"image": example.MASKS[1], "channel": "red"}},
        {"id": 13, "type": "DynASynMaskBatch", "pos": [x + 340, y + 560], "links": {"mask_1": [11, 0], "mask_2": [12, 0]}},
    ]


def describe_and_prompts(x, y, image, masks):
    return [
        {"id": 20, "type": "DynASynDescribeSubjects", "pos": [x, y], "links": {"image": image, "masks": masks},
         "widgets": {"class_nouns": example.CLASS_NOUNS}},
        {"id": 21, "type": "DynASynAugmentPrompts", "pos": [x, y + 380],
         "links": {"descriptions": [20, "descriptions"], "class_nouns": [20, "class_nouns"]},
         "widgets": {"class_nouns": example.CLASS_NOUNS}},
    ]


def augment(x, y, image, masks, sam):
    return [
        {"id": 30, "type": "DynASynAugment", "pos": [x, y], "size": [380, 720],
         "links": {"model": [1, "MODEL"], "clip": [1, "CLIP"], "vae": [1, "VAE"], "image": image, "masks": masks,
                   "prompts": [21, "prompts"], "sam": sam}},
        {"id": 31, "type": "DynASynSaveDataset", "pos": [x + 420, y], "links": {"dataset": [30, "dataset"]}},
        {"id": 32, "type": "SaveImage", "pos": [x + 420, y + 200], "links": {"images": [30, "augmented"]},
         "widgets": {"filename_prefix": "dynasyn/augmented"}},
    ]


def train_and_sample(x, y, image, masks, nouns, dataset):
    return [
        {"id": 40, "type": "DynASynTrain", "pos": [x, y], "size": [400, 1240],
         "links": {"model": [1, "MODEL"], "clip": [1, "CLIP"], "vae": [1, "VAE"], "image": image, "masks": masks,
                   **({"class_nouns": nouns} if nouns else {}), "dataset": dataset},
         "widgets": {"class_nouns": example.CLASS_NOUNS, "new_prompt": SCENE}},
        {"id": 41, "type": "SaveImage", "pos": [x + 440, y + 760], "links": {"images": [40, "loss_curve"]},
         "widgets": {"filename_prefix": "dynasyn/loss"}},
        *sample(x + 440, y, model=[40, "MODEL"], clip=[40, "CLIP"], vae=[1, "VAE"], text_link=[40, "prompt"]),
    ]


def sample(x, y, model, clip, vae, text_link=None, text=""):
    positive = {"id": 50, "type": "CLIPTextEncode", "pos": [x, y], "links": {"clip": clip}, "widgets": {"text": text}}
    if text_link:
        positive["links"]["text"] = text_link
    return [
        positive,
        {"id": 51, "type": "CLIPTextEncode", "pos": [x, y + 200], "links": {"clip": clip},
         "widgets": {"text": "blurry, low quality, deformed"}},
        {"id": 52, "type": "EmptyLatentImage", "pos": [x, y + 400], "widgets": {"width": 512, "height": 512, "batch_size": 2}},
        {"id": 53, "type": "KSampler", "pos": [x + 400, y],
         "links": {"model": model, "positive": [50, 0], "negative": [51, 0], "latent_image": [52, 0]},
         "widgets": {"seed": 0, "steps": 30, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras"}},
        {"id": 54, "type": "VAEDecode", "pos": [x + 400, y + 500], "links": {"samples": [53, 0], "vae": vae}},
        {"id": 55, "type": "SaveImage", "pos": [x + 700, y], "links": {"images": [54, 0]},
         "widgets": {"filename_prefix": "dynasyn/sample"}},
    ]


FULL_NOTE = f"""DynASyn: teach SD 1.5 / 2.1 the subjects of ONE picture, then draw them doing new things.

1. Load your picture (LoadImage) and one black-and-white mask per subject (LoadImageMask, channel red), in subject order. \
Or paint them with LoadImage's mask editor, or use DynASyn SAM Masks (see dynasyn_augment.json).
2. Describe Subjects: write what each subject is in class_nouns ("ball, box"). It feeds the other nodes.
3. Augment makes K = 30 new scenes (drafts, paste, inpaint, Guided SDE Augmentation); they are saved as a dataset folder.
4. Train: about 800 steps (phase 1 tokens, phase 2 tokens + UNet + text encoder). Cancel keeps a resumable state.
   new_prompt is the scene to draw: [1] = subject 1, [2] = subject 2.
5. KSampler draws it with the trained MODEL/CLIP. The embeddings (models/embeddings/dynasyn_assetN) and a checkpoint \
(models/checkpoints/dynasyn.safetensors) also work with stock nodes: see dynasyn_sample.json.

Models: {SD15['name']} in models/checkpoints; {SAM_B['name']} in models/sams (optional: disconnect 'sam' to use the attention maps).
Memory: a 10 GB GPU fits training with optimizer = adafactor, gradient_checkpointing and fused_backward_step on (README).
LLM/VLM: set mode to llm / vlm and the endpoint (Ollama, LM Studio, vLLM, OpenAI). The API key is read from the \
DYNASYN_API_KEY environment variable or ~/.config/dynasyn/api_key, never stored in the workflow."""

AUGMENT_NOTE = f"""DynASyn, augmentation only: one picture -> a dataset folder of new scenes for DynASyn Train.

1. LoadImage: your picture. DynASyn SAM Masks: pick each subject on the picture (box = drag, points = click; choose the \
subject first); the picks are stored in subject_prompts and saved with the workflow.
2. Describe Subjects: the class nouns ("ball, box"); offline uses them as descriptions, vlm asks a vision model.
3. Augment Prompts: K scenes of the subjects alone and together (offline generator, or an LLM).
4. Augment draws each scene, pastes your real subjects in, inpaints the gaps and runs Guided SDE Augmentation (t = 700).
5. Save Dataset writes user/__dynasyn/datasets/dynasyn_dataset (PNG + masks + dataset.json); train from it with \
dynasyn_train.json.

Models: {SD15['name']} in models/checkpoints, {SAM_B['name']} in models/sams."""

TRAIN_NOTE = """DynASyn, training from a saved dataset folder.

1. LoadImage + LoadImageMask: the same picture and masks the dataset was made from, in subject order.
2. Load Dataset: pick the dataset (a folder under user/__dynasyn/datasets, as written by dynasyn_augment.json).
3. Train: class_nouns in mask order; new_prompt is the scene to draw ([1], [2]...). Defaults follow the paper \
(400 + 400 steps, lr 5e-4 then 2e-6, lambda 1 / 0.01 / 0.01 / 0.01).
Outputs: models/embeddings/<run>_assetN.safetensors, models/checkpoints/<run>.safetensors, the loss curve, and samples."""

SAMPLE_NOTE = """Sampling with a DynASyn result using only stock ComfyUI nodes.

Load the exported checkpoint (models/checkpoints/dynasyn.safetensors) and write the subjects as embedding:<run>_assetN \
in any prompt, e.g. "embedding:dynasyn_asset0 rolling next to embedding:dynasyn_asset1 on a sunny beach".
The embeddings live in models/embeddings; the checkpoint carries the trained UNet and text encoder."""


def workflows() -> dict[str, list[dict]]:
    img, masks = [10, "IMAGE"], [13, "masks"]
    full = [checkpoint(1, [0, 0], models=(SD15,)), note(2, [0, 200], FULL_NOTE), *reference_and_masks(460, 0),
            {"id": 14, "type": "DynASynSAMLoader", "pos": [900, 900], "widgets": {"sam_name": SAM_B["name"]},
             "properties": {"models": [dict(SAM_B)]}},
            *describe_and_prompts(900, 0, img, masks), *augment(1320, 0, img, masks, [14, 0]),
            *train_and_sample(2160, 0, img, masks, [20, "class_nouns"], [31, "dataset"])]
    aug = [checkpoint(1, [0, 0]), note(2, [0, 200], AUGMENT_NOTE),
           {"id": 10, "type": "LoadImage", "pos": [460, 0], "widgets": {"image": example.IMAGE}},
           {"id": 14, "type": "DynASynSAMLoader", "pos": [460, 420], "widgets": {"sam_name": SAM_B["name"]},
            "properties": {"models": [dict(SAM_B)]}},
           {"id": 15, "type": "DynASynSAMMasks", "pos": [820, 0], "size": [380, 620],
            "links": {"sam": [14, 0], "image": [10, "IMAGE"]},
            "widgets": {"subject_prompts": json.dumps([{"box": [80, 225, 245, 395]}, {"box": [285, 170, 465, 395]}])}},
           *describe_and_prompts(1240, 0, img, [15, "masks"]), *augment(1660, 0, img, [15, "masks"], [14, 0]),
           {"id": 33, "type": "PreviewImage", "pos": [2080, 500], "links": {"images": [30, "drafts"]}}]
    train = [checkpoint(1, [0, 0]), note(2, [0, 200], TRAIN_NOTE), *reference_and_masks(460, 0),
             {"id": 16, "type": "DynASynLoadDataset", "pos": [900, 0], "widgets": {"folder": "dynasyn_dataset"}},
             *train_and_sample(1320, 0, img, masks, None, [16, "dataset"])]
    samp = [checkpoint(1, [0, 0], name="dynasyn.safetensors", models=()), note(2, [0, 200], SAMPLE_NOTE),
            *sample(460, 0, model=[1, "MODEL"], clip=[1, "CLIP"], vae=[1, "VAE"],
                    text="embedding:dynasyn_asset0 rolling next to embedding:dynasyn_asset1 on a sunny beach")]
    return {"dynasyn_full": full, "dynasyn_augment": aug, "dynasyn_train": train, "dynasyn_sample": samp}


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d, ComfyServer(Path(d)) as server:
        example.write(Path(d) / "input")
        prepare_server(server)
        for name, nodes in workflows().items():
            res = run_page(server, "build_workflow", {"spec": {"nodes": nodes}, "thumbnail": str(OUT / f"{name}.jpg")})
            if res["pageErrors"]:
                raise SystemExit(f"{name}: page errors {res['pageErrors']}")
            wf = res["value"]
            (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
            print(f"{name}: {len(wf['nodes'])} nodes, {len(wf['links'])} links")


if __name__ == "__main__":
    main()
