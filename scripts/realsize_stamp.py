"""The realsize tier's stamp: CI re-runs those tests only when something they depend on changed.

The realsize tests build random-weight SD 1.5 / 2.1 checkpoints at their real size (GBs of RAM, about
ten minutes on two cores). ``bash scripts/test.sh realsize`` runs them; when they pass on a clean tree,
this script records the sha256 of every tracked file they can depend on in ``tests/realsize.passed``.
A plain ``bash scripts/test.sh`` (what CI runs) then skips them only if that hash equals the hash of
the files as they are now; any change to the code, tests or pins makes them run again.

    python scripts/realsize_stamp.py check   # exit 0: passed on identical inputs (prints when)
    python scripts/realsize_stamp.py write   # after a passing run; refuses on a tree with uncommitted inputs
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / "tests" / "realsize.passed"
# What the realsize tests cannot depend on: documentation, pictures, the page, the other tiers' tests.
NOT_INPUTS = ("*.md", "*.jpg", "*.png", "LICENSE", "docs/*", "web/*", "bench/*", "tests/unit/*", "tests/browser/*",
              "package.json", "package-lock.json", "tests/realsize.passed", "dynasyn/shapes/weights/*",
              "scripts/train_shapes_world.py")  # trains the weights; no test runs it


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def inputs() -> list[str]:
    return sorted(f for f in _git("ls-files", "-z").split("\0") if f and not any(fnmatch(f, p) for p in NOT_INPUTS))


def inputs_sha256() -> str:
    h = hashlib.sha256()
    for f in inputs():
        p = ROOT / f
        if p.is_file():  # a tracked file deleted in the work tree counts as absent
            h.update(f.encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def check() -> int:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        print("[realsize] no stamp: the tier runs")
        return 1
    if stamp.get("inputs_sha256") != inputs_sha256():
        print("[realsize] inputs changed since the last passing run: the tier runs")
        return 1
    print(f"[realsize] passed on these exact inputs on {stamp['date']} ({stamp['passed']} tests, {stamp['seconds']} s): "
          "skipped; `bash scripts/test.sh realsize` re-runs it")
    return 0


def write(passed: int, seconds: int) -> int:
    dirty = [line[3:] for line in _git("status", "--porcelain").splitlines() if line[3:] in set(inputs())]
    if dirty:
        print(f"[realsize] not stamped: uncommitted changes to {', '.join(dirty[:5])}")
        return 0
    STAMP.write_text(json.dumps({"inputs_sha256": inputs_sha256(), "passed": passed, "seconds": seconds,
                                 "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
                                indent=1) + "\n")
    print(f"[realsize] stamped {STAMP.relative_to(ROOT)}: commit it so CI skips these inputs")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["check"]:
        sys.exit(check())
    if sys.argv[1:2] == ["write"] and len(sys.argv) == 4:
        sys.exit(write(int(sys.argv[2]), int(sys.argv[3])))
    sys.exit(__doc__)
