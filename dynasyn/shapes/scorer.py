"""Reads a Shapes World picture back: which objects, of which class and colour, where, in which pose.

Objects are the saturated pixels (every background is muted); each colour's connected regions
are objects. A region's class comes from rotation-invariant shape measures (a hole -> ring, low
solidity -> star, then how much of the enclosing circle it fills: ball > box > cone); its pose
from the lift above the ground with a shadow below (jumping), the fill of its upright bounding
box (a tilted box) and the direction of its farthest point (a cone's apex, a star's tip).
Captions of the world's grammar are then checked against what was found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import DynASynError
from . import world

MIN_AREA = 14            # pixels; smaller specks are not objects
SAT_MIN, VAL_MIN = 0.5, 0.3


@dataclass
class Detection:
    color: str
    cls: str
    area: int
    cx: float
    cy: float
    top: float
    bottom: float
    left: float
    right: float
    pose: str            # "", "jumping", "tilted", "lying"
    mask: np.ndarray

    @property
    def width(self) -> float:
        return self.right - self.left + 1

    @property
    def height(self) -> float:
        return self.bottom - self.top + 1


def _hsv(img: np.ndarray):
    x = img.astype(np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    d = mx - mn
    s = np.where(mx > 0, d / np.maximum(mx, 1e-6), 0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    dd = np.maximum(d, 1e-6)
    h = np.where(mx == r, ((g - b) / dd) % 6, np.where(mx == g, (b - r) / dd + 2, (r - g) / dd + 4)) * 60.0
    return h, s, mx


_REF_HUES = {}
for _name, _rgb in world.COLORS.items():
    _REF_HUES[_name] = float(_hsv(np.array([[_rgb]], np.uint8))[0][0, 0])


def color_labels(img: np.ndarray) -> np.ndarray:
    """HxW int: index into ``world.COLORS`` of each saturated pixel, -1 elsewhere."""
    h, s, v = _hsv(img)
    names = list(_REF_HUES)
    ref = np.array([_REF_HUES[n] for n in names], np.float32)
    dist = np.abs(((h[..., None] - ref) + 180.0) % 360.0 - 180.0)
    lab = dist.argmin(-1)
    return np.where((s >= SAT_MIN) & (v >= VAL_MIN), lab, -1)


def _hull_area(ys: np.ndarray, xs: np.ndarray) -> float:
    from scipy.spatial import ConvexHull

    pts = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(np.float64)
    try:
        return float(ConvexHull(pts).volume)
    except Exception:  # noqa: BLE001 - degenerate (a line): no area
        return float(len(xs))


def shape_features(mask: np.ndarray) -> dict:
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    ys, xs = np.nonzero(filled)
    area, farea = int(mask.sum()), int(filled.sum())
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    # farthest extent from the centroid (pixel corners), robust to one stray pixel
    d = np.sqrt((xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2) + 0.5
    far = float(d.max())
    k = int(np.argmax(d))
    apex = math.degrees(math.atan2(xs[k] + 0.5 - cx, -(ys[k] + 0.5 - cy)))  # 0 = straight up, clockwise +
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return {"hole": (farea - area) / max(farea, 1), "solidity": farea / max(_hull_area(ys, xs), 1.0),
            "circle_fill": farea / (math.pi * far * far), "extent": farea / bbox, "apex_deg": apex,
            "cx": cx, "cy": cy}


def classify_shape(f: dict) -> str:
    if f["hole"] > 0.08:
        return "ring"
    if f["solidity"] < 0.78:
        return "star"
    if f["circle_fill"] > 0.78:
        return "ball"
    if f["circle_fill"] > 0.5:
        return "box"
    return "cone"


def _pose(cls: str, f: dict, bottom: float, left: float, right: float, shadow: np.ndarray) -> str:
    if bottom < world.GROUND_Y - 6:
        lo, hi = max(int(left) - 2, 0), min(int(right) + 3, shadow.shape[1])
        band = shadow[int(bottom) + 2: world.GROUND_Y + 4, lo:hi]
        if band.sum() >= 4:
            return "jumping"
    if cls == "box" and f["extent"] < 0.75:
        return "tilted"
    if cls == "cone":
        a = abs(f["apex_deg"])
        return "lying" if a > 62 else "tilted" if a > 17 else ""
    if cls == "star":
        a = f["apex_deg"] % 72.0
        return "tilted" if min(a, 72.0 - a) > 18 else ""
    return ""


def world_pixels(img) -> np.ndarray:
    """An RGB picture (HxWx3 uint8, or floats in [0, 1]) as the world's 64 px uint8 pixels."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DynASynError(f"The scorer reads RGB pictures (HxWx3), got shape {img.shape}.")
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    if img.shape[:2] != (world.SIZE, world.SIZE):
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((world.SIZE, world.SIZE), Image.BILINEAR))
    return img


