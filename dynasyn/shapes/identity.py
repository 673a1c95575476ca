"""Identity, text and leakage of learned subjects in a generated Shapes World picture (Table 1's measures).

A novel subject is a two-colour patterned object (``world.PATTERNS``): the pretrained model only ever saw
plain ones. In a picture, a subject's region is where its two colours are (gaps of a
pattern closed, holes filled). Then, per subject:

- colors: both its colours cover a fair share of one region (the learned look, at the coarsest);
- identity (the CLIP-I analogue): colors, and the region has the subject's class; pattern: besides, the colours are interleaved as the pattern (not two halves: stricter,
  and bounded by what the model's VAE can draw);
- text (the CLIP-T analogue): the prompt's relation between the subjects, or the subject's pose, holds;
- leakage: the share of the region painted in the *other* subject's colours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DynASynError
from . import scorer, world

MIN_SHARE = 0.12         # each of a subject's two colours covers at least this share of its region
MIN_INTERLEAVE = 3       # pieces of the two colours together: a pattern, not two halves


@dataclass(frozen=True)
class NovelSubject:
    cls: str
    color: str
    color2: str
    pattern: str

    def __post_init__(self):
        if self.cls not in world.CLASSES:
            raise DynASynError(f"Unknown class {self.cls!r}; known: {', '.join(world.CLASSES)}.")
        for c in (self.color, self.color2):
            world.rgb(c)
        if self.pattern not in world.PATTERNS or self.pattern == "plain":
            raise DynASynError(f"A novel subject has a two-colour pattern ({', '.join(world.PATTERNS[1:])}).")

    @property
    def colors(self) -> tuple[str, str]:
        return (self.color, self.color2)

    def object(self, **kw) -> world.SceneObject:
        return world.SceneObject(cls=self.cls, color=self.color, color2=self.color2, pattern=self.pattern,
                                 **{"size": 0.0, "cx": 0.0, "cy": 0.0, **kw})


_PALETTE = list(world.COLORS)


@dataclass
class SubjectFound:
    region: np.ndarray   # HxW bool
    shares: tuple[float, float]
    interleave: float
    cls: str
    pose: str
    leakage: float       # share of the region in the other subjects' colours
    detection: scorer.Detection

    def colors(self) -> bool:
        return min(self.shares) >= MIN_SHARE

    def identity(self, subject: NovelSubject) -> bool:
        return self.colors() and self.cls == subject.cls

    def pattern(self, subject: NovelSubject) -> bool:
        return self.identity(subject) and self.interleave >= MIN_INTERLEAVE


def find_subjects(img: np.ndarray, subjects: list[NovelSubject]) -> list[SubjectFound | None]:
    """Each subject's region in ``img`` (None where its colours cover too little)."""
    from scipy import ndimage

    img = scorer.world_pixels(img)
    labels = scorer.color_labels(img)  # by hue: robust to the blur of generated pictures
    _, s, v = scorer._hsv(img)
    shadow = (s < 0.25) & (v < 0.42) & (labels < 0)
    out = []
    for k, subj in enumerate(subjects):
        mine = [_PALETTE.index(c) for c in subj.colors]
        others = [_PALETTE.index(c) for j, o in enumerate(subjects) if j != k for c in o.colors if c not in subj.colors]
        m = np.isin(labels, mine)
        closed = ndimage.binary_closing(m, np.ones((3, 3), bool)) | m
        comp, n = ndimage.label(closed)
        if n == 0:
            out.append(None)
            continue
        sizes = ndimage.sum(m, comp, range(1, n + 1))
        best = int(np.argmax(sizes)) + 1
        if sizes[best - 1] < scorer.MIN_AREA:
            out.append(None)
            continue
        region = comp == best  # not hole-filled: a ring keeps its hole
        # the other subject's colours inside this subject's outline (a leak), not counted as its own
        # the outline of this subject's colours nearby (a leaked colour can split them into pieces)
        near = m & ndimage.binary_dilation(region, iterations=6)
        hull = ndimage.binary_fill_holes(ndimage.binary_closing(near, np.ones((7, 7), bool)) | near)
        area = max(int(region.sum()), 1)
        shares = tuple(float((labels[region] == c).sum()) / area for c in mine)
        # pieces of each colour in the region: a pattern has many, two halves have two
        interleave = float(sum(ndimage.label((labels == c) & region)[1] for c in mine))
        leak = float(np.isin(labels[hull], others).sum()) / max(int(hull.sum()), 1)
        f = scorer.shape_features(region)
        cls = scorer.classify_shape(f)
        ys, xs = np.nonzero(region)
        top, bottom, left, right = float(ys.min()), float(ys.max()), float(xs.min()), float(xs.max())
        pose = scorer._pose(cls, f, bottom, left, right, shadow)
        det = scorer.Detection(subj.color, cls, area, f["cx"], f["cy"], top, bottom, left, right, pose, region)
        out.append(SubjectFound(region, shares, interleave, cls, pose, leak, det))
    return out


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt over subjects: ``relation`` between subjects[0] and subjects[1], or ``pose`` of the one subject."""
    subjects: tuple[int, ...]
    relation: str = ""
    pose: str = ""
    background: str = ""

    def render(self, words: list[str]) -> str:
        """The prompt in the world's grammar with each subject's word (a placeholder, or 'a red ball')."""
        if self.relation:
            text = f" {self.relation} ".join(words[i] for i in self.subjects)
        else:
            text = " ".join([words[self.subjects[0]], world.pose_phrase(self.pose)]).strip()
        return text + (" " + world.BG_PHRASE[self.background] if self.background else "")


def score(img: np.ndarray, subjects: list[NovelSubject], prompt: EvalPrompt) -> dict:
    """colors (share of the prompt's subjects whose two colours share one region), identity (with the subject's
    class too), pattern (identity with
    the colours interleaved), text (the relation or pose holds), leakage (mean share of other subjects' colours
    inside each found subject)."""
    found = find_subjects(img, subjects)
    named = [(subjects[i], found[i]) for i in prompt.subjects]
    colors = float(np.mean([f is not None and f.colors() for s, f in named]))
    identity = float(np.mean([f is not None and f.identity(s) for s, f in named]))
    pattern = float(np.mean([f is not None and f.pattern(s) for s, f in named]))
    if prompt.relation:
        a, b = (found[i] for i in prompt.subjects[:2])
        text = a is not None and b is not None and scorer._relation_holds(prompt.relation, a.detection, b.detection)
    else:
        f = found[prompt.subjects[0]]
        text = f is not None and f.pose == prompt.pose
    leaks = [f.leakage for _, f in named if f is not None]
    return {"colors": colors, "identity": identity, "pattern": pattern, "text": float(text),
            "leakage": float(np.mean(leaks)) if leaks else 0.0}


def novel_scene(subjects: list[NovelSubject], prompt: EvalPrompt, seed: int = 0, background: str | None = None
                ) -> world.Scene:
    """A rendered scene where ``prompt`` holds for these subjects (the references and the scorer's tests)."""
    rng = np.random.default_rng([seed, 11])
    objs = [subjects[i].object() for i in prompt.subjects]
    if prompt.relation:
        world.arrange_pair(objs[0], objs[1], prompt.relation, rng, flat_base=False)
    else:
        o = objs[0]
        o.size, o.pose = float(rng.uniform(9, 13)), prompt.pose
        world._stand(o, world.GROUND_Y)
        o.cx = float(rng.uniform(8 + o.size, world.SIZE - 8 - o.size))
        if o.pose == "jumping":
            o.cy -= 12.0
    bg = background or prompt.background or str(rng.choice(list(world.BACKGROUNDS)))
    scene = world.Scene(background=bg, objects=objs, relation=prompt.relation)
    scene.caption = world.caption_for(scene)
    return world.render(scene, seed)


def sample_novel_scene(seed: int) -> tuple[world.Scene, list[NovelSubject], EvalPrompt]:
    """A random scene of two patterned subjects in distinct world colours (a pure function of ``seed``)."""
    rng = np.random.default_rng([seed, 13])
    cols = [str(c) for c in rng.choice(list(world.COLORS), 4, replace=False)]
    subjects = []
    for i in range(2):
        cls = str(rng.choice(world.CLASSES))
        patterns = [p for p in world.PATTERNS[1:] if not (cls == "star" and p == "dotted")]  # too thin for dots
        subjects.append(NovelSubject(cls, cols[2 * i], cols[2 * i + 1], str(rng.choice(patterns))))
    if rng.random() < 0.3:
        k = int(rng.integers(2))
        poses = [p for p in world.POSES if subjects[k].cls in world.POSES[p]] + [""]
        prompt = EvalPrompt((k,), pose=str(rng.choice(poses)))
    else:
        prompt = EvalPrompt((0, 1), relation=str(rng.choice(world.RELATIONS)))
    return novel_scene(subjects, prompt, seed), subjects, prompt


def pair_quality(image, masks, subject_ids: list[int], subjects: list[NovelSubject]) -> list[dict]:
    """How well an augmented pair teaches its subjects (L_AUG's training data): for each pseudo-mask
    ``masks[k]`` (HxW, of subject ``subject_ids[k]``), ``colors``: the subject's two colours are still in one
    region of ``image`` (GSA kept its look), ``on_subject``: the share of the pseudo-mask on that region
    (1.0: the mask lies on the subject; 0.0: on something else, or the subject is gone)."""
    from scipy import ndimage

    pixels = scorer.world_pixels(image)
    found = find_subjects(pixels, subjects)
    out = []
    for m, i in zip(masks, subject_ids):
        m = np.asarray(m, dtype=np.float32)
        if m.shape != pixels.shape[:2]:
            m = ndimage.zoom(m, (pixels.shape[0] / m.shape[0], pixels.shape[1] / m.shape[1]), order=0)
        m = m > 0.5
        f = found[i]
        on = float((m & f.region).sum() / max(1, m.sum())) if f is not None else 0.0
        out.append({"colors": bool(f is not None and f.colors()), "on_subject": round(on, 4)})
    return out
