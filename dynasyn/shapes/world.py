"""Shapes World: a procedural world of simple objects where the truth of every picture is known.

Each scene is a 64x64 RGB picture of 1-3 flat-coloured objects (ball, box, cone, star, ring) in
saturated colours on a muted background (room, beach, snow, grass), with its caption from a small
grammar, one mask per object and a machine-readable description. Relations (left of, right of,
next to, on top of, under) and poses (jumping = lifted with a shadow below, tilted, lying) stand
in for the paper's interactions and actions. Everything is a pure function of the seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DynASynError

SIZE = 64
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: smooth edges, still fast

CLASSES = ("ball", "box", "cone", "star", "ring")
# Saturated colours, 60 degrees of hue apart; every background is far less saturated.
COLORS = {
    "red": (220, 30, 30),
    "orange": (240, 130, 20),
    "yellow": (235, 215, 25),
    "green": (30, 185, 50),
    "blue": (35, 75, 225),
    "purple": (150, 40, 200),
}
# (upper part, lower part, horizon row as a fraction of the height)
BACKGROUNDS = {
    "room": ((196, 186, 170), (150, 128, 110), 0.55),
    "beach": ((165, 195, 220), (222, 205, 160), 0.45),
    "snow": ((190, 200, 215), (238, 240, 245), 0.45),
    "grass": ((170, 200, 225), (115, 145, 95), 0.45),
}
# The benchmark's and the demo's novel subjects: two-colour patterned objects (the pretrained world has only
# plain ones). Bands are wide (about 3.6 across an object): the world's 4x VAE keeps them, finer ones blur away.
PATTERNS = ("plain", "striped", "checked", "dotted")
PATTERN_BANDS = 3.6
# Colour pairs that no object of the pretrained world wears, in either order and in any pattern: the benchmark's
# and the demo's subjects wear these, so each is a look the world model never saw. Patterned objects in the other
# six pairs teach the model that an object can wear two colours in stripes, checks or dots (without that, its
# denoiser wipes a pattern out as noise and GSA's augmented pairs lose every subject's look).
NOVEL_COLOR_PAIRS = frozenset(frozenset(p) for p in (
    ("red", "yellow"), ("blue", "green"), ("orange", "purple"), ("green", "red"), ("blue", "yellow"),
    ("blue", "orange"), ("green", "purple"), ("green", "yellow"), ("purple", "red")))
BG_PHRASE = {"room": "in the room", "beach": "on the beach", "snow": "in the snow", "grass": "on the grass"}
RELATIONS = ("left of", "right of", "next to", "on top of", "under")
# Poses and the classes whose pose is visible (a rotated ball or ring looks the same).
POSES = {"jumping": CLASSES, "tilted": ("box", "cone", "star"), "lying": ("cone",)}
POSE_ANGLE = {"tilted": 35.0, "lying": 90.0}
GROUND_Y = 54  # where objects stand (pixels from the top)
SHADOW = (70, 70, 75)


@dataclass
class SceneObject:
    cls: str
    color: str
    size: float          # radius in pixels (half the object's extent)
    cx: float            # centre, pixels
    cy: float
    pose: str = ""       # "", "jumping", "tilted", "lying"
    pattern: str = "plain"  # "plain" or a two-colour pattern of color and color2 (novel subjects only)
    color2: str = ""

    @property
    def angle(self) -> float:
        return POSE_ANGLE.get(self.pose, 0.0)


@dataclass
class Scene:
    background: str
    objects: list[SceneObject]
    relation: str = ""                     # relation of object 0 to object 1 (chained for 3 objects)
    caption: str = ""
    image: np.ndarray | None = field(default=None, repr=False)   # HxWx3 uint8
    masks: np.ndarray | None = field(default=None, repr=False)   # NxHxW bool, one per object

    def describe(self) -> dict:
        """The machine-readable description (JSON-serialisable)."""
        return {"background": self.background, "relation": self.relation, "caption": self.caption,
                "objects": [asdict(o) for o in self.objects]}


# ----------------------------------------------------------------------------------------------
# Drawing
# ----------------------------------------------------------------------------------------------

def _rot(points, cx, cy, angle_deg):
    a = math.radians(angle_deg)
    c, s = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def shape_polygon(cls: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Outline of a class (ball/ring: a 48-gon) centred at (cx, cy) with half-extent r, rotated by angle."""
    if cls in ("ball", "ring"):
        return [(cx + r * math.cos(2 * math.pi * i / 48), cy + r * math.sin(2 * math.pi * i / 48)) for i in range(48)]
    if cls == "box":
        k = r * 0.9
        pts = [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    elif cls == "cone":  # upright isosceles triangle, apex up
        pts = [(cx, cy - r), (cx + 0.8 * r, cy + r), (cx - 0.8 * r, cy + r)]
    elif cls == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            t = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(t), cy + rad * math.sin(t)))
    else:
        raise DynASynError(f"Unknown Shapes World class {cls!r}; known: {', '.join(CLASSES)}.")
    return _rot(pts, cx, cy, angle) if angle else pts


