"""LLM calls: "unload after" (keep_alive 0 for Ollama-style servers) and the server's model list (/v1/models).

Against the local OpenAI-compatible test server (the real openai client on the wire); a foreign host is a
listener on 127.0.0.2, which the operator did not name.
"""

import pytest
import torch

from dynasyn.describe import describe_subjects
from dynasyn.llm import MAX_MODEL_NAME, MAX_OFFERED_MODELS, LLMError, chat, list_models, offered_models, resolve_api_key
from dynasyn.prompts import llm_prompts
from tests.support.openai_server import FakeOpenAI

SECRET = "sk-operator-secret-0123456789"
LLM_ENV = ("DYNASYN_API_KEY", "OPENAI_API_KEY", "DYNASYN_API_HOSTS", "DYNASYN_API_BASE", "DYNASYN_ENDPOINT_HOSTS")


@pytest.fixture()
def server(monkeypatch):
    for var in LLM_ENV:
        monkeypatch.delenv(var, raising=False)
    with FakeOpenAI() as s:
        yield s


def _scene(n=2):
    image = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0))
    masks = []
    for k in range(n):
        m = torch.zeros(32, 32)
        m[2 + 10 * k:10 + 10 * k, 4:20] = 1
        masks.append(m)
    return image, masks, ["panda", "bowl", "cup"][:n]


def keep_alive(request):
    return request["body"].get("keep_alive", "absent")


def test_unload_sends_keep_alive_0_only_when_asked(server):
    chat(server.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=None)
    chat(server.base_url, "m", [{"role": "user", "content": "hi"}], seed=1, api_key=None, unload=True)
    assert [keep_alive(r) for r in server.requests] == ["absent", 0]
    assert server.requests[1]["body"]["model"] == "m"  # the rest of the request as usual


def test_describe_unloads_after_its_last_request_only(server, tmp_path):
    """One load for all subjects: keep_alive 0 goes with the last request actually sent, not with every one."""
    image, masks, nouns = _scene(3)
    server.replies = ["red panda", "blue bowl", "white cup"]
    describe_subjects(image, masks, nouns, base_url=server.base_url, model="llava", api_key=None, seed=0,
                      cache_dir=tmp_path, unload=True)
    assert [keep_alive(r) for r in server.requests] == ["absent", "absent", 0]
    # the last subject answered from the cache: the last request sent carries it instead
    for f in tmp_path.glob("*.json"):
        f.unlink()
    server.requests.clear()
    server.replies = ["white cup", "red panda", "blue bowl"]
    describe_subjects(image, masks[2:], nouns[2:], base_url=server.base_url, model="llava", api_key=None, seed=0,
                      cache_dir=tmp_path)  # caches the cup
    server.requests.clear()
    describe_subjects(image, masks, nouns, base_url=server.base_url, model="llava", api_key=None, seed=0,
                      cache_dir=tmp_path, unload=True)
    assert [keep_alive(r) for r in server.requests] == ["absent", 0]
    # everything cached: nothing is sent at all
    server.requests.clear()
    describe_subjects(image, masks, nouns, base_url=server.base_url, model="llava", api_key=None, seed=0,
                      cache_dir=tmp_path, unload=True)
    assert server.requests == []


def test_prompts_unload_when_asked(server):
    server.replies = ['{"prompts": ["[1] hugging [2] on a beach", "[2] on top of [1]"]}'] * 2
    llm_prompts(["red panda", "blue bowl"], 2, base_url=server.base_url, model="llama", api_key=None, unload=True)
    llm_prompts(["red panda", "blue bowl"], 2, base_url=server.base_url, model="llama", api_key=None, seed=1)
    assert [keep_alive(r) for r in server.requests] == [0, "absent"]


def test_model_list_is_read_from_the_server(server):
    assert list_models(server.base_url, None) is None  # the server offers no list (404)
    server.models = ["qwen2.5vl:latest", "llava:latest", "llama3.1:8b"]
    assert list_models(server.base_url, None) == ["llama3.1:8b", "llava:latest", "qwen2.5vl:latest"]
    assert server.model_requests[-1]["path"] == "/v1/models"


def test_an_unknown_model_error_lists_the_servers_models(server):
    server.models = ["qwen2.5vl:latest", "llava:latest"]
    server.replies = [{"status": 404, "message": "model 'lava' not found"}]
    with pytest.raises(LLMError, match=r"does not know the model 'lava' \(404\)\. It offers: llava:latest, qwen2\.5vl:latest\."):
        chat(server.base_url, "lava", [{"role": "user", "content": "hi"}], seed=0, api_key=None)
    server.models = None  # no list on offer: the plain advice
    server.replies = [{"status": 404, "message": "model 'lava' not found"}]
    with pytest.raises(LLMError, match=r"does not know the model 'lava' \(404\); pull it or pick another\.$"):
        chat(server.base_url, "lava", [{"role": "user", "content": "hi"}], seed=0, api_key=None)


