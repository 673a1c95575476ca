"""The main job in one command: example_workflows/dynasyn_full.json, headless, through ComfyUI's HTTP API.

    bash scripts/demo.sh                              # the Shapes World model learns the bundled pair (no download)
    bash scripts/demo.sh --tiny                       # the SD pipeline in small on the built-in tiny random model
    bash scripts/demo.sh --checkpoint sd15.safetensors [--sam sam_vit_b_01ec64.pth]
    bash scripts/demo.sh --image me.png --masks m1.png m2.png --class-nouns "dog, ball" --checkpoint ...

Starts the real ComfyUI (the one the tests use) with the pack, queues the shipped workflow
(converted to API format), prints progress, and copies everything it made into one folder:
augmented/ dataset/ embeddings/ checkpoint/ samples/ loss_curve.png timings.json.
Bad input (a missing or unsupported checkpoint, an image without masks) stops before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .server import ROOT, ComfyServer, execution_error
from .workflow import WorkflowError, nodes_of, ui_to_api

WORKFLOW = ROOT / "example_workflows" / "dynasyn_full.json"
# Without a checkpoint or a picture: the pretrained Shapes World model learns the bundled dotted ball and striped
# box (subjects it never saw) and draws them in a new scene, in a few minutes on a CPU
SHAPES_WORKFLOW = ROOT / "example_workflows" / "dynasyn_shapes_world.json"
TINY_SAM = "tiny (random test-size SAM, for trying graphs)"
# The built-in model is 64 px and random: small numbers keep the whole job to a few minutes on a CPU.
TINY_SETTINGS = {
    "DynASynAugmentPrompts": {"count": 4},
    "DynASynAugment": {"size": 64, "draft_steps": 4, "inpaint_steps": 4, "gsa_steps": 10, "draft_batch": 2, "guidance": 5.0},
    "DynASynTrain": {"phase1_steps": 30, "phase2_steps": 20, "resolution": 64, "preview_every": 10},
    "DynASynDrafts": {"size": 64, "steps": 4, "guidance": 5.0},  # the stage nodes (dynasyn_train.json)
    "DynASynGSA": {"steps": 10},
    # EmptyLatentImage assumes the usual 8x VAE: 256 px gives the tiny model's 32x32 latents (64 px images)
    "EmptyLatentImage": {"width": 256, "height": 256},
    "KSampler": {"steps": 10, "sampler_name": "euler", "scheduler": "normal"},
}
# --quick: the whole pipeline once with a real checkpoint at its real size, as fast as it goes (a smoke run:
# the numbers are far too small for good results)
QUICK_SETTINGS = {
    "DynASynAugmentPrompts": {"count": 1},
    "DynASynAugment": {"draft_steps": 2, "inpaint_steps": 2, "gsa_steps": 3, "draft_batch": 1},
    "DynASynTrain": {"phase1_steps": 2, "phase2_steps": 0, "preview_every": 1},
    "EmptyLatentImage": {"batch_size": 1},
    "KSampler": {"steps": 2},
}
STAGES = {
    "DynASynDescribeSubjects": "describe", "DynASynAugmentPrompts": "prompts", "DynASynSAMLoader": "load models",
    "CheckpointLoaderSimple": "load models", "DynASynTinyModel": "load models", "DynASynAugment": "augment",
    "DynASynSaveDataset": "save", "DynASynTrain": "train", "KSampler": "sample", "VAEDecode": "sample",
    "CLIPTextEncode": "sample", "SaveImage": "save",
}


class DemoError(Exception):
    pass


# ------------------------------------------------------------------ checks before any work
def check_checkpoint(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DemoError(f"--checkpoint {path}: no such file.")
    if p.suffix not in (".safetensors", ".ckpt", ".pt", ".pth"):
        raise DemoError(f"--checkpoint {path}: expected a .safetensors or .ckpt Stable Diffusion 1.x / 2.x checkpoint.")
    keys = _checkpoint_keys(p)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise DemoError(f"--checkpoint {path} is an SDXL checkpoint; DynASyn supports SD 1.x and SD 2.x.")
    if "model.diffusion_model.input_blocks.0.0.weight" not in keys:
        raise DemoError(f"--checkpoint {path} is not a Stable Diffusion 1.x / 2.x checkpoint (no "
                        "model.diffusion_model.input_blocks); Flux, SD3, diffusers folders and LoRAs are not supported here.")
    if not any(k.startswith("cond_stage_model.") for k in keys):
        raise DemoError(f"--checkpoint {path} has no text encoder (cond_stage_model.*); use a full SD 1.x / 2.x checkpoint.")
    return p.resolve()


def _checkpoint_keys(p: Path) -> set[str]:
    try:
        if p.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                return set(f.keys())
        import torch

        sd = torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        return set(sd.get("state_dict", sd).keys())
    except Exception as e:  # noqa: BLE001
        raise DemoError(f"--checkpoint {p}: cannot be read as a checkpoint ({e}).") from None


def check_inputs(args) -> dict:
    """The picture, masks and class nouns to use (the bundled example when no --image)."""
    if args.image is None:
        if args.masks:
            raise DemoError("--masks needs --image (the picture they belong to).")
        return {}
    from PIL import Image

    img = Path(args.image).expanduser()
    if not img.is_file():
        raise DemoError(f"--image {args.image}: no such file.")
    if not args.masks:
        raise DemoError("--image needs --masks: one black-and-white mask file per subject, in subject order "
                        "(white = the subject).")
    if not args.class_nouns:
        raise DemoError('--image needs --class-nouns, e.g. --class-nouns "dog, ball" (one per mask).')
    nouns = [n.strip() for n in args.class_nouns.split(",") if n.strip()]
    if len(nouns) != len(args.masks):
        raise DemoError(f"{len(args.masks)} masks but {len(nouns)} class nouns; give one noun per mask.")
    if len(args.masks) > 8:
        raise DemoError("At most 8 subjects.")
    size = Image.open(img).size
    for m in args.masks:
        if not Path(m).is_file():
            raise DemoError(f"--masks {m}: no such file.")
        mask_size = Image.open(m).size
        if mask_size != size:
            raise DemoError(f"--masks {m} is {mask_size[0]}x{mask_size[1]}, the picture {size[0]}x{size[1]}; "
                            "masks must be the size of the picture.")
    return {"image": img.resolve(), "masks": [Path(m).resolve() for m in args.masks], "class_nouns": ", ".join(nouns)}


# ------------------------------------------------------------------ the prompt
def build_prompt(workflow: dict, object_info: dict, **kw) -> dict:
    return substitute(ui_to_api(workflow, object_info), **kw)


def substitute(prompt: dict, *, tiny: bool, ckpt_name: str | None = None, sam_name: str | None = None,
               nouns: str | None = None, mask_names=None, image_name: str | None = None, quick: bool = False,
               train_steps: dict | None = None) -> dict:
    """The API prompt with this run's model, SAM and settings (small ones for the tiny model); with ``image_name``,
    your picture (in ComfyUI's input folder), its ``mask_names`` and class ``nouns`` replace the workflow's own;
    ``train_steps`` ({"phase1_steps": n, ...}) overrides the DynASyn Train nodes' step counts last."""
    prompt = json.loads(json.dumps(prompt))
    for k in nodes_of(prompt, "CheckpointLoaderSimple"):
        prompt[k] = ({"class_type": "DynASynTinyModel", "inputs": {"seed": 0, "prediction": "epsilon"}} if tiny
                     else {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}})
    for k in nodes_of(prompt, "DynASynSAMLoader"):
        if tiny or sam_name:
            prompt[k]["inputs"]["sam_name"] = TINY_SAM if tiny else sam_name
        else:  # no SAM file: the pseudo-masks come from the attention maps
            del prompt[k]
            for node in prompt.values():
                node["inputs"] = {n: v for n, v in node["inputs"].items() if not (isinstance(v, list) and v[0] == k)}
    steps = [{"DynASynTrain": train_steps}] if train_steps else []
    for settings in ([TINY_SETTINGS] if tiny else []) + ([QUICK_SETTINGS] if quick else []) + steps:
        for node in prompt.values():
            node["inputs"].update(settings.get(node["class_type"], {}))
    if image_name is None:  # the workflow's own picture (DynASyn Example Scene)
        return prompt
    _replace_example_scene(prompt, image_name, mask_names, nouns)
    for k in nodes_of(prompt, "LoadImage"):
        prompt[k]["inputs"]["image"] = image_name
    _set_masks(prompt, mask_names)
    for cls in ("DynASynDescribeSubjects", "DynASynAugmentPrompts", "DynASynTrain"):
        for k in nodes_of(prompt, cls):
            if not isinstance(prompt[k]["inputs"].get("class_nouns"), list):
                prompt[k]["inputs"]["class_nouns"] = nouns
    for k in nodes_of(prompt, "DynASynDescribeSubjects"):
        if prompt[k]["inputs"].get("phrases"):  # they describe the workflow's own subjects, not yours
            prompt[k]["inputs"]["phrases"] = ""
    return prompt