def rgb(name: str) -> tuple[int, int, int]:
    if name not in COLORS:
        raise DynASynError(f"Unknown Shapes World colour {name!r}; known: {', '.join(COLORS)}.")
    return COLORS[name]


def pattern_mask(o: SceneObject, k: int) -> np.ndarray:
    """Where ``o``'s second colour goes, at k x the world size: stripes, checks or dots in the object's frame."""
    if o.pattern not in PATTERNS:
        raise DynASynError(f"Unknown pattern {o.pattern!r}; known: {', '.join(PATTERNS)}.")
    n = SIZE * k
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5) / k
    a = math.radians(o.angle)
    u = (xs - o.cx) * math.cos(a) + (ys - o.cy) * math.sin(a)   # object frame: turns with the pose
    v = -(xs - o.cx) * math.sin(a) + (ys - o.cy) * math.cos(a)
    band = 2 * o.size / PATTERN_BANDS
    if o.pattern == "striped":
        return np.floor(v / band).astype(int) % 2 == 1
    if o.pattern == "checked":
        return (np.floor(u / band) + np.floor(v / band)).astype(int) % 2 == 1
    if o.pattern == "dotted":
        du, dv = (u / band / 1.5) % 2 - 1, (v / band / 1.5) % 2 - 1
        return du * du + dv * dv < 0.45
    return np.zeros((n, n), bool)


def _draw_pattern(img: Image.Image, o: SceneObject, k: int) -> Image.Image:
    if o.pattern == "plain":
        return img
    if not o.color2:
        raise DynASynError(f"A {o.pattern} object needs its second colour (color2).")
    shape = Image.new("L", img.size, 0)
    _draw_object(ImageDraw.Draw(shape), o, 255, k)
    where = (np.asarray(shape) >= 128) & pattern_mask(o, k)
    second = Image.new("RGB", img.size, rgb(o.color2))
    return Image.composite(second, img, Image.fromarray((where * 255).astype(np.uint8)))


def _draw_object(draw: ImageDraw.ImageDraw, o: SceneObject, fill, k: int) -> None:
    poly = [(x * k, y * k) for x, y in shape_polygon(o.cls, o.cx, o.cy, o.size, o.angle)]
    draw.polygon(poly, fill=fill)
    if o.cls == "ring":
        ri = o.size * 0.5 * k
        draw.ellipse([o.cx * k - ri, o.cy * k - ri, o.cx * k + ri, o.cy * k + ri], fill=0 if isinstance(fill, int) else None)


