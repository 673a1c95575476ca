"""Command line: ``python -m dynasyn train ...`` runs the trainer outside ComfyUI.

Every ``TrainConfig`` field is an option (``--phase2-lr 2e-6``). Outputs in ``--out``:
``model/`` (diffusers folder, tokenizer with the placeholders), ``embeddings/<run>_assetN.safetensors``,
``loss.png``, ``history.json``. Ctrl-C saves ``state/``; ``--resume`` continues from it.
Runs as is on one device, or data-parallel under ``accelerate launch --num_processes N -m dynasyn train ...``
(only the main process prints and writes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path

import numpy as np
import torch

from .errors import DynASynError


CONFIG_HELP = {
    "prior_preservation": "class-prior loss on images the base model draws from --class-prompt (default: the mode's)",
    "class_prompt": "prompt of the class images (Break-a-Scene: 'a photo at the beach')",
    "num_class_images": "class images, generated once per run into <out>/class_images (Break-a-Scene: 100)",
    "prior_loss_weight": "weight of the class-prior MSE (Break-a-Scene: 1.0)",
    "aspect": "non-square pictures: crop = centre square (masks alike), pad = pad to a square",
    "attention_resolution": "SD 1.x / 2.x always use down_blocks.2 + up_blocks.1 (16x16 at 512 px, 24x24 at 768 px); "
                            "other UNets: the blocks with maps of this side at the UNet's own sample size",
}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from .train import MODES, TrainConfig

    for f in dataclasses.fields(TrainConfig):
        opt = "--" + f.name.replace("_", "-")
        kind_name = f.type if isinstance(f.type, str) else f.type.__name__
        help_ = CONFIG_HELP.get(f.name)
        if kind_name in ("bool", "bool | None"):
            parser.add_argument(opt, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            kind = {"int": int, "float": float}.get(kind_name, str)
            choices = list(MODES) if f.name == "mode" else None
            if f.name == "mode":
                help_ = "training method (default dynasyn); see 'modes' below"
            parser.add_argument(opt, type=kind, default=f.default, choices=choices,
                                metavar=None if choices else f.name.upper(), help=help_)


def modes_epilog() -> str:
    from .train import MODES, describe_mode

    lines = ["modes (loss terms; phases; subjects per step; prior preservation; source of the defaults):"]
    lines += [f"  {describe_mode(m)}" for m in MODES]
    lines.append("phases: 1 = placeholder embeddings only, lr 5e-4, 400 steps; 2 = embeddings + UNet + text encoder, "
                 "lr 2e-6, 400 steps, fresh optimizer (Break-a-Scene's train.py). Union sampling: k ~ U{1..N} subjects in "
                 "random order, prompt 'a photo of <asset_i> and ...' (Break-a-Scene). Prior preservation: "
                 "--num-class-images images of --class-prompt from the base model, one unmasked MSE sample per phase-2 "
                 "step, weight --prior-loss-weight (Break-a-Scene / DreamBooth: 100, 'a photo at the beach', 1.0).")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynasyn", description="DynASyn: multi-subject personalization from one image.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train placeholder tokens + UNet + text encoder on one image", epilog=modes_epilog(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", required=True, help="diffusers SD 1.x / 2.x folder, or 'tiny' for the built-in tiny model")
    t.add_argument("--image", required=True, help="the reference picture")
    t.add_argument("--mask", action="append", required=True, help="one mask image per subject (white = subject); repeat")
    t.add_argument("--class-nouns", nargs="+", required=True, help="what each subject is, in mask order")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--run-name", default="dynasyn", help="embedding names: <run-name>_asset0, ...")
    t.add_argument("--resume", action="store_true", help="continue from <out>/state")
    t.add_argument("--device", default=None, help="cuda, cpu, mps (default: accelerate's choice, cuda if available)")
    _add_config_options(t)
    return p


def _load_image(path: str, mode: str) -> np.ndarray:
    from PIL import Image

    if not Path(path).is_file():
        raise DynASynError(f"{path} does not exist.")
    return np.asarray(Image.open(path).convert(mode), dtype=np.float32) / 255.0


def train_command(args) -> int:
    from .export import save_embeddings, validate_export_name
    from .models import load_components, save_components
    from .plots import loss_curve_image
    from .train import Cancelled, DynASynTrainer, TrainConfig

    validate_export_name(args.run_name, "run")
    image = torch.from_numpy(_load_image(args.image, "RGB"))
    masks = [torch.from_numpy(_load_image(m, "L")) for m in args.mask]
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    if args.model == "tiny":
        from .tiny import tiny_components
        comps = tiny_components(seed=cfg.seed)
    else:
        comps = load_components(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "state"
    stop = {"requested": False}
    signal.signal(signal.SIGINT, lambda *_: stop.update(requested=True))

    def report(e):
        terms = " ".join(f"{k}={v:.4g}" for k, v in e.terms.items())
        print(f"step {e.step}/{cfg.total_steps} phase {e.phase} loss {e.loss:.4g} {terms}", flush=True)

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=args.device == "cpu")
    say = print if accelerator.is_main_process else (lambda *a, **k: None)
    trainer = DynASynTrainer(comps, image, masks, args.class_nouns, cfg, device=args.device, callback=report,
                             should_stop=lambda: stop["requested"], log=say, accelerator=accelerator,
                             class_image_dir=out / "class_images")
    if args.resume and (state_dir / "state.json").is_file():
        trainer.load_state(state_dir)
        say(f"resuming from step {trainer.step}")
    try:
        trainer.train(state_dir=state_dir)
    except Cancelled as e:
        say(f"cancelled at step {e.step}; resumable state in {e.state_dir} (run again with --resume)")
        return 130
    if not accelerator.is_main_process:
        return 0
    vectors = trainer.placeholder_embeddings()
    names = {f"{args.run_name}_asset{i}": v for i, v in enumerate(vectors.values())}
    save_embeddings(out / "embeddings", names, {"dynasyn.class_nouns": ", ".join(args.class_nouns)})
    save_components(comps, out / "model")
    loss_curve_image(trainer.history, as_pil=True).save(out / "loss.png")
    (out / "history.json").write_text(json.dumps([dataclasses.asdict(h) for h in trainer.history]))
    print(f"done: {out / 'model'} (tokens {', '.join(vectors)}), embeddings {', '.join(names)}, {out / 'loss.png'}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return train_command(args)
    except DynASynError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1
