"""The Shapes World's segmenter: what SAM is to photographs, exact for this world's pictures.

Objects are saturated pixels on muted backgrounds (the scorer's rule), so a subject is the connected
region of saturated pixels under its prompt, whatever its colours (a striped subject is one region of
two colours). It answers SAM's prompts (a box and/or points, ``dynasyn.sam.SubjectPrompt``) through
``segment_prompts``, which ``dynasyn.sam.segment`` calls in place of SAM: the drafts' pseudo-masks and
the re-segmentation of GSA outputs then run the pack's own code on this world with a segmenter as
good as SAM is on photographs (the 16x16 attention threshold alone is far coarser on 64 px pictures).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import scorer


class ShapesSegmenter:
    """A SAM stand-in for Shapes World pictures (any size; segmented at the world's 64 px)."""

    radius = 3          # pixels around each point whose colours are the subject's (at least; a quarter of the box)
    min_share = 0.08    # a colour counts when it covers this share of that window (not a stray edge pixel)

    def segment_prompts(self, image: torch.Tensor, prompts: Sequence) -> torch.Tensor:
        from scipy import ndimage

        H, W = image.shape[:2]
        pixels = scorer.world_pixels(image.detach().cpu().numpy())
        size = pixels.shape[0]
        labels = scorer.color_labels(pixels)
        out = torch.zeros(len(prompts), size, size)
        sx, sy = size / W, size / H
        for i, p in enumerate(prompts):
            box = (0, 0, size, size)
            if p.box is not None:
                x0, y0, x1, y1 = p.box
                box = (max(0, int(np.floor(x0 * sx))), max(0, int(np.floor(y0 * sy))),
                       min(size, int(np.ceil(x1 * sx))), min(size, int(np.ceil(y1 * sy))))
            seeds = [(min(size - 1, int(y * sy)), min(size - 1, int(x * sx)))
                     for (x, y), lab in zip(p.points, p.labels or [1] * len(p.points)) if lab == 1]
            if not seeds:  # a box alone: its centre
                seeds = [((box[1] + box[3]) // 2, (box[0] + box[2]) // 2)]
            # the subject's colours: those around its points (a pattern's two colours interleave within a few
            # pixels), so touching subjects of other colours stay apart
            colors = set()
            r = max(self.radius, min(box[2] - box[0], box[3] - box[1]) // 4)
            for y, x in seeds:
                win = labels[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1]
                vals, counts = np.unique(win[win >= 0], return_counts=True)
                colors |= {int(v) for v, c in zip(vals, counts) if c >= self.min_share * win.size}
            if not colors:
                continue
            mine = np.isin(labels, list(colors))
            in_box = np.zeros_like(mine)
            in_box[box[1]:box[3], box[0]:box[2]] = True
            # closed: a pattern's colours blend to grey where they meet, a line that would cut the subject apart
            mine = (ndimage.binary_closing(mine, np.ones((3, 3), bool)) | mine) & in_box
            comp, _ = ndimage.label(mine, structure=np.ones((3, 3), bool))
            ids = {int(comp[y, x]) for y, x in seeds} - {0}
            if not ids:  # the points fall between pattern pixels: the largest region of those colours
                counts = np.bincount(comp.ravel())
                counts[0] = 0
                ids = {int(counts.argmax())} if counts.max() > 0 else set()
            mask = np.isin(comp, list(ids)) & (comp > 0)
            # a pattern's other colour enclosed by these pixels (dots) is the subject too; a ring's hole is not
            saturated = labels >= 0
            mask |= ndimage.binary_fill_holes(mask) & saturated
            mask |= ndimage.binary_dilation(mask) & saturated & in_box  # the blended colours along its edges
            out[i] = torch.from_numpy(mask).float()
        if (size, size) != (H, W):
            out = torch.nn.functional.interpolate(out[:, None], size=(H, W), mode="nearest")[:, 0]
        return out
