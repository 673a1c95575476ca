"""Makes docs/demo.jpg for the README from a fresh run of the demo without options (the Shapes World model learns
the bundled pair): the ONE picture, its masks, the samples of the new scene (with what the scorer found in them)
and the loss terms.

    .venv/bin/python scripts/readme_pictures.py
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from dynasyn.example_scene import SHAPES_PAIR, SHAPES_SUBJECTS, example_scene  # noqa: E402
from dynasyn.shapes import identity  # noqa: E402

H = 256


def tile(img: Image.Image, label: str) -> Image.Image:
    img = img.convert("RGB").resize((int(img.width * H / img.height), H), Image.NEAREST if img.height < H else Image.BICUBIC)
    out = Image.new("RGB", (img.width, H + 22), (24, 24, 24))
    out.paste(img, (0, 22))
    ImageDraw.Draw(out).text((6, 5), label, fill=(230, 230, 230))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        run = Path(d) / "run"
        subprocess.run([sys.executable, "-m", "demo", "--out", str(run)], cwd=ROOT, check=True)
        ex = example_scene(SHAPES_PAIR)
        rgb = ex.image
        overlay = rgb.astype(np.float32) * 0.35
        for m, c in zip(ex.masks, [(79, 195, 247), (255, 183, 77)]):
            overlay = np.where(m[..., None], 0.45 * rgb + 0.55 * np.array(c, np.float32), overlay)
        tiles = [tile(Image.fromarray(rgb), "the ONE picture (64 px)"),
                 tile(Image.fromarray(overlay.astype(np.uint8)), "subject masks: ball, box")]
        workflow = json.loads((ROOT / "example_workflows" / "dynasyn_shapes_world.json").read_text())
        scene = next(n["widgets_values"][0] for n in workflow["nodes"] if n["type"] == "DynASynScenePrompt")
        subjects = [identity.NovelSubject(*s) for s in SHAPES_SUBJECTS]
        pictures = [np.asarray(Image.open(f).convert("RGB")) for f in sorted((run / "samples").glob("*.png"))]
        found = np.zeros(2, int)
        for p in pictures:
            f = identity.find_subjects(p, subjects)
            found += [f[i] is not None and f[i].identity(subjects[i]) for i in range(2)]
        cols = (len(pictures) + 1) // 2
        grid = Image.new("RGB", (64 * cols, 128), (0, 0, 0))
        for i, p in enumerate(pictures):
            grid.paste(Image.fromarray(p), ((i % cols) * 64, (i // cols) * 64))
        tiles.append(tile(grid, f'"{scene}": scorer finds ball {found[0]}/{len(pictures)}, box {found[1]}/{len(pictures)}'))
        tiles.append(tile(Image.open(run / "loss_curve.png"), "loss terms per step"))
        strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), H + 22), (40, 40, 40))
        x = 0
        for t in tiles:
            strip.paste(t, (x, 0))
            x += t.width + 4
        (ROOT / "docs").mkdir(exist_ok=True)
        strip.save(ROOT / "docs" / "demo.jpg", quality=82)
        print("wrote docs/demo.jpg", strip.size)


if __name__ == "__main__":
    main()
