"""Regenerates example_workflows/*.json and their .jpg thumbnails by building each graph in the real page.

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

from dynasyn.example_scene import BALL_AND_BOX, SHAPES_PAIR, example_scene as draw_scene  # noqa: E402
from demo.server import ComfyServer  # noqa: E402
from tests.support.page import prepare_server, run_page  # noqa: E402

OUT = ROOT / "example_workflows"
SD15 = {"name": "v1-5-pruned-emaonly.safetensors", "directory": "checkpoints",
        "url": "https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/resolve/main/v1-5-pruned-emaonly.safetensors"}
SAM_B = {"name": "sam_vit_b_01ec64.pth", "directory": "sams",
         "url": "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"}
NOTE_COLOR = ["#432", "#653"]
MUTED = 2  # LiteGraph's "never" mode (Ctrl+M): the page leaves the node and its links out of the prompt
SCENE = "[1] rolling next to [2] on a sunny beach"
# what a linked class_nouns widget shows once its link is removed: the Example Scene's own nouns
NOUNS = draw_scene(BALL_AND_BOX).class_nouns


def note(id_, pos, text, width=420):
    return {"id": id_, "type": "Note", "pos": pos, "size": [width, 300], "widgets": {"": text}, "color": NOTE_COLOR}


def checkpoint(id_, pos, name=SD15["name"], models=(SD15,)):
    return {"id": id_, "type": "CheckpointLoaderSimple", "pos": pos, "widgets": {"ckpt_name": name},
            "properties": {"models": [dict(m) for m in models]}}


def sample(x, y, model, clip, vae, text_link=None, text="", settings=None, latent=(512, 512, 2), prefix="dynasyn/sample",
           negative="blurry, low quality, deformed"):
    """Stock sampling: CLIPTextEncode (+ a negative) -> KSampler -> VAEDecode -> SaveImage (ids 50-55)."""
    positive = {"id": 50, "type": "CLIPTextEncode", "pos": [x, y], "links": {"clip": clip}, "widgets": {"text": text}}
    if text_link:
        positive["links"]["text"] = text_link
    w, h, batch = latent
    return [
        positive,
        {"id": 51, "type": "CLIPTextEncode", "pos": [x, y + 200], "links": {"clip": clip},
         "widgets": {"text": negative}},
        {"id": 52, "type": "EmptyLatentImage", "pos": [x, y + 400], "widgets": {"width": w, "height": h, "batch_size": batch}},
        {"id": 53, "type": "KSampler", "pos": [x + 400, y],
         "links": {"model": model, "positive": [50, 0], "negative": [51, 0], "latent_image": [52, 0]},
         "widgets": {"seed": 0, "steps": 30, "cfg": 7.5, "sampler_name": "dpmpp_2m", "scheduler": "karras", **(settings or {})}},
        {"id": 54, "type": "VAEDecode", "pos": [x + 400, y + 500], "links": {"samples": [53, 0], "vae": vae}},
        {"id": 55, "type": "SaveImage", "pos": [x + 700, y], "links": {"images": [54, 0]},
         "widgets": {"filename_prefix": prefix}},
    ]


def example_scene(x, y, scene=BALL_AND_BOX, id_=10):
    """DynASyn Example Scene: the bundled picture, its masks and class nouns, drawn by the node (no file to load)."""
    return [{"id": id_, "type": "DynASynExampleScene", "pos": [x, y], "size": [320, 320], "widgets": {"scene": scene}}]


def describe_and_prompts(x, y, image, masks, nouns, count=None, phrases=None):
    return [
        {"id": 20, "type": "DynASynDescribeSubjects", "pos": [x, y], "links": {"image": image, "masks": masks, "class_nouns": nouns},
         "widgets": {"class_nouns": NOUNS, **({"phrases": phrases} if phrases else {})}},
        {"id": 21, "type": "DynASynAugmentPrompts", "pos": [x, y + 320],
         "links": {"descriptions": [20, "descriptions"], "class_nouns": [20, "class_nouns"]},
         "widgets": {"class_nouns": NOUNS, **({"count": count} if count else {})}},
    ]


def augment(x, y, model, image, masks, sam=None, settings=None, save=True):
    links = {"model": [model, "MODEL"], "clip": [model, "CLIP"], "vae": [model, "VAE"], "image": image, "masks": masks,
             "prompts": [21, "prompts"], **({"sam": sam} if sam else {})}
    nodes = [{"id": 30, "type": "DynASynAugment", "pos": [x, y], "size": [380, 760], "links": links,
              **({"widgets": settings} if settings else {})}]
    if save:
        nodes += [
            {"id": 31, "type": "DynASynSaveDataset", "pos": [x + 420, y], "links": {"dataset": [30, "dataset"]}},
            {"id": 32, "type": "SaveImage", "pos": [x + 420, y + 300], "links": {"images": [30, "augmented"]},
             "widgets": {"filename_prefix": "dynasyn/augmented"}},
        ]
    return nodes


def stages_chain(x, y, model, image, masks, nouns):
    """Augmentation one stage per node (ids 60-69): Drafts -> Compose -> stock inpaint (VAEEncode +
    SetLatentNoiseMask + KSampler) -> GSA -> Make Pair, plus a muted Load Dataset whose pairs Make Pair adds when
    unmuted. One prompt, so the drafts' text is exactly that prompt's conditioning."""
    m, c, v = [model, "MODEL"], [model, "CLIP"], [model, "VAE"]
    return [
        {"id": 60, "type": "DynASynDrafts", "pos": [x, y], "links": {"model": m, "clip": c, "vae": v, "prompts": [21, "prompts"]}},
        {"id": 61, "type": "DynASynCompose", "pos": [x, y + 520],
         "links": {"reference": image, "masks": masks, "drafts": [60, "drafts"], "pseudo_masks": [60, "pseudo_masks"]}},
        {"id": 62, "type": "CLIPTextEncode", "pos": [x + 380, y], "links": {"clip": c, "text": [60, "text"]}},
        {"id": 63, "type": "CLIPTextEncode", "pos": [x + 380, y + 160], "links": {"clip": c},
         "widgets": {"text": "blurry, low quality, deformed"}},
        {"id": 64, "type": "VAEEncode", "pos": [x + 380, y + 400], "links": {"pixels": [61, "composed"], "vae": v}},
        {"id": 65, "type": "SetLatentNoiseMask", "pos": [x + 380, y + 520],
         "links": {"samples": [64, 0], "mask": [61, "inpaint_mask"]}},
        {"id": 66, "type": "KSampler", "pos": [x + 700, y],
         "links": {"model": m, "positive": [62, 0], "negative": [63, 0], "latent_image": [65, 0]},
         "widgets": {"seed": 0, "steps": 25, "cfg": 7.5, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        {"id": 67, "type": "VAEDecode", "pos": [x + 700, y + 500], "links": {"samples": [66, 0], "vae": v}},
        {"id": 68, "type": "DynASynGSA", "pos": [x + 960, y],
         "links": {"model": m, "positive": [62, 0], "negative": [63, 0], "vae": v, "image": [67, 0]}},
        {"id": 16, "type": "DynASynLoadDataset", "pos": [x + 960, y + 440], "mode": MUTED, "title": "DynASyn Load Dataset (muted)",
         "widgets": {"folder": "dynasyn_dataset"}},
        {"id": 69, "type": "DynASynMakePair", "pos": [x + 960, y + 620], "size": [300, 300],
         "links": {"image": [68, "image"], "prompt": [60, "templates"], "class_nouns": nouns, "masks": [61, "subject_masks"],
                   "dataset": [16, "dataset"]},
         "widgets": {"class_nouns": NOUNS}},
    ]


def train(x, y, model, image, masks, nouns, dataset, settings=None, scene=None):
    """Train (+ its loss curve) and the Scene Prompt that writes the new scene with the run's words: editing the
    scene re-runs only that light node, never Train."""
    return [
        {"id": 40, "type": "DynASynTrain", "pos": [x, y], "size": [400, 1240],
         "links": {"model": [model, "MODEL"], "clip": [model, "CLIP"], "vae": [model, "VAE"], "image": image,
                   "masks": masks, "class_nouns": nouns, **({"dataset": dataset} if dataset else {})},
         "widgets": {"class_nouns": NOUNS, **(settings or {})}},
        {"id": 41, "type": "SaveImage", "pos": [x + 440, y], "links": {"images": [40, "loss_curve"]},
         "widgets": {"filename_prefix": "dynasyn/loss"}},
        {"id": 42, "type": "DynASynScenePrompt", "pos": [x + 440, y + 340], "size": [320, 160],
         "links": {"run": [40, "run"]}, "widgets": {"scene": scene or SCENE}},
    ]


FULL_NOTE = f"""DynASyn: teach SD 1.5 / 2.1 the subjects of ONE picture, then draw them doing new things.