def _replace_example_scene(prompt: dict, image_name: str, mask_names: list[str], nouns: str) -> None:
    """DynASyn Example Scene -> LoadImage + one LoadImageMask per subject into DynASyn Subject Masks; its class nouns
    output becomes the given nouns."""
    for k in nodes_of(prompt, "DynASynExampleScene"):
        batch = f"{k}_masks"
        prompt[k] = {"class_type": "LoadImage", "inputs": {"image": image_name}}  # IMAGE stays output 0
        prompt[batch] = {"class_type": "DynASynMaskBatch", "inputs": {}}
        for node in prompt.values():
            for name, v in node["inputs"].items():
                if v == [k, 1]:
                    node["inputs"][name] = [batch, 0]
                elif v == [k, 2]:
                    node["inputs"][name] = nouns


def _set_masks(prompt: dict, mask_names: list[str]) -> None:
    """One LoadImageMask per subject into DynASyn Subject Masks (the workflow has two; more or fewer are rewired)."""
    batch = nodes_of(prompt, "DynASynMaskBatch")
    if not batch:
        return
    b = batch[0]
    for name in [n for n in prompt[b]["inputs"] if n.startswith("mask_")]:
        src = prompt[b]["inputs"].pop(name)[0]
        prompt.pop(src, None)
    for i, name in enumerate(mask_names, start=1):
        key = f"demo_mask_{i}"
        prompt[key] = {"class_type": "LoadImageMask", "inputs": {"image": name, "channel": "red"}}
        prompt[b]["inputs"][f"mask_{i}"] = [key, 0]


