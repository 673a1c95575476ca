"""Start a real ComfyUI server on 127.0.0.1 with the pack linked into custom_nodes (demo and tests).

The server gets its own base directory (models, input, output, custom_nodes), a random free port,
and is always stopped by the caller (``with ComfyServer(...) as s:``). ``run`` queues an API-format
prompt and waits for it; ``on_message`` (when given) receives every websocket message meanwhile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the pack
COMFY_DIR = Path(os.environ.get("DYNASYN_COMFYUI_DIR", ROOT / ".cache" / "ComfyUI"))
PACK_DIR_NAME = "ComfyUI-DynASyn"


def _die_with_parent():
    """A preexec_fn (Linux) that has the kernel send SIGTERM to the server when its parent dies, so that a demo or
    test killed with SIGKILL leaves no server behind; prctl is resolved here, before any fork."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def child():
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return child


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base: Path, env: dict | None = None, startup_timeout: float = 180.0,
                 extra_custom_nodes: Path | None = None):
        self.base = Path(base)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env or {}
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.log_path = self.base / "server.log"
        for sub in ("custom_nodes", "models/checkpoints", "models/embeddings", "models/diffusers", "input", "output", "temp", "user"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        link = self.base / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        self.extra_config = None
        if extra_custom_nodes:
            self.extra_config = self.base / "extra.yaml"
            self.extra_config.write_text(f"dynasyn_extra:\n  custom_nodes: {extra_custom_nodes}\n")

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "ComfyServer":
        if not (COMFY_DIR / "main.py").is_file():
            raise RuntimeError(f"ComfyUI not found at {COMFY_DIR}; run bash scripts/setup_env.sh first.")
        # --use-pytorch-cross-attention: on a CPU ComfyUI otherwise picks its sub-quadratic attention, which made the
        # tiny demo's augment 2.7x and its sampling 2.8x slower here (34.8 s against 13.1 s, 10.3 s against 3.7 s);
        # on NVIDIA GPUs with torch 2 it is ComfyUI's default too, unless xformers is installed (then xformers)
        cmd = [sys.executable, "main.py", "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base), "--disable-api-nodes",
               "--database-url", "sqlite:///:memory:"]
        if self.extra_config:
            cmd += ["--extra-model-paths-config", str(self.extra_config)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFY_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent() if sys.platform == "linux" else None)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/object_info/CheckpointLoaderSimple")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ----------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def free(self) -> None:
        """Ask the server to drop cached outputs and loaded models (big models between tests)."""
        self.post("/free", {"unload_models": True, "free_memory": True})
        time.sleep(2.0)  # the prompt worker applies the flag when idle

    def run(self, prompt: dict, timeout: float = 900, client_id: str | None = None, on_message=None,
            extra_data: dict | None = None) -> dict:
        """POST an API-format prompt and wait for its history entry; returns it (status + outputs)."""
        client_id = client_id or uuid.uuid4().hex
        ws = self._listen(client_id) if on_message else None
        try:
            body = {"prompt": prompt, "client_id": client_id, **({"extra_data": extra_data} if extra_data else {})}
            status, resp = self.post("/prompt", body)
            if status != 200:
                raise AssertionError(f"/prompt refused the graph ({status}): {json.dumps(resp)[:3000]}")
            pid = resp["prompt_id"]
            deadline = time.time() + timeout
            while time.time() < deadline:
                if ws is not None:
                    self._pump(ws, on_message, 0.5)
                try:
                    hist = self.get(f"/history/{pid}")
                except urllib.error.HTTPError:  # the server answered, with an error: say so now
                    raise
                except (TimeoutError, urllib.error.URLError):  # a busy machine: the server answers late, not never
                    if self.proc is not None and self.proc.poll() is not None:
                        raise AssertionError(f"ComfyUI exited while running prompt {pid}:\n{self.log()[-3000:]}")
                    time.sleep(0.5)
                    continue
                if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                    entry = hist[pid]
                    if entry["status"].get("status_str") in ("success", "error"):
                        return entry
                if ws is None:
                    time.sleep(0.5)
            raise AssertionError(f"prompt {pid} did not finish in {timeout}s:\n{self.log()[-3000:]}")
        finally:
            if ws is not None:
                ws.close()

    def _listen(self, client_id: str):
        import websocket  # websocket-client

        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=10)

    @staticmethod
    def _pump(ws, on_message, seconds: float) -> None:
        """Hand every JSON message that arrives within ``seconds`` to ``on_message`` (previews are skipped)."""
        import websocket

        end = time.time() + seconds
        while time.time() < end:
            ws.settimeout(max(0.01, end - time.time()))
            try:
                msg = ws.recv()
            except websocket.WebSocketTimeoutException:
                return
            if isinstance(msg, str):
                on_message(json.loads(msg))


def execution_error(entry: dict) -> str | None:
    """The exception message of a failed prompt (None if it succeeded)."""
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data.get("exception_message", "")
    return None


def fresh_base(tmp: Path) -> Path:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
