import shutil

import pytest

from demo import example
from tests.support.comfy_server import ComfyServer, fresh_base
from tests.support.openai_server import FakeOpenAI
from tests.support.page import chromium, prepare_server

SENTINEL_KEY = "sk-dynasyn-sentinel-7c1e"  # must never appear in a saved workflow or PNG


@pytest.fixture(scope="session")
def fake_llm():
    with FakeOpenAI() as s:
        s.default = "shiny red ball"
        yield s


@pytest.fixture(scope="session")
def server(tmp_path_factory, fake_llm):
    """A real ComfyUI server for the page; the API key exists only in its environment."""
    if not chromium() or not shutil.which("node"):
        pytest.fail("The browser tier needs chromium and node: run bash scripts/setup_browser.sh")
    base = fresh_base(tmp_path_factory.mktemp("comfy_browser"))
    # the operator names the (local) VLM host that may receive the key; no other host ever gets it
    env = {"DYNASYN_API_KEY": SENTINEL_KEY, "DYNASYN_API_HOSTS": f"127.0.0.1:{fake_llm.httpd.server_address[1]}"}
    with ComfyServer(base, env=env) as s:
        example.write(base / "input")
        prepare_server(s)
        yield s
    shutil.rmtree(base, ignore_errors=True)