1. Inputs: DynASyn Example Scene gives the bundled picture, one mask per subject and the class nouns ("ball, box"). \
For your own picture use LoadImage + one mask per subject (LoadImageMask into DynASyn Subject Masks, or DynASyn SAM \
Masks, see dynasyn_augment.json) and write the class nouns in Describe Subjects.
2. Augment: Describe Subjects and Augment Prompts write K = 30 new scenes; Augment draws them (drafts, paste, inpaint, \
Guided SDE Augmentation) and Save Dataset keeps them as a dataset folder.
3. Train: about 800 steps (phase 1 tokens, phase 2 tokens + UNet + text encoder). Cancel keeps a resumable state.
   Scene Prompt writes the scene to draw: [1] = subject 1, [2] = subject 2 (editing it never retrains: the same
   inputs load the finished run).
4. Sample: KSampler draws it with the trained MODEL/CLIP. The embeddings (models/embeddings/dynasyn_ball, \
dynasyn_box) and a checkpoint (models/checkpoints/dynasyn.safetensors) also work with stock nodes: see \
dynasyn_sample.json; DynASyn Load Run reuses the finished run in any workflow.

Models: {SD15['name']} in models/checkpoints; {SAM_B['name']} in models/sams (optional: disconnect 'sam' to use the attention maps).
Memory: a 10 GB GPU fits training with optimizer = adafactor, gradient_checkpointing and fused_backward_step on (README).
LLM/VLM: set mode to llm / vlm and the endpoint (Ollama, LM Studio, vLLM, OpenAI). The API key is read from the \
DYNASYN_API_KEY environment variable or ~/.config/dynasyn/api_key, never stored in the workflow."""

AUGMENT_NOTE = f"""DynASyn, augmentation only: one picture -> a dataset folder of new scenes for DynASyn Train.

