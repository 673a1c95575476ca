"""Guided SDE Augmentation cost: default (DDIM, trailing 30-step schedule) vs the paper's 700 DDPM steps.

    python bench/gsa.py [--size 64] [--pairs 4]

Both start at the same t = 699 (0-based; the paper's 700 of 1000) on the tiny model, in one run,
interleaved. Then the whole augmentation stage (offline prompts -> drafts -> SAM pseudo-masks ->
compose -> inpaint -> GSA) is timed for ``--pairs`` prompts. UNet evaluations are counted by
the sampler itself (each is one CFG-batched UNet call). Last line:
eval_ratio=<paper-exact UNet evaluations / default> pairs_per_min=<augmented pairs per minute>.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import machine, median

from dynasyn.augment import AugmentConfig, augment
from dynasyn.gsa import GSAConfig, guided_sde_augment
from dynasyn.prompts import offline_prompts
from dynasyn.sam import build_tiny_sam
from dynasyn.tiny import tiny_components


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=4)
    args = ap.parse_args()
    started = time.time()
    comps = tiny_components(seed=0)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(args.size, args.size, 3, generator=g)
    variants = {"default (ddpm, 30-step schedule)": GSAConfig(), "paper-exact (700 DDPM steps)": GSAConfig(paper_exact=True)}
    times = {k: [] for k in variants}
    evals, start = {}, {}
    for r in range(args.rounds):
        for name, cfg in variants.items():
            t0 = time.perf_counter()
            _, info = guided_sde_augment(comps, image, "a panda jumping into a bowl", cfg)
            times[name].append(time.perf_counter() - t0)
            evals[name], start[name] = info["unet_evaluations"], info["start_timestep"]
    print(f"GSA on the tiny model, {args.size} px, {args.rounds} rounds interleaved, medians; {machine()}")
    print(f"{'variant':<34} {'start t':>8} {'UNet evals':>11} {'s / image':>10}")
    for name in variants:
        print(f"{name:<34} {start[name]:>8} {evals[name]:>11} {median(times[name]):>10.3f}")
    names = list(variants)
    eval_ratio = evals[names[1]] / evals[names[0]]
    time_ratio = median(times[names[1]]) / median(times[names[0]])
    print(f"paper-exact / default: {eval_ratio:.1f}x UNet evaluations (goal >= 20x), {time_ratio:.1f}x wall time")

    a = torch.zeros(args.size, args.size)
    a[args.size // 10: args.size // 2, args.size // 10: args.size // 2] = 1
    b = torch.zeros(args.size, args.size)
    b[args.size // 2:, args.size // 2:] = 1
    t0 = time.perf_counter()
    report = augment(comps, image, [a, b], ["panda", "bowl"], ["red panda", "blue bowl"], offline_prompts(2, args.pairs),
                     AugmentConfig(size=args.size, min_mask_pixels=4), sam=build_tiny_sam())
    stage = time.perf_counter() - t0
    pairs_per_min = len(report.pairs) / stage * 60
    print(f"whole stage (draft 25 steps, SAM, compose, inpaint 20 steps, GSA default): {len(report.pairs)} pairs "
          f"({len(report.skipped)} skipped) in {stage:.1f} s, {report.unet_evaluations} UNet evaluations; "
          f"total {time.time() - started:.0f} s")
    print(f"eval_ratio={eval_ratio:.1f} time_ratio={time_ratio:.1f} pairs_per_min={pairs_per_min:.1f}")


if __name__ == "__main__":
    main()