# ------------------------------------------------------------------ progress
class Progress:
    def __init__(self, prompt: dict):
        self.prompt = prompt
        self.current: str | None = None
        self.started = time.time()
        self.stage_started = self.started
        self.times: dict[str, float] = {}
        self.last_print = 0.0

    def _close(self) -> None:
        if self.current is not None:
            stage = STAGES.get(self.prompt.get(self.current, {}).get("class_type"), "other")
            self.times[stage] = self.times.get(stage, 0.0) + time.time() - self.stage_started

    def __call__(self, msg: dict) -> None:
        kind, data = msg.get("type"), msg.get("data") or {}
        if kind == "executing":
            self._close()
            self.current, self.stage_started = data.get("node"), time.time()
            node = self.prompt.get(self.current or "", {})
            if node:
                print(f"[demo] {time.time() - self.started:7.1f} s  {node.get('_meta', {}).get('title', node['class_type'])}",
                      flush=True)
        elif kind == "progress" and time.time() - self.last_print > 5:
            self.last_print = time.time()
            print(f"[demo]            {data.get('value')}/{data.get('max')}", flush=True)
        elif kind == "dynasyn.targets" and (time.time() - self.last_print > 5 or data.get("done") == data.get("total")):
            self.last_print = time.time()
            print(f"[demo]            frozen-model targets {data['done']}/{data['total']}", flush=True)
        elif kind == "dynasyn.train" and (data.get("step", 0) % 10 == 0 or data.get("step") == data.get("total")):
            print(f"[demo]            train step {data['step']}/{data['total']} (phase {data['phase']}) "
                  f"loss {data['loss']:.4f}", flush=True)

    def finish(self) -> dict:
        self._close()
        self.current = None
        return {**{k: round(v, 1) for k, v in self.times.items() if v >= 0.05}, "total": round(time.time() - self.started, 1)}


