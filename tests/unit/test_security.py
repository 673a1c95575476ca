"""Attacks a shared workflow can make through widget values, each performed here and shown to fail.

Library level (no ComfyUI); the node-level versions are in tests/format/test_security_nodes.py.
A foreign host is a listener on 127.0.0.2: loopback to the kernel, but not an address the pack may
treat as "local" unless the operator says so.
"""

import logging

import pytest
import torch

from dynasyn.describe import describe_subjects
from dynasyn.llm import LLMError, chat, resolve_api_key, validate_base_url
from tests.support.openai_server import FakeOpenAI

SECRET = "sk-operator-secret-0123456789"
LLM_ENV = ("DYNASYN_API_KEY", "OPENAI_API_KEY", "DYNASYN_API_HOSTS", "DYNASYN_API_BASE", "DYNASYN_ENDPOINT_HOSTS")


@pytest.fixture()
def clean_env(monkeypatch):
    for var in LLM_ENV:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


@pytest.fixture()
def foreign():
    """An OpenAI-compatible listener on 127.0.0.2 standing in for an attacker's host."""
    try:
        server = FakeOpenAI(host="127.0.0.2")
    except OSError as e:  # pragma: no cover - every Linux routes 127.0.0.0/8 to lo
        pytest.fail(f"cannot bind 127.0.0.2: {e}")
    with server:
        yield server


def _scene():
    image = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(32, 32)
    mask[4:20, 4:20] = 1
    return image, [mask], ["panda"]


# ------------------------------------------------------------------ 1. the key goes only where the operator said
def test_a_workflow_endpoint_never_receives_the_operators_key(clean_env, foreign, tmp_path):
    clean_env.setenv("DYNASYN_API_KEY", SECRET)
    key_file = tmp_path / "api_key"
    key_file.write_text(SECRET)
    image, masks, nouns = _scene()
    endpoint = foreign.base_url  # what a shared workflow's 'endpoint' widget says
    out = describe_subjects(image, masks, nouns, base_url=endpoint, model="llava",
                            api_key=resolve_api_key(endpoint, key_file), seed=0)
    assert out == ["red panda"]
    (req,) = foreign.requests
    assert "authorization" not in req["headers"]
    assert SECRET not in repr(req)


def test_the_key_reaches_a_host_only_when_the_operator_names_it(clean_env, foreign):
    clean_env.setenv("DYNASYN_API_KEY", SECRET)
    clean_env.setenv("DYNASYN_API_HOSTS", f"127.0.0.2:{foreign.httpd.server_address[1]}")
    chat(foreign.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=resolve_api_key(foreign.base_url))
    assert foreign.requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"


# ------------------------------------------------------------------ 4. SSRF: no steering, no metadata, no echo
@pytest.mark.parametrize("url,error", [
    ("http://127.0.0.2:9/v1?x=/admin", "query string"),
    ("http://127.0.0.2:9/v1#frag", "query string"),
    ("http://127.0.0.2:9/v1;p", "query string"),
    ("http://user:pw@127.0.0.2:9/v1", "credentials"),
    ("http://sk-abc@127.0.0.2:9/v1", "credentials"),
    ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://2852039166/v1", "link-local"),              # 169.254.169.254 as one number
    ("http://[::ffff:169.254.169.254]/v1", "link-local"),
    ("http://0.0.0.0:8188/v1", "link-local"),
    ("http://127.0.0.2:9/v1\r\nX-Injected: 1", "not an http"),
    ("file:///etc/passwd", "not an http"),
])
def test_endpoint_urls_that_steer_or_leak_are_refused(clean_env, url, error):
    with pytest.raises(LLMError, match=error):
        validate_base_url(url)
    with pytest.raises(LLMError):
        chat(url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=None)


def test_operator_endpoint_allow_list(clean_env, foreign):
    port = foreign.httpd.server_address[1]
    clean_env.setenv("DYNASYN_ENDPOINT_HOSTS", "127.0.0.1:11434")
    with pytest.raises(LLMError, match="DYNASYN_ENDPOINT_HOSTS"):
        chat(foreign.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=None)
    assert not foreign.requests  # refused before any connection
    clean_env.setenv("DYNASYN_ENDPOINT_HOSTS", f"127.0.0.1:11434, 127.0.0.2:{port}")
    assert chat(foreign.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=None) == "a red panda"


@pytest.mark.parametrize("reply", [
    {"status": 500, "message": "INTERNAL-SECRET db password hunter2"},
    {"status": 403, "body": "INTERNAL-SECRET admin console"},
    {"body": "INTERNAL-SECRET metadata token"},
])
def test_reply_bodies_are_not_echoed_into_errors(clean_env, foreign, reply, caplog):
    foreign.replies = [reply]
    with caplog.at_level(logging.DEBUG, logger="DynASyn"):
        with pytest.raises(LLMError) as err:
            chat(foreign.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=None)
    shown = str(err.value) + "".join(str(a) for a in err.value.args)
    assert "INTERNAL-SECRET" not in shown and err.value.__cause__ is None and err.value.__suppress_context__
    assert "INTERNAL-SECRET" in caplog.text  # kept for the operator, at debug level
