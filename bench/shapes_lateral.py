"""Does the Shapes World model read "left of" / "right of"? Same seed, the two captions, which order comes out.

The world is seen side-on and is mirror-symmetric: nothing in a picture says which side is left, so the
caption's word is the only cue for the lateral relations. For N random pairs of subjects this draws
"A left of B" and "A right of B" from the same seed and finds both objects with the scorer. A model that reads
the word swaps the order between the two pictures; one that ignores it draws the same order for both.

    .venv/bin/python bench/shapes_lateral.py [--weights W] [--pairs 48]

Ends with one line: same_order= (pairs drawn in the same order for both words, of those where the scorer found
both objects both times; 1.0 = the word is ignored, 0.0 = always swapped), left_ok=, right_ok=, found=.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynasyn.shapes import model as sm  # noqa: E402
from dynasyn.shapes import scorer, world  # noqa: E402


def caption(c1: str, k1: str, rel: str, c2: str, k2: str) -> str:
    objs = [world.SceneObject(cls=k1, color=c1, size=8, cx=0, cy=0), world.SceneObject(cls=k2, color=c2, size=8, cx=0, cy=0)]
    return world.caption_for(world.Scene(background="room", objects=objs, relation=rel), with_background=False)


def first_on_the_left(img: np.ndarray, cap: str) -> bool | None:
    """Whether the first named object is left of the second; None when the scorer misses either."""
    by_color = scorer.largest_per_color(scorer.detect(img))
    a, b = (by_color.get(o["color"]) for o in world.parse_caption(cap)["objects"])
    return None if a is None or b is None else bool(a.cx < b.cx)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=str(sm.WEIGHTS_FILE))
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    comps = sm.load_shapes_components(args.weights, verify=False)
    rng = np.random.default_rng(args.seed)
    caps, seeds = [], []
    for i in range(args.pairs):
        c1, c2 = (str(c) for c in rng.choice(list(world.COLORS), 2, replace=False))
        k1, k2 = (str(k) for k in rng.choice(list(world.CLASSES), 2))
        caps += [caption(c1, k1, "left of", c2, k2), caption(c1, k1, "right of", c2, k2)]
        seeds += [7000 + i, 7000 + i]
    imgs = sm.to_uint8(sm.sample_images(comps, caps, seeds, steps=scorer.EVAL_STEPS, guidance=scorer.EVAL_GUIDANCE,
                                        batch=2 * args.pairs))
    order = [first_on_the_left(im, c) for im, c in zip(imgs, caps)]
    both = [(order[i], order[i + 1]) for i in range(0, len(order), 2) if None not in (order[i], order[i + 1])]
    same = sum(left == right for left, right in both)
    print(f"{len(both)} of {args.pairs} pairs with both objects found both times; same order for both words: {same}")
    print(f"same_order={same / max(len(both), 1):.3f} left_ok={sum(l for l, _ in both) / max(len(both), 1):.3f} "
          f"right_ok={sum(not r for _, r in both) / max(len(both), 1):.3f} found={len(both) / args.pairs:.3f}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    sys.exit(main())