# ------------------------------------------------------------------ outputs
def collect(base: Path, out: Path, ckpt_input: str | None) -> dict[str, list[str]]:
    made: dict[str, list[str]] = {}

    def copy(src: Path, dst: Path, key: str):
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
        made.setdefault(key, []).append(str(dst.relative_to(out)))

    output = base / "output"
    for f in sorted((output / "dynasyn").glob("augmented_*.png")):
        copy(f, out / "augmented" / f.name, "augmented")
    for d in sorted((base / "user" / "__dynasyn" / "datasets").glob("*")):
        copy(d, out / "dataset" if d.name == "dynasyn_dataset" else out / f"dataset_{d.name}", "dataset")
    for f in sorted((base / "models" / "embeddings").glob("*.safetensors")):
        copy(f, out / "embeddings" / f.name, "embeddings")
    for f in sorted((base / "models" / "checkpoints").glob("*.safetensors")):
        if f.name != ckpt_input and not f.is_symlink():
            copy(f, out / "checkpoint" / f.name, "checkpoint")
    for f in sorted([*(output / "dynasyn").glob("sample_*.png"), *(output / "dynasyn").glob("shapes_world_*.png")]):
        copy(f, out / "samples" / f.name, "samples")
    losses = sorted((output / "dynasyn").glob("loss_*.png"))
    if losses:
        copy(losses[-1], out / "loss_curve.png", "loss_curve")
    return made


def _ask_interrupt(server) -> bool:
    try:
        server.post("/interrupt", {})
        return True
    except OSError:
        return False


