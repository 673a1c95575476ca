"""Step time of the DynASyn trainer on the real SD 2.1-base architecture (random weights) at 512 px.

    python bench/train_step.py [--rounds 3] [--resolution 512] [--frozen-dtype auto] [--tiny] [--only capture]

One trainer in phase 2 (tokens + UNet + text encoder trained); per round every variant runs one
step, in turn, so machine noise hits them alike; medians are compared. A step's time is its whole-run
cost: the training step plus the precomputation of its frozen-model targets (``precompute_targets``,
which a run does for all steps up front). ``--tiny``: the tiny random model at 64 px, to check the
code path in seconds (its figures mean nothing). Variants:
  break_a_scene      L_MD + L_M2A on the reference image (prior preservation off in every variant)
  dynasyn            + L_ICA (frozen model, class prompt, stopped after the last 16x16 layer)
  dynasyn+aug        + one augmented pair's L_AUG (attention-only pass + frozen pass)
  md capture-on      L_MD only (mode dreambooth: one subject), 16x16 cross-attention probabilities captured
  md capture-off     L_MD only, SDPA everywhere (the plain diffusers step)
The optimizer is Adafactor stepped inside backward (the same for every variant) so the whole run
fits in 24 GB. Next to the timings, the same ratios counted in FLOPs (``flop_model``: the passes each
variant runs, counted on meta-device copies of the models, so machine-independent). Last line:
dynasyn_over_bas=<x> capture_overhead=<y> dynasyn_aug_over_bas=<z> flops_dynasyn_over_bas=<..>
flops_aug_over_bas=<..> (name=value pairs).
"""

from __future__ import annotations

import argparse
import time

import torch

from common import augmented_pair, machine, median, scene, sd21_base_components, timed

from dynasyn.attention import install_attention_capture, remove_attention_capture
from dynasyn.train import DynASynTrainer, TrainConfig


def sdpa_only_maps(trainer):
    """``_maps`` without any capture: the UNet's own SDPA processors; maps are unused (L_MD only)."""
    def maps(unet, te, store, prompt, noisy, t, positions, grad, need_pred=True):
        with torch.set_grad_enabled(grad):
            hidden = trainer._encode(te, prompt)
            pred = unet(noisy, t, hidden).sample
        return torch.zeros(len(positions), 16, 16), pred
    return maps


