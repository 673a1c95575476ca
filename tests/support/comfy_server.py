"""The demo's ComfyServer with the tests' own testing pack (extra test-only nodes) loaded too."""

from __future__ import annotations

from pathlib import Path

from demo.server import ROOT, ComfyServer as _ComfyServer, execution_error, fresh_base  # noqa: F401

TESTING_PACK = ROOT / "tests" / "integration" / "testing_pack"


class ComfyServer(_ComfyServer):
    def __init__(self, base: Path, env: dict | None = None, startup_timeout: float = 180.0):
        super().__init__(base, env, startup_timeout, extra_custom_nodes=TESTING_PACK)
