"""LLM calls: an overall deadline, Cancel between attempts, bounded retries of 429 / 5xx, crops sent at <= 768 px.

Against the local OpenAI-compatible test server on 127.0.0.1 (the real openai client on the wire)."""

import base64
import io

import pytest
import torch
from PIL import Image

import dynasyn.llm as llm
from dynasyn.describe import describe_subjects
from dynasyn.llm import LLMCancelled, LLMError, chat
from dynasyn.prompts import llm_prompts
from tests.support.openai_server import FakeOpenAI


@pytest.fixture()
def server(monkeypatch):
    monkeypatch.setattr(llm, "RETRY_BASE_S", 0.01)  # the backoff's length is not what these tests are about
    with FakeOpenAI() as s:
        yield s


def ask(server, **kw):
    return chat(server.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key="k", **kw)


def test_429_and_5xx_are_retried_then_answered(server):
    server.replies = [{"status": 429, "message": "slow down"}, {"status": 503, "message": "busy"},
                      {"status": 500, "message": "oops"}, "a red panda"]
    assert ask(server) == "a red panda"
    assert len(server.requests) == 4


def test_retries_are_bounded(server):
    server.replies = [{"status": 502, "message": "bad gateway"}] * 20
    with pytest.raises(LLMError, match="HTTP 502"):
        ask(server)
    assert len(server.requests) == 1 + llm.RETRIES


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(server, status):
    server.replies = [{"status": status, "message": "no"}] * 5
    with pytest.raises(LLMError):
        ask(server)
    assert len(server.requests) == 1


def test_no_retry_past_the_deadline(server, monkeypatch):
    """A backoff that would end after the overall deadline is not waited for: the call ends with the error."""
    monkeypatch.setattr(llm, "RETRY_BASE_S", 30.0)
    server.replies = [{"status": 429, "message": "slow down"}] * 5
    with pytest.raises(LLMError, match="HTTP 429"):
        ask(server, timeout=5.0)
    assert len(server.requests) == 1


def test_the_deadline_covers_every_call_of_a_node(server):
    """describe_subjects' timeout bounds all subjects together: once spent, no further request is sent."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(32, 32, 3, generator=g)
    masks = [torch.ones(32, 32)] * 3
    server.replies = [{"delay": 1.5, "content": "red panda"}] * 3
    with pytest.raises(LLMError, match="did not answer within 2 s"):
        describe_subjects(image, masks, ["panda", "bowl", "cup"], base_url=server.base_url, model="m", api_key="k",
                          timeout=2.0)
    assert len(server.requests) == 2  # the third subject is never asked


def test_cancel_is_honoured_between_attempts(server):
    server.replies = [{"status": 429, "message": "slow down"}] * 5
    asked = []

    def should_stop():
        asked.append(len(server.requests))
        return len(server.requests) >= 2

    with pytest.raises(LLMCancelled, match="Cancelled while waiting"):
        ask(server, should_stop=should_stop)
    assert len(server.requests) == 2 and asked[0] == 0


def test_cancel_before_any_request_sends_nothing(server):
    with pytest.raises(LLMCancelled):
        llm_prompts(["red panda", "blue bowl"], 3, base_url=server.base_url, model="m", api_key="k",
                    should_stop=lambda: True)
    assert server.requests == []


def test_crops_are_sent_at_most_768_px(server):
    image = torch.rand(1200, 2000, 3)
    masks = [torch.ones(1200, 2000), torch.zeros(1200, 2000)]
    masks[1][100:300, 100:400] = 1
    server.replies = ["red panda", "blue bowl"]
    describe_subjects(image, masks, ["panda", "bowl"], base_url=server.base_url, model="m", api_key="k")
    sizes = []
    for req in server.requests:
        url = req["body"]["messages"][0]["content"][1]["image_url"]["url"]
        sizes.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size)
    assert max(sizes[0]) == 768 and sizes[0][0] > sizes[0][1]  # the whole picture, aspect kept
    assert sizes[1] == (360, 240)  # a small crop (300 x 200 plus 10 % margins) is sent as it is
