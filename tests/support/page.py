"""Drive the real ComfyUI page in headless Chromium (tests/browser/page.cjs) from Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "browser" / "page.cjs"
SCRIPTS = ROOT / "tests" / "browser" / "scripts"


def chromium() -> str | None:
    return os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def prepare_server(server) -> None:
    """No first-run template dialog over the canvas."""
    server.post("/settings/Comfy.TutorialCompleted", True)


def run_page(server, script: str, args: dict | None = None, timeout: float = 600) -> dict:
    """Run ``tests/browser/scripts/<script>.cjs`` against the server's page; returns {value, pageErrors, consoleErrors}."""
    with tempfile.TemporaryDirectory() as d:
        a, r = Path(d) / "args.json", Path(d) / "result.json"
        a.write_text(json.dumps(args or {}))
        env = {**os.environ, "CHROMIUM": chromium() or "/usr/bin/chromium", "NODE_PATH": str(ROOT / "node_modules")}
        proc = subprocess.run(["node", str(RUNNER), server.url + "/", str(SCRIPTS / f"{script}.cjs"), str(a), str(r)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if not r.exists():
            raise RuntimeError(f"page runner failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        out = json.loads(r.read_text())
        if out.get("error"):
            raise RuntimeError(f"page script {script} failed: {out['error']}\npage errors: {out['pageErrors']}")
        return out
