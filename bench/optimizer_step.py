"""AdamW's step on the CPU: torch's per-tensor path (its CPU default), foreach, and the fused kernel that
``dynasyn.optim.make_optimizer`` now picks on the CPU as on CUDA.

    .venv/bin/python bench/optimizer_step.py [--rounds 15] [--threads 1]

The tensors are the Shapes World UNet's and text encoder's (what phase 2 trains), with fixed random gradients.
Per round each variant steps once, in turn, so machine noise hits them alike; medians are compared, and the
weights after the same steps are compared too (the kernels must agree to float rounding). Last line:
fused_over_per_tensor=<x> foreach_over_per_tensor=<y> max_weight_diff=<z> (name=value pairs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import machine, median, timed  # noqa: E402

from dynasyn.shapes.model import load_shapes_components  # noqa: E402

VARIANTS = {"per_tensor": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    comps = load_shapes_components()
    base = [p.detach() for m in (comps.unet, comps.text_encoder) for p in m.parameters()]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) for p in base]
    weights, opts = {}, {}
    for name, kw in VARIANTS.items():
        weights[name] = [p.clone().requires_grad_() for p in base]
        for w, gr in zip(weights[name], grads):
            w.grad = gr
        opts[name] = torch.optim.AdamW(weights[name], lr=1e-4, weight_decay=1e-2, **kw)
        opts[name].step()  # the moments exist before timing
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(timed(opts[name].step))
    print(f"{machine()}; {len(base)} tensors, {sum(p.numel() for p in base) / 1e6:.1f} M weights, "
          f"{args.threads} thread(s), {args.rounds} rounds")
    for name in VARIANTS:
        print(f"  {name:<11} {median(times[name]) * 1000:7.1f} ms/step")
    diff = max(float((a - b).abs().max()) for a, b in zip(weights["fused"], weights["per_tensor"]))
    pt = median(times["per_tensor"])
    print(f"fused_over_per_tensor={median(times['fused']) / pt:.3f} "
          f"foreach_over_per_tensor={median(times['foreach']) / pt:.3f} max_weight_diff={diff:.2e}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
