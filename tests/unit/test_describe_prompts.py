import base64
import json

import pytest
import torch

from dynasyn.describe import clean_phrase, describe_subjects, subject_crop
from dynasyn.llm import LLMError, resolve_api_key, validate_base_url
from dynasyn.prompts import llm_prompts, offline_prompts, validate_template
from tests.support.openai_server import FakeOpenAI


def scene():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(48, 64, 3, generator=g)
    a = torch.zeros(48, 64)
    a[4:20, 6:30] = 1
    b = torch.zeros(48, 64)
    b[26:46, 30:62] = 1
    return image, [a, b], ["panda", "bowl"]


@pytest.fixture()
def server():
    with FakeOpenAI() as s:
        yield s


def test_describe_sends_each_subject_crop_with_model_and_seed_and_caches(server, tmp_path):
    image, masks, nouns = scene()
    server.replies = ["A fluffy red panda.", '"blue ceramic bowl"']
    out = describe_subjects(image, masks, nouns, base_url=server.base_url, model="llava", api_key="sk-test", seed=7,
                            cache_dir=tmp_path)
    assert out == ["fluffy red panda", "blue ceramic bowl"]
    assert len(server.requests) == 2
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["authorization"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "llava" and body["seed"] == 7
    text, img = body["messages"][0]["content"]
    assert "panda" in text["text"]
    png = base64.b64decode(img["image_url"]["url"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the same request again: answered from the cache, no second call (and no bill)
    again = describe_subjects(image, masks, nouns, base_url=server.base_url, model="llava", api_key="sk-test", seed=7,
                              cache_dir=tmp_path)
    assert again == out and len(server.requests) == 2
    # another seed is another request
    server.replies = ["panda", "bowl"]
    describe_subjects(image, masks, nouns, base_url=server.base_url, model="llava", api_key="sk-test", seed=8,
                      cache_dir=tmp_path)
    assert len(server.requests) == 4


def test_subject_crop_keeps_subject_pixels_and_greys_the_rest():
    image, masks, _ = scene()
    crop = subject_crop(image, masks[0], pad=0.0)
    assert crop.shape == (16, 24, 3)
    expected = (image[4:20, 6:30].numpy() * 255).round()
    assert abs(crop.astype(float) - expected).max() <= 0.5


@pytest.mark.parametrize("reply,error", [
    ({"status": 401, "message": "bad key"}, "rejected the API key"),
    ({"status": 404, "message": "no model"}, "does not know the model"),
    ({"status": 500, "message": "boom"}, "HTTP 500"),
    ({"body": "<html>not json</html>"}, "not a chat completion"),
    ("", "empty reply"),
    ("here is a detailed description of it", "more than 4 words"),
])
def test_describe_errors_are_clear(server, tmp_path, reply, error, monkeypatch):
    image, masks, nouns = scene()
    monkeypatch.setattr("dynasyn.llm.RETRY_BASE_S", 0.01)
    server.replies = [reply] * 8  # a 5xx is retried: every attempt gets the same reply
    with pytest.raises(LLMError, match=error):
        describe_subjects(image, masks[:1], nouns[:1], base_url=server.base_url, model="m", api_key="k", cache_dir=tmp_path)
    assert not list(tmp_path.glob("*.json"))  # a bad reply is never cached


def test_timeout_and_connection_refused(server):
    image, masks, nouns = scene()
    server.replies = [{"delay": 2.0, "content": "panda"}]
    with pytest.raises(LLMError, match="did not answer within 1 s"):
        describe_subjects(image, masks[:1], nouns[:1], base_url=server.base_url, model="m", api_key="k", timeout=1.0)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(LLMError, match="Cannot reach"):
        describe_subjects(image, masks[:1], nouns[:1], base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key="k")


def test_offline_description_is_the_class_noun_or_the_users_phrase():
    image, masks, nouns = scene()
    assert describe_subjects(image, masks, nouns) == ["panda", "bowl"]
    assert describe_subjects(image, masks, nouns, phrases=["red panda toy", ""]) == ["red panda toy", "bowl"]
    with pytest.raises(LLMError, match="one class noun per subject"):
        describe_subjects(image, masks, ["panda"])


def test_key_comes_from_env_or_file_and_goes_only_to_configured_hosts(monkeypatch, tmp_path):
    for var in ("DYNASYN_API_KEY", "OPENAI_API_KEY", "DYNASYN_API_HOSTS", "DYNASYN_API_BASE", "DYNASYN_ENDPOINT_HOSTS"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "key").write_text("sk-file\n")
    # a host the operator did not name gets no key, loopback included, whatever key exists
    assert resolve_api_key("http://127.0.0.1:11434/v1", tmp_path / "key") is None
    assert resolve_api_key("https://api.example.com/v1", tmp_path / "key") is None
    # the default host (OpenAI) gets the key from the file, then from the environment
    with pytest.raises(LLMError, match="DYNASYN_API_KEY"):
        resolve_api_key("https://api.openai.com/v1", tmp_path / "none")
    assert resolve_api_key("https://api.openai.com/v1", tmp_path / "key") == "sk-file"
    monkeypatch.setenv("DYNASYN_API_KEY", "sk-env")
    assert resolve_api_key("https://api.openai.com/v1", tmp_path / "key") == "sk-env"
    assert resolve_api_key("https://api.example.com/v1", tmp_path / "key") is None
    # the operator names hosts: DYNASYN_API_HOSTS replaces the default, DYNASYN_API_BASE adds its host
    monkeypatch.setenv("DYNASYN_API_HOSTS", "api.example.com, 127.0.0.1:11434")
    assert resolve_api_key("https://api.example.com/v1", tmp_path / "key") == "sk-env"
    assert resolve_api_key("http://127.0.0.1:11434/v1", tmp_path / "key") == "sk-env"
    assert resolve_api_key("http://127.0.0.1:1234/v1", tmp_path / "key") is None  # another port, another service
    assert resolve_api_key("https://api.openai.com/v1", tmp_path / "key") is None
    monkeypatch.setenv("DYNASYN_API_BASE", "https://llm.corp.example/v1")
    assert resolve_api_key("https://llm.corp.example/v1", tmp_path / "key") == "sk-env"
    with pytest.raises(LLMError, match="only sent over https"):
        resolve_api_key("http://api.example.com/v1", tmp_path / "key")
    with pytest.raises(LLMError, match="credentials"):
        validate_base_url("https://user:pw@api.example.com/v1")
    with pytest.raises(LLMError, match="not an http"):
        validate_base_url("api.example.com")


def test_clean_phrase():
    assert clean_phrase("The small red panda toy.\n") == "small red panda toy"
    assert clean_phrase("Description: blue bowl") == "blue bowl"


def test_llm_prompts_parse_validate_dedupe_and_cache(server, tmp_path):
    good = ["[1] jumping into [2] on a beach", "[2] rolling after [1] in a park", "[1] jumping into [2] on a beach"]
    bad = ["[1] sleeping alone", "[1] and [3] dancing", 5, "[1] [1] [2]"]
    server.replies = ["```json\n" + json.dumps({"prompts": good + bad}) + "\n```"]
    templates, dropped = llm_prompts(["fluffy panda", "blue bowl"], 5, base_url=server.base_url, model="m", api_key="k",
                                     seed=3, cache_dir=tmp_path)
    assert [t.text for t in templates] == good[:2] and dropped == 5
    body = server.requests[0]["body"]
    assert body["response_format"] == {"type": "json_object"} and body["seed"] == 3
    assert "[1] = fluffy panda" in body["messages"][0]["content"]
    t = templates[0]
    assert t.render(["panda", "bowl"]) == "panda jumping into bowl on a beach"
    assert t.render(["<asset0>", "<asset1>"]) == "<asset0> jumping into <asset1> on a beach"
    assert templates[1].subjects == [1, 0]
    llm_prompts(["fluffy panda", "blue bowl"], 5, base_url=server.base_url, model="m", api_key="k", seed=3,
                cache_dir=tmp_path)
    assert len(server.requests) == 1
    server.replies = ["not json at all"]
    with pytest.raises(LLMError, match="not JSON"):
        llm_prompts(["a", "b"], 2, base_url=server.base_url, model="m", api_key="k", seed=4)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_offline_prompts_distinct_reference_every_subject_and_are_seeded(n):
    a = offline_prompts(n, 30, seed=1)
    assert len(a) == 30 and len({t.text.lower() for t in a}) == 30
    for t in a:
        assert sorted(t.subjects) == list(range(n)), t.text
        assert validate_template(t.text, n) == t
    assert offline_prompts(n, 30, seed=1) == a
    assert offline_prompts(n, 30, seed=2) != a
    if n == 2:  # both kinds of scene: acting alone and interacting
        assert any(" while " in t.text for t in a) and any(" while " not in t.text for t in a)


def test_offline_prompts_bad_counts():
    with pytest.raises(LLMError, match="at least 1"):
        offline_prompts(2, 0)
    with pytest.raises(LLMError, match="1 to 8"):
        offline_prompts(9, 3)