1. DynASyn Example Scene: the bundled picture (or your picture from LoadImage). DynASyn SAM Masks: pick each subject \
on the picture (box = drag, points = click; choose the subject first; the picture shows after the first Queue); the \
picks are stored in subject_prompts and saved with the workflow.
2. Describe Subjects: the class nouns ("ball, box"); offline uses them as descriptions, vlm asks a vision model.
3. Augment Prompts: K scenes of the subjects alone and together (offline generator, or an LLM).
4. Augment draws each scene, pastes your real subjects in, inpaints the gaps and runs Guided SDE Augmentation (t = 700).
5. Save Dataset writes user/__dynasyn/datasets/dynasyn_dataset (PNG + masks + dataset.json); train from it with \
dynasyn_train.json.

Models: {SD15['name']} in models/checkpoints, {SAM_B['name']} in models/sams."""

TRAIN_NOTE = f"""DynASyn, training on augmented pictures made with any ComfyUI sampler (the stage nodes).

1. DynASyn Example Scene: the picture, masks and class nouns (for your own: LoadImage + one mask per subject, in \
subject order, and the class nouns in Describe Subjects).
2. Augment, one stage per node, so you can swap any of them (another inpaint model, a ControlNet...):
   Augment Prompts writes scenes; DynASyn Drafts draws prompt 'first' and finds where each subject landed; DynASyn \
