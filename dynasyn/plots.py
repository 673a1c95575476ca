"""Loss curves drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS = {"loss": (235, 235, 235), "md": (80, 160, 255), "m2a": (255, 170, 60), "ica": (110, 220, 120), "aug": (230, 90, 200), "prior": (160, 160, 255)}


def loss_curve_image(history, width: int = 640, height: int = 360, as_pil: bool = False):
    """Each loss term per step on a log scale; a ComfyUI IMAGE ``[1, H, W, 3]`` (or a PIL image)."""
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    pad_l, pad_r, pad_t, pad_b = 48, 12, 12, 28
    series: dict[str, list[tuple[int, float]]] = {"loss": []}
    for h in history:
        series["loss"].append((h.step, h.loss))
        for k, v in h.terms.items():
            series.setdefault(k, []).append((h.step, v))
    values = [v for pts in series.values() for _, v in pts if v > 0 and math.isfinite(v)]
    if values:
        lo, hi = math.log10(min(values)), math.log10(max(values))
        hi = hi if hi > lo else lo + 1
        steps = [s for s, _ in series["loss"]]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        x = lambda s: pad_l + (s - s0) / (s1 - s0) * (width - pad_l - pad_r)
        y = lambda v: pad_t + (hi - math.log10(max(v, 10 ** lo))) / (hi - lo) * (height - pad_t - pad_b)
        for name, pts in series.items():
            pts = [(x(s), y(v)) for s, v in pts if math.isfinite(v) and v > 0]
            if len(pts) > 1:
                draw.line(pts, fill=COLORS.get(name, (200, 200, 200)), width=2)
        draw.text((4, pad_t), f"{10 ** hi:.2g}", fill=(160, 160, 160))
        draw.text((4, height - pad_b - 10), f"{10 ** lo:.2g}", fill=(160, 160, 160))
        draw.text((pad_l, height - pad_b + 8), f"step {s0}", fill=(160, 160, 160))
        draw.text((width - pad_r - 70, height - pad_b + 8), f"step {s1}", fill=(160, 160, 160))
    lx = pad_l + 8
    for name in series:
        draw.text((lx, pad_t + 2), name, fill=COLORS.get(name, (200, 200, 200)))
        lx += 8 * len(name) + 16
    if as_pil:
        return img
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
