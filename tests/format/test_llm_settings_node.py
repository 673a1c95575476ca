"""DynASyn LLM Settings: one endpoint / model for Describe Subjects and Augment Prompts, "unload after", the
server's model list in errors, and the key rules unchanged. In-process with ComfyUI's modules; the endpoints are
the local OpenAI-compatible test server (127.0.0.1, or 127.0.0.2 for a host the operator did not name)."""

import pytest
import torch

from tests.support.openai_server import FakeOpenAI

SECRET = "sk-operator-secret-0123456789"
UNUSED = "http://127.0.0.1:9/v1"  # the nodes' own endpoint widget: nothing listens there
LLM_ENV = ("DYNASYN_API_KEY", "OPENAI_API_KEY", "DYNASYN_API_HOSTS", "DYNASYN_API_BASE", "DYNASYN_ENDPOINT_HOSTS")


@pytest.fixture()
def env(pack, tmp_path, monkeypatch):
    import comfy.model_management as mm
    import folder_paths

    for var in LLM_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(folder_paths, "user_directory", str(tmp_path))  # the reply cache
    mm.interrupt_current_processing(False)
    return monkeypatch


def _scene():
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 32)
    masks[0, 2:12, 4:20] = 1
    masks[1, 16:30, 4:20] = 1
    return image, masks


def settings(pack, endpoint, model="qwen2.5vl", unload_after=True, timeout=20.0):
    return pack.NODE_CLASS_MAPPINGS["DynASynLLMSettings"]().settings(endpoint, model, timeout, unload_after)[0]


def test_one_setting_drives_describe_and_prompts(pack, env):
    image, masks = _scene()
    with FakeOpenAI() as server:
        llm = settings(pack, server.base_url)
        server.replies = ["red panda", "blue bowl", '{"prompts": ["[1] hugging [2] on a beach", "[2] on top of [1]"]}']
        describe = pack.NODE_CLASS_MAPPINGS["DynASynDescribeSubjects"]().describe(
            image, masks, "panda, bowl", "vlm", "llava", UNUSED, 5.0, 0, llm=llm)
        assert describe["result"][0] == "red panda\nblue bowl"
        prompts = pack.NODE_CLASS_MAPPINGS["DynASynAugmentPrompts"]().prompts(
            describe["result"][0], "panda, bowl", 2, "llm", "llama3.1", UNUSED, 5.0, 0, llm=llm)
        assert prompts["result"][1].splitlines()[0] == "red panda hugging blue bowl on a beach"
        assert [r["body"]["model"] for r in server.requests] == ["qwen2.5vl"] * 3  # the setting's model, not the widgets'
        # unload after: the last request of each node asks the server to drop the model (keep_alive 0)
        assert [r["body"].get("keep_alive", "absent") for r in server.requests] == ["absent", 0, 0]
        server.requests.clear()
        server.replies = ["red panda", "blue bowl"]
        pack.NODE_CLASS_MAPPINGS["DynASynDescribeSubjects"]().describe(
            image, masks, "panda, bowl", "vlm", "llava", UNUSED, 5.0, 1, llm=settings(pack, server.base_url, unload_after=False))
        assert [r["body"].get("keep_alive", "absent") for r in server.requests] == ["absent", "absent"]


def test_without_settings_the_widgets_are_used(pack, env):
    image, masks = _scene()
    with FakeOpenAI() as server:
        server.replies = ["red panda", "blue bowl"]
        pack.NODE_CLASS_MAPPINGS["DynASynDescribeSubjects"]().describe(
            image, masks, "panda, bowl", "vlm", "llava", server.base_url, 5.0, 0)
        assert [r["body"]["model"] for r in server.requests] == ["llava", "llava"]
        assert all("keep_alive" not in r["body"] for r in server.requests)


def test_settings_refuse_bad_values(pack, env):
    for url, error in (("http://169.254.169.254/v1", "link-local"), ("http://127.0.0.1:11434/v1?k=1", "query string"),
                       ("ftp://x/v1", "not an http")):
        with pytest.raises(RuntimeError, match=error):
            settings(pack, url)
    with pytest.raises(RuntimeError, match="Name the model"):
        settings(pack, "http://127.0.0.1:11434/v1", model="  ")
    with pytest.raises(RuntimeError, match="not a DynASyn LLM Settings output"):
        pack.NODE_CLASS_MAPPINGS["DynASynAugmentPrompts"]().prompts(
            "red panda\nblue bowl", "panda, bowl", 2, "llm", "llama3.1", UNUSED, 5.0, 0, llm={"endpoint": UNUSED})


def test_unknown_model_error_lists_what_the_server_offers(pack, env):
    with FakeOpenAI() as server:
        server.models = ["llama3.1:8b", "qwen2.5vl:latest"]
        server.replies = [{"status": 404, "message": "model 'lama' not found"}]
        with pytest.raises(RuntimeError, match=r"does not know the model 'lama' \(404\)\. It offers: llama3\.1:8b, "
                                               r"qwen2\.5vl:latest\."):
            pack.NODE_CLASS_MAPPINGS["DynASynAugmentPrompts"]().prompts(
                "red panda\nblue bowl", "panda, bowl", 2, "llm", "x", UNUSED, 5.0, 0,
                llm=settings(pack, server.base_url, model="lama"))


def test_settings_never_send_the_key_to_a_host_the_operator_did_not_name(pack, env):
    env.setenv("DYNASYN_API_KEY", SECRET)
    image, masks = _scene()
    with FakeOpenAI(host="127.0.0.2") as attacker:
        attacker.models = ["llava"]
        attacker.replies = ["red panda", {"status": 404, "message": "no"}]
        with pytest.raises(RuntimeError, match="It offers: llava"):  # the 2nd call fails: the model list is fetched
            pack.NODE_CLASS_MAPPINGS["DynASynDescribeSubjects"]().describe(
                image, masks, "panda, bowl", "vlm", "llava", UNUSED, 5.0, 0, llm=settings(pack, attacker.base_url))
        seen = attacker.requests + attacker.model_requests
        assert len(attacker.requests) == 2 and len(attacker.model_requests) == 1
        for r in seen:
            assert "authorization" not in r["headers"] and SECRET not in repr(r)