def test_a_long_model_list_is_cut_in_the_error(server):
    server.models = [f"m{i:03d}" for i in range(80)]
    server.replies = [{"status": 404, "message": "no"}]
    with pytest.raises(LLMError, match=r"m049 \(\+30 more\)\.$"):
        chat(server.base_url, "x", [{"role": "user", "content": "hi"}], seed=0, api_key=None)


def test_model_list_and_unload_never_carry_the_key_to_a_host_the_operator_did_not_name(monkeypatch, tmp_path):
    for var in LLM_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DYNASYN_API_KEY", SECRET)
    with FakeOpenAI(host="127.0.0.2") as foreign:
        foreign.models = ["llava"]
        foreign.replies = [{"status": 404, "message": "no such model"}]
        key = resolve_api_key(foreign.base_url)
        assert key is None
        with pytest.raises(LLMError, match="It offers: llava"):
            chat(foreign.base_url, "x", [{"role": "user", "content": "hi"}], seed=0, api_key=key, unload=True)
        assert list_models(foreign.base_url, key) == ["llava"]
        requests = foreign.requests + foreign.model_requests
        assert len(foreign.model_requests) == 2 and keep_alive(foreign.requests[0]) == 0
        for r in requests:
            assert "authorization" not in r["headers"] and SECRET not in repr(r)
        # once the operator names the host, the key goes there (model list included), over a listed loopback
        monkeypatch.setenv("DYNASYN_API_HOSTS", f"127.0.0.2:{foreign.httpd.server_address[1]}")
        key = resolve_api_key(foreign.base_url)
        assert list_models(foreign.base_url, key) == ["llava"]
        assert foreign.model_requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"


def test_model_listing_refuses_the_urls_chat_refuses(server):
    for url in ("http://169.254.169.254/v1", "http://127.0.0.1:9/v1?x=1", "file:///etc/passwd"):
        with pytest.raises(LLMError):
            list_models(url, None)
    assert list_models("http://127.0.0.1:9/v1", None, timeout=2.0) is None  # nothing listens: no list, no error



def test_the_pages_model_list_follows_the_llm_rules(monkeypatch, tmp_path):
    """offered_models (what the page's model picker shows, for any URL anyone sends): the key only to the host the
    operator named, none to a listener on 127.0.0.2; with DYNASYN_ENDPOINT_HOSTS that listener gets nothing at all;
    only names come back, bounded."""
    for var in LLM_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DYNASYN_API_KEY", SECRET)
    with FakeOpenAI() as named, FakeOpenAI(host="127.0.0.2") as foreign:
        named_host = f"127.0.0.1:{named.httpd.server_address[1]}"
        monkeypatch.setenv("DYNASYN_API_HOSTS", named_host)
        named.models = ["qwen2.5vl", "llava"]
        foreign.models = ["a" * 1000] + [f"m{i:04d}" for i in range(2 * MAX_OFFERED_MODELS)]
        assert offered_models(named.base_url) == ["llava", "qwen2.5vl"]
        assert named.model_requests[-1]["headers"]["authorization"] == f"Bearer {SECRET}"
        names = offered_models(foreign.base_url)
        assert len(names) == MAX_OFFERED_MODELS and names[:2] == ["a" * MAX_MODEL_NAME, "m0000"]
        for r in foreign.model_requests:
            assert "authorization" not in r["headers"] and SECRET not in repr(r)
        foreign.models = None
        assert offered_models(foreign.base_url) is None  # no list on offer (404)
        seen = len(foreign.model_requests)
        monkeypatch.setenv("DYNASYN_ENDPOINT_HOSTS", named_host)
        with pytest.raises(LLMError, match="not one the operator allowed"):
            offered_models(foreign.base_url)
        for url in ("http://169.254.169.254/v1", f"http://a:b@{named_host}/v1", f"http://{named_host}/v1?x=1"):
            with pytest.raises(LLMError):
                offered_models(url)
        assert len(foreign.model_requests) == seen and len(named.model_requests) == 1
        # a host the operator named but no key configured: a clear error, nothing sent
        monkeypatch.delenv("DYNASYN_API_KEY")
        monkeypatch.setattr("dynasyn.llm.DEFAULT_KEY_FILE", tmp_path / "no_key_file")
        with pytest.raises(LLMError, match="No API key"):
            offered_models(named.base_url)
        assert len(named.model_requests) == 1
