"""Makes docs/demo.jpg for the README from a fresh demo run on the built-in tiny model.

    .venv/bin/python scripts/readme_pictures.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from demo import example  # noqa: E402

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
        rgb, masks = example.draw()
        overlay = rgb.astype(np.float32) * 0.35
        for m, c in zip(masks, [(79, 195, 247), (255, 183, 77)]):
            overlay = np.where(m[..., None], 0.45 * rgb + 0.55 * np.array(c, np.float32), overlay)
        tiles = [tile(Image.fromarray(rgb), "the ONE picture"),
                 tile(Image.fromarray(overlay.astype(np.uint8)), "subject masks: ball, box")]
        for i, f in enumerate(sorted((run / "augmented").glob("*.png"))[:3]):
            tiles.append(tile(Image.open(f), f"augmented {i + 1} (tiny model)"))
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