def flop_model(comps, latent: int) -> dict:
    """FLOPs of the passes a step runs, on meta-device copies (nothing computed): the Break-a-Scene step (text
    encoder + UNet, forward and backward), L_AUG's attention-only pass (forward and backward to the last 16x16
    layer) and one frozen-model pass (forward to that layer, no gradient)."""
    from torch.utils.flop_counter import FlopCounterMode

    from dynasyn.attention import AttentionStore, capture_layers, run_until_last_capture

    with torch.device("meta"):
        unet = type(comps.unet).from_config(comps.unet.config)
        te = type(comps.text_encoder)(comps.text_encoder.config)
    store = AttentionStore()
    install_attention_capture(unet, store, capture_layers(unet, latent))
    x = torch.randn(1, unet.config.in_channels, latent, latent, device="meta")
    t = torch.tensor([500], device="meta")
    ids = torch.zeros(1, comps.tokenizer.model_max_length, dtype=torch.long, device="meta")

    def count(fn) -> int:
        with FlopCounterMode(display=False) as fc:
            fn()
        store.clear()
        return fc.get_total_flops()

    def pass_(full: bool, grad: bool):
        def run():
            with torch.set_grad_enabled(grad):
                hidden = te(ids)[0]
                store.enabled = True
                if full:
                    out = unet(x, t, hidden).sample.sum()
                else:
                    run_until_last_capture(unet, store, x, t, hidden)
                    out = None
                store.enabled = False
                out = sum(m.sum() for m in store.maps.values()) + (out if out is not None else 0)
                if grad:
                    out.backward()
        return run

    bas, aug = count(pass_(True, True)), count(pass_(False, True))
    with torch.no_grad():
        store.enabled = True
        frozen = count(lambda: run_until_last_capture(unet, store, x, t, torch.zeros(1, ids.shape[1], te.config.hidden_size,
                                                                                   device="meta")))
    return {"bas": bas, "aug": aug, "frozen": frozen, "dynasyn": (bas + frozen) / bas,
            "dynasyn+aug": (bas + frozen + aug + frozen) / bas}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--frozen-dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tiny", action="store_true", help="the tiny random model at 64 px: checks the code path only")
    ap.add_argument("--only", choices=("capture",), help="capture: only the two L_MD variants, for more rounds of "
                                                         "capture_overhead in the same time (other ratios not printed)")
    args = ap.parse_args()
    if args.tiny:
        args.resolution = 64
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    image, masks, nouns = scene(args.resolution)
    cfg = TrainConfig(mode="dynasyn", phase1_steps=0, phase2_steps=10**6, phase2_lr=1e-7, resolution=args.resolution,
                      optimizer="adafactor", fused_backward_step=True, frozen_dtype=args.frozen_dtype,
                      prior_preservation=False)  # the variants compare loss terms; the class-prior step is a second UNet pass
    if args.tiny:
        from dynasyn.tiny import tiny_components
        comps = tiny_components(seed=0)
    else:
        comps = sd21_base_components()
    trainer = DynASynTrainer(comps, image, masks, nouns, cfg, augmented=[augmented_pair(args.resolution)],
                             device="cpu", log=lambda *_: None)
    trainer._setup_phase(2)
    unet = trainer.c.unet
    captured_maps = trainer._maps

    def step(mode, aug=False, capture=True):
        def run():
            trainer.cfg.mode, trainer.use_aug = mode, aug
            if not capture:
                remove_attention_capture(unet)
                trainer._maps = sdpa_only_maps(trainer)
            try:
                trainer.precompute_targets(1, release=False)  # this step's share of the run's precomputation
                trainer.training_step()
            finally:
                if not capture:
                    install_attention_capture(unet, trainer.store, trainer.capture)
                    trainer._maps = captured_maps
        return run

    variants = {"break_a_scene": step("break_a_scene"), "dynasyn": step("dynasyn"),
                "dynasyn+aug": step("dynasyn", aug=True), "md capture-on": step("dreambooth"),
                "md capture-off": step("dreambooth", capture=False)}  # dreambooth = L_MD only (one subject)
    if args.only == "capture":
        variants = {k: v for k, v in variants.items() if k.startswith("md ")}
    for name, run in variants.items():  # warm-up: first-call allocations and kernel selection
        print(f"warm-up {name}: {timed(run):.1f}s", flush=True)
    times = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, run in variants.items():
            times[name].append(timed(run))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}s" for k, v in times.items()), flush=True)
    med = {k: median(v) for k, v in times.items()}
    if args.only == "capture":
        ratios = [on / off for on, off in zip(times["md capture-on"], times["md capture-off"])]
        capture = med["md capture-on"] / med["md capture-off"]
        print(f"\ncapture-on ÷ capture-off, {args.resolution} px, {machine()}: medians {med['md capture-on']:.2f} / "
              f"{med['md capture-off']:.2f} s = {capture:.3f} (goal ≤ 1.03); per round "
              + ", ".join(f"{r:.3f}" for r in ratios) + f"; total {time.time() - started:.0f} s")
        print(f"capture_overhead={capture:.3f} capture_overhead_min={min(ratios):.3f} capture_overhead_max={max(ratios):.3f}")
        return
    spread = {k: (min(v) / med["break_a_scene"], max(v) / med["break_a_scene"]) for k, v in times.items()}
    flops = flop_model(comps, args.resolution // comps.vae_scale_factor)
    model = "tiny random model (code path only)" if args.tiny else "SD 2.1-base architecture, random weights"
    print(f"\n{model}, {args.resolution} px, batch 1, phase 2, frozen model "
          f"{trainer._frozen_dtype()}; {machine()}; {args.rounds} rounds, medians; total {time.time() - started:.0f} s")
    print(f"{'variant':<16} {'median s':>9} {'÷ break_a_scene':>16} {'min..max ÷ median bas':>22} {'FLOPs ÷ bas':>12}")
    flop_ratio = {"break_a_scene": 1.0, "dynasyn": flops["dynasyn"], "dynasyn+aug": flops["dynasyn+aug"]}
    for k, v in med.items():
        lo, hi = spread[k]
        fr = f"{flop_ratio[k]:.3f}" if k in flop_ratio else ""
        print(f"{k:<16} {v:>9.2f} {v / med['break_a_scene']:>16.3f} {f'{lo:.3f}..{hi:.3f}':>22} {fr:>12}")
    print(f"FLOPs per pass: Break-a-Scene step {flops['bas'] / 1e12:.3f} T, L_AUG pass {flops['aug'] / 1e12:.3f} T "
          f"({flops['aug'] / flops['bas']:.3f}), frozen pass {flops['frozen'] / 1e12:.3f} T ({flops['frozen'] / flops['bas']:.3f})")
    dyn_over_bas = med["dynasyn"] / med["break_a_scene"]
    capture = med["md capture-on"] / med["md capture-off"]
    aug_over_bas = med["dynasyn+aug"] / med["break_a_scene"]
    print(f"\ndynasyn ÷ break_a_scene = {dyn_over_bas:.3f} (goal ≤ 1.05); capture-on ÷ capture-off = {capture:.3f} "
          f"(goal ≤ 1.03); dynasyn+aug ÷ break_a_scene = {aug_over_bas:.3f} (goal ≤ 1.6); in FLOPs "
          f"{flops['dynasyn']:.3f} and {flops['dynasyn+aug']:.3f}")
    print(f"dynasyn_over_bas={dyn_over_bas:.3f} capture_overhead={capture:.3f} dynasyn_aug_over_bas={aug_over_bas:.3f} "
          f"flops_dynasyn_over_bas={flops['dynasyn']:.3f} flops_aug_over_bas={flops['dynasyn+aug']:.3f}")


if __name__ == "__main__":
    main()