Compose pastes the real subjects there; VAEEncode + SetLatentNoiseMask + KSampler inpaint the gaps; DynASyn Guided \
SDE Augmentation blends them (t = 700); DynASyn Make Pair turns the picture into a training pair.
   One pair per chain: for more, copy the chain from Drafts to Make Pair with first = 2, 3... and link each Make \
Pair's dataset into the next one's 'dataset'.
3. DynASyn Load Dataset is muted (Ctrl+M unmutes it): unmuted, the pairs of a dataset saved by dynasyn_augment.json \
(user/__dynasyn/datasets) are added to these.
4. Train, then Scene Prompt: the scene to draw ([1], [2]...). Defaults follow the paper (400 + 400 steps, lr 5e-4 \
then 2e-6, lambda 1 / 0.01 / 0.01 / 0.01).
Outputs: models/embeddings/<run>_<noun>.safetensors, models/checkpoints/<run>.safetensors, the loss curve, and samples.

Models: {SD15['name']} in models/checkpoints."""

SAMPLE_NOTE = """Sampling with a DynASyn result using only stock ComfyUI nodes.

Load the exported checkpoint (models/checkpoints/dynasyn.safetensors) and write the subjects as embedding:<run>_<noun> \
in any prompt, e.g. "embedding:dynasyn_ball rolling next to embedding:dynasyn_box on a sunny beach".
The embeddings live in models/embeddings; the checkpoint carries the trained UNet and text encoder."""

# The Shapes World run: small enough for a CPU, nothing to download. The learning rates are 10x / 50x the paper's
# (tuned for 400 + 400 steps of SD at 512 px), as in bench/fidelity.py: with 200 + 200 steps of this small model the
# paper's barely move the subjects' tokens; phase 2 at 5e-4 draws their colours more often but breaks the pictures.
SHAPES_AUGMENT = {"size": 64, "draft_steps": 10, "inpaint_steps": 8, "gsa_steps": 20, "guidance": 5.0, "draft_batch": 6}
SHAPES_TRAIN = {"phase1_steps": 200, "phase2_steps": 200, "phase1_lr": 5e-3, "phase2_lr": 1e-4, "resolution": 64,
                "preview_every": 20, "run_name": "shapes_world", "save_as": "embeddings"}
SHAPES_PROMPTS = 6
SHAPES_SAMPLE = {"steps": 20, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}
SHAPES_SCENE = "[1] right of [2] in the snow"
# Describe Subjects offline with the Example Scene's subjects in words: the augmentation prompts then describe each
# subject by its look, so GSA keeps it (with the bare class nouns it turns them into plain balls and boxes)
SHAPES_PHRASES = "a green and blue dotted ball\na red and yellow striped box"
# measured with this workflow as shipped (tests/integration/test_templates_in_server.py runs it): update when it changes
SHAPES_MEASURED = ("94 s after ComfyUI's 7 s start (augment 7 s, train 83 s, sample 3 s) through scripts/demo.sh on "
                   "ONE thread (OMP_NUM_THREADS=1) of a 2-core CPU machine, the other core busy (80 s with it idle, with the "
                   "weights before 2026-12-08). In its 8 pictures the scorer of dynasyn/shapes finds the dotted ball "
                   "(its class and both colours) in 8 and the striped box in 8 (the untrained model, asked for 'a ball right "
                   "of a box', draws either in 0 of 32 chances over 16 pictures); but 7 of the 8 keep the picture's order, "
                   "ball on the left: the model reads 'left of' / 'right of' in words, yet training on one picture "
                   "mostly keeps its layout (with Train's seed 1 the ball's colours lie right of the box's in 6 of 8, "
                   "though the ball is found in only 1)")

SHAPES_NOTE = f"""DynASyn on the Shapes World: the whole pipeline in minutes on a CPU, nothing to download.