def _background(name: str, rng: np.random.Generator, k: int) -> Image.Image:
    top, bottom, horizon = BACKGROUNDS[name]
    h = SIZE * k
    arr = np.empty((h, h, 3), np.float32)
    hy = int(round(horizon * h + rng.uniform(-3, 3) * k))
    arr[:hy] = top
    arr[hy:] = bottom
    # a little texture: a slow vertical shade and faint noise
    arr *= (1.0 + 0.06 * (np.linspace(-1, 1, h)[:, None, None]))
    arr += rng.normal(0, 2.0, size=(h // k, h // k, 1)).repeat(k, 0).repeat(k, 1)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render(scene: Scene, seed: int = 0) -> Scene:
    """Draw ``scene`` (fills ``image`` and ``masks``); the texture noise comes from ``seed``."""
    rng = np.random.default_rng([seed, 7])
    k = SUPERSAMPLE
    img = _background(scene.background, rng, k)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:  # shadows first, under every object
        if o.pose == "jumping":
            w = o.size * 0.9
            draw.ellipse([(o.cx - w) * k, (GROUND_Y - 1.5) * k, (o.cx + w) * k, (GROUND_Y + 1.5) * k], fill=SHADOW)
    masks = []
    for o in scene.objects:
        _draw_object(draw, o, rgb(o.color), k)
        if o.pattern != "plain":
            img = _draw_pattern(img, o, k)
            draw = ImageDraw.Draw(img)
    for o in scene.objects:
        m = Image.new("L", (SIZE * k, SIZE * k), 0)
        _draw_object(ImageDraw.Draw(m), o, 255, k)
        masks.append(np.asarray(m.resize((SIZE, SIZE), Image.BOX)) >= 128)
    # ring holes show the background: redraw the background inside them
    if any(o.cls == "ring" for o in scene.objects):
        bg = _background(scene.background, np.random.default_rng([seed, 7]), k)
        hole = Image.new("L", img.size, 0)
        hd = ImageDraw.Draw(hole)
        for o in scene.objects:
            if o.cls == "ring":
                ri = o.size * 0.5 * k
                hd.ellipse([o.cx * k - ri, o.cy * k - ri, o.cx * k + ri, o.cy * k + ri], fill=255)
        img = Image.composite(bg, img, hole)
    scene.image = np.asarray(img.resize((SIZE, SIZE), Image.BOX)).copy()
    scene.masks = np.stack(masks) if masks else np.zeros((0, SIZE, SIZE), bool)
    for i, m in enumerate(scene.masks):  # later objects hide earlier ones
        for later in scene.masks[i + 1:]:
            m &= ~later
    return scene


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

def object_phrase(o: SceneObject) -> str:
    words = [o.color, o.cls]
    if o.pattern != "plain":
        words[:1] = [o.color, "and", o.color2, o.pattern]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def pose_phrase(pose: str) -> str:
    return {"jumping": "jumping", "tilted": "tilted", "lying": "lying down"}.get(pose, "")


def caption_for(scene: Scene, with_background: bool = True) -> str:
    objs = scene.objects
    if len(objs) == 1:
        text = object_phrase(objs[0])
        if objs[0].pose:
            text += " " + pose_phrase(objs[0].pose)
    else:
        text = f" {scene.relation} ".join(object_phrase(o) for o in objs)
    if with_background:
        text += " " + BG_PHRASE[scene.background]
    return text


# ----------------------------------------------------------------------------------------------
# Sampling scenes
# ----------------------------------------------------------------------------------------------

def _place_single(o: SceneObject, rng) -> None:
    o.cx = float(rng.uniform(8 + o.size, SIZE - 8 - o.size))
    lift = 12.0 if o.pose == "jumping" else 0.0
    o.cy = GROUND_Y - o.size - lift


def _stand(o: SceneObject, base_y: float) -> None:
    """Set o.cy so its lowest point sits at base_y (angle-aware for rotated shapes)."""
    pts = shape_polygon(o.cls, 0.0, 0.0, o.size, o.angle)
    o.cy = base_y - max(y for _, y in pts)


def _top(o: SceneObject) -> float:
    return o.cy + min(y for _, y in shape_polygon(o.cls, 0.0, 0.0, o.size, o.angle))


def arrange_pair(a: SceneObject, b: SceneObject, relation: str, rng: np.random.Generator, *,
                 flat_base: bool = True) -> None:
    """Sizes and places two objects so that ``a <relation> b`` holds (stacking on a box when ``flat_base``)."""
    if relation in ("on top of", "under"):
        lower, upper = (b, a) if relation == "on top of" else (a, b)
        lower.size = float(rng.uniform(9, 12))
        upper.size = float(rng.uniform(7, 10))
        if flat_base and lower.cls in ("cone", "star", "ball", "ring"):  # stack on something with a flat top
            lower.cls = "box"
        _stand(lower, GROUND_Y)
        lower.cx = float(rng.uniform(20, SIZE - 20))
        _stand(upper, _top(lower))
        upper.cx = lower.cx + float(rng.uniform(-1.5, 1.5))
    else:
        for o in (a, b):
            o.size = float(rng.uniform(7, 11))
            _stand(o, GROUND_Y)
        gap = float(rng.uniform(4, 12))
        if relation == "right of" or (relation == "next to" and rng.random() < 0.5):
            first, second = b, a  # ``first`` is the left one
        else:
            first, second = a, b
        first.cx = float(rng.uniform(4 + first.size, SIZE - 4 - first.size - gap - 2 * second.size))
        second.cx = first.cx + first.size + gap + second.size


def sample_scene(seed: int, n_objects: int | None = None, *, classes=CLASSES, colors=tuple(COLORS),
                 backgrounds=tuple(BACKGROUNDS), relations=RELATIONS, poses=tuple(POSES),
                 p_background_word: float = 0.7, patterned: float = 0.0) -> Scene:
    """A random scene (1-3 objects, distinct colours) with its caption, rendered; a pure function of ``seed``.
    ``patterned``: each object's chance of wearing a known two-colour pattern (a colour pair outside
    NOVEL_COLOR_PAIRS); the plain scenes of a seed are the same whatever its value."""
    rng = np.random.default_rng(seed)
    if n_objects is None:
        n_objects = int(rng.choice([1, 2, 3], p=[0.45, 0.5, 0.05]))
    if n_objects not in (1, 2, 3):
        raise DynASynError(f"A Shapes World scene has 1-3 objects, not {n_objects}.")
    cols = [str(c) for c in rng.choice(list(colors), size=n_objects, replace=False)]
    objs = [SceneObject(cls=str(rng.choice(list(classes))), color=c, size=0.0, cx=0.0, cy=0.0) for c in cols]
    bg = str(rng.choice(list(backgrounds)))
    relation = ""
    if n_objects == 1:
        o = objs[0]
        o.size = float(rng.uniform(8, 14))
        allowed = [p for p in poses if o.cls in POSES[p]]
        if allowed and rng.random() < 0.5:
            o.pose = str(rng.choice(allowed))
        _stand(o, GROUND_Y)
        o.cx = float(rng.uniform(8 + o.size, SIZE - 8 - o.size))
        if o.pose == "jumping":
            o.cy -= 12.0
    elif n_objects == 2:
        relation = str(rng.choice(list(relations)))
        arrange_pair(objs[0], objs[1], relation, rng)
    else:
        relation = str(rng.choice(["left of", "right of"]))
        for o in objs:
            o.size = float(rng.uniform(6, 8))
            _stand(o, GROUND_Y)
        xs = [12.0, 32.0, 52.0]
        if relation == "right of":
            xs = xs[::-1]
        for o, x in zip(objs, xs):
            o.cx = x + float(rng.uniform(-1.5, 1.5))
    scene = Scene(background=bg, objects=objs, relation=relation)
    scene.caption = caption_for(scene, with_background=bool(rng.random() < p_background_word))
    if patterned > 0:  # its own random stream, so the plain scene above does not change
        _add_known_patterns(objs, np.random.default_rng([seed, 23]), patterned)
        scene.caption = caption_for(scene, with_background=BG_PHRASE[bg] in scene.caption)
    return render(scene, seed)


def known_partners(color: str) -> list[str]:
    """The colours that ``color`` is worn with by the pretrained world's patterned objects."""
    return [c for c in COLORS if c != color and frozenset((color, c)) not in NOVEL_COLOR_PAIRS]


def _add_known_patterns(objs: list[SceneObject], rng: np.random.Generator, p: float) -> None:
    used = {o.color for o in objs}
    for o in objs:
        partners = [c for c in known_partners(o.color) if c not in used]
        if not partners or rng.random() >= p:
            continue
        o.color2 = str(rng.choice(partners))
        used.add(o.color2)
        o.pattern = str(rng.choice([q for q in PATTERNS[1:] if not (o.cls == "star" and q == "dotted")]))


def scene_from_caption(caption: str, seed: int = 0) -> Scene:
    """Render a scene that satisfies ``caption`` (parsed with :func:`parse_caption`)."""
    spec = parse_caption(caption)
    rng = np.random.default_rng(seed)
    for attempt in range(200):  # rejection-sample a layout whose caption matches the spec
        s = sample_scene(int(rng.integers(1 << 31)), len(spec["objects"]), classes=CLASSES)
        s.objects = [SceneObject(**{**asdict(so), "cls": o["cls"], "color": o["color"], "pose": o["pose"]})
                     for so, o in zip(s.objects, spec["objects"])]
        if spec["relation"] and s.relation != spec["relation"]:
            continue
        if spec["background"]:
            s.background = spec["background"]
        for o in s.objects:
            if len(s.objects) == 1:
                _stand(o, GROUND_Y)
                if o.pose == "jumping":
                    o.cy -= 12.0
        if spec["relation"] in ("on top of", "under"):
            a, b = s.objects
            lower, upper = (b, a) if spec["relation"] == "on top of" else (a, b)
            _stand(lower, GROUND_Y)
            _stand(upper, _top(lower))
        s.caption = caption
        return render(s, seed)
    raise DynASynError(f"Could not lay out a scene for {caption!r}.")


# ----------------------------------------------------------------------------------------------
# Parsing captions (the grammar above, backwards)
# ----------------------------------------------------------------------------------------------

def parse_caption(caption: str) -> dict:
    """``{"objects": [{"cls", "color", "pose"}], "relation", "background"}`` of a grammar caption.

    Unknown words are ignored only where the grammar allows extra words (patterns); a caption
    without any ``<colour> <class>`` phrase is an error.
    """
    text = " " + " ".join(caption.lower().replace(",", " ").split()) + " "
    background = ""
    for name, phrase in BG_PHRASE.items():
        if f" {phrase} " in text:
            background = name
            text = text.replace(f" {phrase} ", " ")
    relation = ""
    for rel in sorted(RELATIONS, key=len, reverse=True):
        if f" {rel} " in text:
            relation = rel
            break
    parts = text.split(f" {relation} ") if relation else [text]
    objects = []
    for part in parts:
        words = part.split()
        cls = next((w for w in words if w in CLASSES), None)
        color = next((w for w in words if w in COLORS), None)
        if cls is None or color is None:
            raise DynASynError(f"Not a Shapes World caption: {caption!r} (each object needs a colour and a class, "
                               f"e.g. 'a red ball left of a blue box').")
        pose = "jumping" if "jumping" in words else "tilted" if "tilted" in words else "lying" if "lying" in words else ""
        objects.append({"cls": cls, "color": color, "pose": pose})
    return {"objects": objects, "relation": relation, "background": background}