def detect(img: np.ndarray) -> list[Detection]:
    """The objects in an HxWx3 uint8 picture (resized to the world's 64 px if needed)."""
    from scipy import ndimage

    img = world_pixels(img)
    labels = color_labels(img)
    h, s, v = _hsv(img)
    shadow = (s < 0.25) & (v < 0.42)
    names = list(world.COLORS)
    out = []
    for ci, name in enumerate(names):
        m = labels == ci
        if m.sum() < MIN_AREA:
            continue
        comp, n = ndimage.label(m)
        for j in range(1, n + 1):
            cm = comp == j
            area = int(cm.sum())
            if area < MIN_AREA:
                continue
            f = shape_features(cm)
            ys, xs = np.nonzero(cm)
            cls = classify_shape(f)
            top, bottom, left, right = float(ys.min()), float(ys.max()), float(xs.min()), float(xs.max())
            out.append(Detection(name, cls, area, f["cx"], f["cy"], top, bottom, left, right,
                                 _pose(cls, f, bottom, left, right, shadow), cm))
    return out


def _relation_holds(rel: str, a: Detection, b: Detection) -> bool:
    side_by_side = abs(a.bottom - b.bottom) <= 5 and not (a.bottom < b.top + 3 or b.bottom < a.top + 3)
    overlap_x = min(a.right, b.right) - max(a.left, b.left)
    if rel == "left of":
        return a.cx + 3 < b.cx and side_by_side
    if rel == "right of":
        return a.cx > b.cx + 3 and side_by_side
    if rel == "next to":
        return abs(a.cx - b.cx) > 0.4 * (a.width + b.width) and side_by_side
    if rel == "on top of":
        return a.cy < b.cy and a.bottom <= b.top + 4 and overlap_x > 0.3 * min(a.width, b.width)
    if rel == "under":
        return _relation_holds("on top of", b, a)
    raise DynASynError(f"Unknown relation {rel!r}; known: {', '.join(world.RELATIONS)}.")


def largest_per_color(detections: list[Detection]) -> dict[str, Detection]:
    """Each colour's largest detection: the object a caption's colour names."""
    by_color: dict[str, Detection] = {}
    for d in detections:
        if d.color not in by_color or d.area > by_color[d.color].area:
            by_color[d.color] = d
    return by_color