The DynASyn Shapes World Model is a small SD-shaped model shipped with the pack, pretrained on 64 px pictures of \
balls, boxes, cones, stars and rings, plain or in a few two-colour patterns. The Example Scene shows two subjects it \
never saw: a green ball with blue dots and a red-and-yellow striped box. DynASyn learns them from this ONE picture.

1. Inputs: the model and the Example Scene (64 px variant).
2. Augment (offline, no LLM/SAM): Describe Subjects says what the subjects look like (its phrases; change them with \
the picture); {SHAPES_PROMPTS} prompts; drafts {SHAPES_AUGMENT['draft_steps']} steps, inpaint \
{SHAPES_AUGMENT['inpaint_steps']}, GSA {SHAPES_AUGMENT['gsa_steps']} at 64 px; pseudo-masks from the attention maps.
3. Train: {SHAPES_TRAIN['phase1_steps']} + {SHAPES_TRAIN['phase2_steps']} steps at 64 px, learning rates \
{SHAPES_TRAIN['phase1_lr']:g} / {SHAPES_TRAIN['phase2_lr']:g} (10x / 50x the paper's, which are set for 400 + 400 steps of \
SD 1.5 at 512 px). Scene Prompt = "{SHAPES_SCENE}".
4. Sample: {SHAPES_SAMPLE['steps']} euler steps, 8 pictures (a 128x128 EmptyLatentImage = the model's 16x16 latents = 64 px).

Measured: {SHAPES_MEASURED}. On a CPU that other programs keep busy, set OMP_NUM_THREADS=1 before starting \
ComfyUI: competing for the cores, torch's threads can make it ten times slower."""


def workflows() -> dict[str, dict]:
    """name -> {"nodes": [...], "groups": [...]}: what scripts/build_workflows.py asks the page to build.

    Node ids are roles (1 model, 2 note, 10 scene, 14 SAM, 16 Load Dataset, 20-21 describe/prompts, 30-33 augment,
    40-42 train, 50-55 sample, 60-69 the augmentation stage nodes); a group lists the ids it frames. To add a node, add its spec to the list (and to a group)."""
    # columns: note | inputs | describe + prompts | augment | its savers | train | loss | sample (groups need gaps)
    scene = example_scene(500, 0)
    img, masks, nouns = [10, "image"], [10, "masks"], [10, "class_nouns"]
    sam = {"id": 14, "type": "DynASynSAMLoader", "pos": [500, 380], "widgets": {"sam_name": SAM_B["name"]},
           "properties": {"models": [dict(SAM_B)]}}
    full = [note(2, [0, 0], FULL_NOTE), checkpoint(1, [500, -160]), *scene, sam,
            *describe_and_prompts(940, 0, img, masks, nouns), *augment(1300, 0, 1, img, masks, sam=[14, 0]),
            *train(2060, 0, 1, img, masks, [20, "class_nouns"], [31, "dataset"]),
            *sample(2840, 0, model=[40, "MODEL"], clip=[40, "CLIP"], vae=[1, "VAE"], text_link=[42, "prompt"])]
    aug = [note(2, [0, 0], AUGMENT_NOTE), checkpoint(1, [500, -160]), *scene, sam,
           {"id": 15, "type": "DynASynSAMMasks", "pos": [860, 0], "size": [380, 620],
            "links": {"sam": [14, 0], "image": img},
            "widgets": {"subject_prompts": json.dumps([{"box": [80, 225, 245, 395]}, {"box": [285, 170, 465, 395]}])}},
           *describe_and_prompts(1280, 0, img, [15, "masks"], nouns),
           *augment(1640, 0, 1, img, [15, "masks"], sam=[14, 0]),
           {"id": 33, "type": "PreviewImage", "pos": [2060, 560], "links": {"images": [30, "drafts"]}}]
    trn = [note(2, [0, 0], TRAIN_NOTE), checkpoint(1, [500, -160]), *scene,
           *describe_and_prompts(940, 0, img, masks, nouns),
           *stages_chain(1300, 0, 1, img, masks, [20, "class_nouns"]),
           *train(2700, 0, 1, img, masks, [20, "class_nouns"], [69, "dataset"]),
           *sample(3480, 0, model=[40, "MODEL"], clip=[40, "CLIP"], vae=[1, "VAE"], text_link=[42, "prompt"])]
    samp = [note(2, [0, 0], SAMPLE_NOTE), checkpoint(1, [500, 0], name="dynasyn.safetensors", models=()),
            *sample(940, 0, model=[1, "MODEL"], clip=[1, "CLIP"], vae=[1, "VAE"],
                    text="embedding:dynasyn_ball rolling next to embedding:dynasyn_box on a sunny beach")]
    shapes = [note(2, [0, 0], SHAPES_NOTE),
              {"id": 1, "type": "DynASynShapesWorldModel", "pos": [500, -160]}, *example_scene(500, 0, SHAPES_PAIR),
              *describe_and_prompts(940, 0, img, masks, nouns, count=SHAPES_PROMPTS, phrases=SHAPES_PHRASES),
              *augment(1300, 0, 1, img, masks, settings=SHAPES_AUGMENT, save=False),
              *train(1820, 0, 1, img, masks, [20, "class_nouns"], [30, "dataset"],
                     settings=SHAPES_TRAIN, scene=SHAPES_SCENE),
              *sample(2600, 0, model=[40, "MODEL"], clip=[40, "CLIP"], vae=[1, "VAE"], text_link=[42, "prompt"],
                      settings=SHAPES_SAMPLE, latent=(128, 128, 8), prefix="dynasyn/shapes_world", negative="")]
    stages = {"Inputs": (1, 10, 14), "Augment": (16, 20, 21, 30, 31, 32, *range(60, 70)), "Train": (40, 41, 42),
              "Sample": (50, 51, 52, 53, 54, 55)}
    return {
        "dynasyn_full": {"nodes": full, "groups": groups(full, stages)},
        "dynasyn_augment": {"nodes": aug},
        "dynasyn_train": {"nodes": trn, "groups": groups(trn, stages)},
        "dynasyn_sample": {"nodes": samp},
        "dynasyn_shapes_world": {"nodes": shapes, "groups": groups(shapes, stages)},
    }


GROUP_COLORS = {"Inputs": "#3f789e", "Augment": "#8A8", "Train": "#b58b2a", "Sample": "#a1309b"}


def groups(nodes: list[dict], stages: dict[str, tuple]) -> list[dict]:
    """One group per stage, framing the stage's nodes that this workflow has."""
    ids = {n["id"] for n in nodes}
    return [{"title": t, "nodes": [i for i in members if i in ids], "color": GROUP_COLORS[t]}
            for t, members in stages.items() if ids & set(members)]


def main() -> None:
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d, ComfyServer(Path(d)) as server:
        prepare_server(server)
        for name, spec in workflows().items():
            res = run_page(server, "build_workflow", {"spec": spec, "thumbnail": str(OUT / f"{name}.jpg")})
            if res["pageErrors"]:
                raise SystemExit(f"{name}: page errors {res['pageErrors']}")
            wf = res["value"]
            (OUT / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
            print(f"{name}: {len(wf['nodes'])} nodes, {len(wf['links'])} links, {len(wf.get('groups') or [])} groups")


if __name__ == "__main__":
    main()