def wait_for_cancel(server, poll: float = 0.5, say_every: float = 30.0) -> bool:
    """After Ctrl-C: interrupt the running node and wait, however long it takes, until ComfyUI has finished it.

    The trainer writes its resumable state (gigabytes on a real model, slow on a busy machine) and augmentation its
    pairs before the node ends, so stopping the server any earlier could lose them. A second Ctrl-C stops waiting
    (returns False)."""
    try:
        asked = _ask_interrupt(server)
        print("[demo] waiting for ComfyUI to end the running node and write what it made (the training state can take "
              "minutes on a big model); Ctrl-C again to stop without waiting", file=sys.stderr, flush=True)
        started = last_said = time.time()
        while True:
            if server.proc is not None and server.proc.poll() is not None:
                print(f"[demo] ComfyUI exited ({server.proc.returncode}); see {server.log_path}", file=sys.stderr)
                return True
            try:
                asked = asked or _ask_interrupt(server)
                queue = server.get("/queue")
                if asked and not queue["queue_running"] and not queue["queue_pending"]:
                    return True
            except OSError:  # a busy server may answer slowly: keep asking
                pass
            if time.time() - last_said >= say_every:
                last_said = time.time()
                print(f"[demo] still waiting for ComfyUI to finish writing ({time.time() - started:.0f} s)…",
                      file=sys.stderr, flush=True)
            time.sleep(poll)
    except KeyboardInterrupt:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="SD 1.x / 2.x checkpoint (.safetensors); default: the built-in tiny random model")
    ap.add_argument("--sam", help="SAM checkpoint (sam_vit_b/l/h ...pth) for the pseudo-masks; default with --checkpoint: "
                                  "the attention maps")
    ap.add_argument("--image", help="your own picture (default: the bundled ball-and-box picture)")
    ap.add_argument("--masks", nargs="+", help="one mask file per subject (white = subject), with --image")
    ap.add_argument("--class-nouns", help='what each subject is, e.g. "dog, ball", with --image')
    ap.add_argument("--out", help="output folder (default demo_output/<date-time>)")
    ap.add_argument("--workflow", help="UI-format workflow to run (default: dynasyn_shapes_world without --checkpoint, "
                                       "--image or --tiny; else the shipped dynasyn_full)")
    ap.add_argument("--tiny", action="store_true", help="dynasyn_full on the built-in tiny random model: the whole SD "
                                                        "pipeline in small (shows it runs, not quality)")
    ap.add_argument("--quick", action="store_true", help="a smoke run with a real --checkpoint: 1 prompt, 2 training steps, "
                                                          "2 sampling steps (checks the setup in minutes; not for results)")
    ap.add_argument("--phase1-steps", type=int, help="training steps of phase 1 (embeddings only); default: the "
                                                     "workflow's (--tiny / --quick: their own)")
    ap.add_argument("--phase2-steps", type=int, help="training steps of phase 2 (embeddings + UNet + text encoder; a "
                                                     "one-phase mode trains both counts in its phase); default: the "
                                                     "workflow's (--tiny / --quick: their own)")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds to wait for the job")
    args = ap.parse_args(argv)
    train_steps = {f"{k}_steps": v for k, v in (("phase1", args.phase1_steps), ("phase2", args.phase2_steps)) if v is not None}
    try:
        ckpt = check_checkpoint(args.checkpoint) if args.checkpoint else None
        for k, v in train_steps.items():
            if not 0 <= v <= 100000:
                raise DemoError(f"--{k.replace('_', '-')} {v}: give 0 to 100000 steps.")
        if args.sam and not Path(args.sam).is_file():
            raise DemoError(f"--sam {args.sam}: no such file.")
        user = check_inputs(args)
        shapes = not (args.checkpoint or args.image or args.tiny or args.workflow)
        workflow = json.loads(Path(args.workflow or (SHAPES_WORKFLOW if shapes else WORKFLOW)).read_text())
    except (DemoError, OSError, ValueError) as e:
        print(f"[demo] error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out or ROOT / "demo_output" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if out.exists() and any(out.iterdir()):
        print(f"[demo] error: {out} exists and is not empty; choose another --out.", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    base = out / ".comfyui"
    print(f"[demo] model: {ckpt or ('built-in Shapes World model (64 px, pretrained; learns a dotted ball and a striped box)' if shapes else 'built-in tiny random model (64 px; shows the pipeline, not quality)')}")
    started = time.time()
    with ComfyServer(base) as server:
        setup_s = time.time() - started
        inp = base / "input"
        if user:
            shutil.copy2(user["image"], inp / ("dynasyn_user" + user["image"].suffix))
            image_name, nouns = "dynasyn_user" + user["image"].suffix, user["class_nouns"]
            mask_names = []
            for i, m in enumerate(user["masks"], start=1):
                shutil.copy2(m, inp / f"dynasyn_user_mask_{i}{m.suffix}")
                mask_names.append(f"dynasyn_user_mask_{i}{m.suffix}")
        else:  # the workflow's DynASyn Example Scene draws the bundled picture
            image_name = mask_names = nouns = None
        sam_name = None
        if ckpt:
            os.symlink(ckpt, base / "models" / "checkpoints" / ckpt.name)
        if args.sam:
            (base / "models" / "sams").mkdir(parents=True, exist_ok=True)
            sam_name = Path(args.sam).name
            os.symlink(Path(args.sam).resolve(), base / "models" / "sams" / sam_name)
        try:
            prompt = build_prompt(workflow, server.get("/object_info"), tiny=ckpt is None and not shapes, ckpt_name=ckpt and ckpt.name,
                                  sam_name=sam_name, nouns=nouns, mask_names=mask_names, image_name=image_name,
                                  quick=args.quick, train_steps=train_steps)
        except WorkflowError as e:
            print(f"[demo] error: {e}", file=sys.stderr)
            return 2
        if train_steps and not nodes_of(prompt, "DynASynTrain"):
            print("[demo] warning: this workflow has no DynASyn Train node; --phase1-steps / --phase2-steps do nothing",
                  file=sys.stderr)
        if ckpt and not sam_name:
            print("[demo] no --sam: pseudo-masks come from the attention maps")
        progress = Progress(prompt)
        try:
            entry = server.run(prompt, timeout=args.timeout, on_message=progress)
        except KeyboardInterrupt:
            # a clean Cancel, not a killed server: the trainer saves a resumable state, augmentation keeps its pairs
            print("\n[demo] cancelling: asking ComfyUI to stop the running node…", file=sys.stderr)
            if not wait_for_cancel(server):
                print(f"[demo] stopped without waiting; the training state may be incomplete. What was made so far "
                      f"is under {base / 'output'}, {base / 'models'} and {base / 'user' / '__dynasyn'}", file=sys.stderr)
                return 130
            print(f"[demo] cancelled; what was made so far is under {base / 'output'}, {base / 'models'} and "
                  f"{base / 'user' / '__dynasyn'} (datasets, resumable training state)", file=sys.stderr)
            return 130
        times = {"start ComfyUI": round(setup_s, 1), **progress.finish()}
        if entry["status"]["status_str"] != "success":
            print(f"[demo] the workflow failed: {execution_error(entry) or entry['status']}", file=sys.stderr)
            print(f"[demo] server log: {server.log_path}", file=sys.stderr)
            return 1
    made = collect(base, out, ckpt.name if ckpt else None)
    (out / "timings.json").write_text(json.dumps(times, indent=1) + "\n")
    shutil.rmtree(base, ignore_errors=True)
    print("[demo] wall time per stage:")
    for k, v in times.items():
        print(f"[demo]   {k:<14} {v:8.1f} s")
    for k, files in made.items():
        print(f"[demo] {k:<11} {len(files):3d} file(s): {files[0]}{' …' if len(files) > 1 else ''}")
    print(f"[demo] everything is in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