def score_caption(img: np.ndarray, caption: str, detections: list[Detection] | None = None) -> dict:
    """How well ``img`` satisfies ``caption``.

    Per named object: ``color`` (an object of that colour is there), ``cls`` (an object of that
    class is there) and ``bound`` (the object of that colour has that class). ``relation`` /
    ``pose``: None when the caption names none, else whether it holds. ``satisfied``: all of it.
    """
    spec = world.parse_caption(caption)
    dets = detect(img) if detections is None else detections
    by_color = largest_per_color(dets)
    objs = []
    for o in spec["objects"]:
        d = by_color.get(o["color"])
        objs.append({"color": d is not None, "cls": any(x.cls == o["cls"] for x in dets),
                     "bound": d is not None and d.cls == o["cls"], "det": d})
    relation = None
    if spec["relation"]:
        ds = [ob["det"] for ob in objs]
        relation = all(ds) and all(_relation_holds(spec["relation"], x, y) for x, y in zip(ds, ds[1:]))
    pose = None
    poses = [o["pose"] for o in spec["objects"] if o["pose"]]
    if poses:
        pose = all(ob["det"] is not None and ob["det"].pose == o["pose"]
                   for o, ob in zip(spec["objects"], objs) if o["pose"])
    satisfied = all(ob["bound"] for ob in objs) and relation is not False and pose is not False
    return {"objects": [{k: v for k, v in ob.items() if k != "det"} for ob in objs], "relation": relation,
            "pose": pose, "satisfied": bool(satisfied), "relation_name": spec["relation"] or None,
            "pose_names": [o["pose"] for o in spec["objects"] if o["pose"]]}


LATERAL = ("left of", "right of")  # the relations only the caption's word can tell apart (the world is mirror-symmetric)


def summarize(scores: list[dict]) -> dict:
    """Rates over many :func:`score_caption` results (the quality gates' figures)."""
    objs = [o for s in scores for o in s["objects"]]
    rp = [s["relation"] if s["relation"] is not None else s["pose"] for s in scores
          if s["relation"] is not None or s["pose"] is not None]
    rel = [s["relation"] for s in scores if s["relation"] is not None]
    pose = [s["pose"] for s in scores if s["pose"] is not None]

    def rate(xs):
        return round(float(np.mean(xs)), 4) if xs else None

    out = {"n_captions": len(scores), "class": rate([o["cls"] for o in objs]), "color": rate([o["color"] for o in objs]),
           "binding": rate([o["bound"] for o in objs]), "relation_pose": rate(rp), "relation": rate(rel),
           "pose": rate(pose), "satisfied": rate([s["satisfied"] for s in scores])}
    if all("relation_name" in s for s in scores):  # per kind: where the misses are
        kinds = sorted({s["relation_name"] for s in scores if s["relation"] is not None})
        out["by_relation"] = {k: rate([s["relation"] for s in scores if s["relation_name"] == k and s["relation"] is not None])
                              for k in kinds}
        kinds = sorted({p for s in scores for p in s["pose_names"] if s["pose"] is not None})
        out["by_pose"] = {k: rate([s["pose"] for s in scores if k in s["pose_names"] and s["pose"] is not None])
                          for k in kinds}
        out["relation_pose_not_lateral"] = rate([s["relation"] if s["relation"] is not None else s["pose"] for s in scores
                                                 if (s["relation"] is not None and s["relation_name"] not in LATERAL)
                                                 or (s["relation"] is None and s["pose"] is not None)])
    return out


EVAL_SEED0 = 50_000_000
# The fixed sampler of the quality gates (the manifest's figures and tests/unit/test_shapes_model.py).
EVAL_N, EVAL_STEPS, EVAL_GUIDANCE = 200, 20, 5.0


def eval_captions(n: int, seed0: int = EVAL_SEED0) -> list[str]:
    """``n`` held-out captions (scenes of seeds disjoint from the training scenes)."""
    return [world.sample_scene(seed0 + i).caption for i in range(n)]


def evaluate_model(comps, n: int = EVAL_N, steps: int = EVAL_STEPS, guidance: float = EVAL_GUIDANCE,
                   seed0: int = EVAL_SEED0) -> dict:
    """Sample ``n`` held-out captions (one fixed seed each) and score them."""
    from .model import sample_images, to_uint8

    caps = eval_captions(n, seed0)
    imgs = to_uint8(sample_images(comps, caps, [seed0 + i for i in range(n)], steps=steps, guidance=guidance, batch=100))
    return summarize([score_caption(im, c) for im, c in zip(imgs, caps)])
