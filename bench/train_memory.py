"""Peak memory of one phase-2 training step on the real SD 2.1-base architecture at 512 px, batch 1.

    python bench/train_memory.py [--configs A,B,...] [--resolution 512] [--tiny]

Each configuration runs in a fresh process (so nothing freed earlier is counted or reused). The
process builds the model, then measures the peak resident memory (VmHWM, reset through
/proc/self/clear_refs before each part) of each part of a run: the trainer's construction (VAE
encoding of the reference, the frozen copy made), the frozen model's L_ICA targets as training
computes them (``precompute_targets``: then the frozen copy is freed), and phase-2 setup + one full
step (forward, backward, optimizer step). The peak of the whole run is the largest of the three. ``--tiny``: the tiny random model at
64 px, to check the code path in seconds (its figures mean nothing).
Last line: best_full_gib=<peak of the best configuration that trains UNet + text encoder + tokens
with L_ICA (its targets from the frozen model)>.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# name -> (TrainConfig overrides, trains text encoder, L_ICA (targets from the frozen model, precomputed))
CONFIGS = {
    "A": ("AdamW fp32, UNet + text encoder (naive)",
          dict(mode="break_a_scene", optimizer="adamw"), True, False),
    "B": ("A + gradient checkpointing",
          dict(mode="break_a_scene", optimizer="adamw", gradient_checkpointing=True), True, False),
    "C": ("B + half-precision frozen model (dynasyn: L_ICA)",
          dict(mode="dynasyn", frozen_dtype="bf16", optimizer="adamw", gradient_checkpointing=True), True, True),
    "D": ("C with Adafactor",
          dict(mode="dynasyn", frozen_dtype="bf16", optimizer="adafactor", gradient_checkpointing=True), True, True),
    "E": ("D + optimizer step fused into backward",
          dict(mode="dynasyn", frozen_dtype="bf16", optimizer="adafactor", gradient_checkpointing=True, fused_backward_step=True), True, True),
    "F": ("E without training the text encoder",
          dict(mode="dynasyn", frozen_dtype="bf16", optimizer="adafactor", gradient_checkpointing=True, fused_backward_step=True,
               train_text_encoder=False), False, True),
    "G": ("C with the AdamW step fused into backward",
          dict(mode="dynasyn", frozen_dtype="bf16", optimizer="adamw", gradient_checkpointing=True, fused_backward_step=True), True, True),
}
ORDER = "FEDGBCA"  # smallest first; the naive ones last (they may not fit in this machine's memory)


def status_gib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(field)


def one(name: str, resolution: int, tiny: bool = False) -> dict:
    import torch

    from common import scene, sd21_base_components
    from dynasyn.tiny import tiny_components
    from dynasyn.train import DynASynTrainer, TrainConfig

    _, overrides, _, _ = CONFIGS[name]
    image, masks, nouns = scene(resolution)
    cfg = TrainConfig(phase1_steps=0, phase2_steps=1, phase2_lr=1e-7, resolution=resolution,
                      **{"prior_preservation": False, **overrides})
    comps = tiny_components(seed=0) if tiny else sd21_base_components()
    model_gib = status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    trainer = DynASynTrainer(comps, image, masks, nouns, cfg, device="cpu", log=lambda *_: None)
    init_peak = status_gib("VmHWM")
    torch.set_grad_enabled(True)
    before = status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    trainer.precompute_targets()  # as train() does: every step's targets, then the frozen copy freed
    targets_peak, targets_s = status_gib("VmHWM"), time.perf_counter() - t0
    after_targets = status_gib("VmRSS")  # the frozen copy freed: what the step starts from
    Path("/proc/self/clear_refs").write_text("5")
    t0 = time.perf_counter()
    trainer._setup_phase(2)
    trainer.training_step()
    step_peak = status_gib("VmHWM")
    return {"name": name, "model_gib": model_gib, "init_peak_gib": init_peak, "before_gib": before,
            "peak_gib": max(init_peak, targets_peak, step_peak), "targets_peak_gib": targets_peak,
            "after_targets_gib": after_targets,
            "step_peak_gib": step_peak, "targets_s": targets_s, "step_s": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=ORDER)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--tiny", action="store_true", help="the tiny random model at 64 px: checks the code path only")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        args.resolution = 64
    if args.one:
        print("RESULT " + json.dumps(one(args.one, args.resolution, args.tiny)), flush=True)
        return
    started = time.time()
    results = {}
    for name in [c for c in args.configs.replace(",", "") if c in CONFIGS]:
        proc = subprocess.run([sys.executable, __file__, "--one", name, "--resolution", str(args.resolution)]
                              + (["--tiny"] if args.tiny else []),
                              capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line:
            results[name] = json.loads(line[7:])
            r = results[name]
            print(f"{name}: peak {r['peak_gib']:.2f} GiB (model {r['model_gib']:.2f} GiB; trainer made {r['init_peak_gib']:.2f} GiB, "
                  f"then {r['before_gib']:.2f} GiB; L_ICA targets "
                  f"{r['targets_peak_gib']:.2f} GiB, {r['targets_s']:.0f} s, then {r['after_targets_gib']:.2f} GiB; step {r['step_peak_gib']:.2f} GiB, "
                  f"{r['step_s']:.0f} s)", flush=True)
        else:
            why = "killed: out of memory" if proc.returncode in (-9, 137) else f"failed (rc {proc.returncode})"
            results[name] = {"name": name, "error": why}
            print(f"{name}: {why} {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}", flush=True)
    from common import machine

    model = "tiny random model (code path only)" if args.tiny else "SD 2.1-base architecture, random weights"
    print(f"\n{model}, {args.resolution} px, batch 1, trainer made, L_ICA targets, then one phase-2 step; {machine()}; "
          f"total {time.time() - started:.0f} s")
    print(f"{'':2} {'configuration':<52} {'text enc.':>9} {'L_ICA':>7} {'made':>6} {'targets':>8} {'step':>6} {'peak GiB':>9}")
    for name in sorted(results):
        desc, _, te, frozen = CONFIGS[name]
        r = results[name]
        parts = " ".join(f"{r[k]:>{w}.2f}" for k, w in (("init_peak_gib", 6), ("targets_peak_gib", 8), ("step_peak_gib", 6))) \
            if "peak_gib" in r else f"{'':>6} {'':>8} {'':>6}"
        peak = f"{r['peak_gib']:.2f}" if "peak_gib" in r else r["error"]
        print(f"{name:2} {desc:<52} {'yes' if te else 'no':>9} {'yes' if frozen else 'no':>7} {parts} {peak:>9}")
    full = [r["peak_gib"] for n, r in results.items() if "peak_gib" in r and CONFIGS[n][2] and CONFIGS[n][3]]
    best = min(full) if full else float("nan")
    print(f"\nbest configuration training UNet + text encoder + tokens with L_ICA: {best:.2f} GiB (goal ≤ 8)")
    print(f"best_full_gib={best:.2f}")


if __name__ == "__main__":
    main()
