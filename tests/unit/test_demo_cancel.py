"""The demo's Ctrl-C: interrupt ComfyUI, then wait until the running node has ended (its state written), however long;
and its wait for a job, which a busy server's late answers must not end."""

import pytest

from demo.__main__ import wait_for_cancel
from demo.server import ComfyServer


class SlowServer:
    """/queue reports the node running for ``busy`` polls (a big state written on a loaded machine); some polls time out."""

    def __init__(self, busy):
        self.busy, self.polls, self.posts = busy, 0, []
        self.proc, self.log_path = None, "server.log"

    def post(self, path, body):
        self.posts.append(path)
        return 200, {}

    def get(self, path):
        assert path == "/queue"
        self.polls += 1
        if self.polls % 7 == 0:
            raise TimeoutError("timed out")  # a busy server: the demo keeps asking
        running = [["prompt"]] if self.polls <= self.busy else []
        return {"queue_running": running, "queue_pending": []}


def test_ctrl_c_waits_until_the_running_node_has_ended_however_long(capsys):
    server = SlowServer(busy=1000)  # far beyond the minute the demo used to wait before stopping the server
    assert wait_for_cancel(server, poll=0, say_every=0) is True
    assert server.posts == ["/interrupt"]
    assert server.polls > 1000
    err = capsys.readouterr().err
    assert "waiting for ComfyUI to end the running node and write what it made" in err
    assert "still waiting" in err


def test_a_second_ctrl_c_stops_waiting():
    class Impatient(SlowServer):
        def get(self, path):
            raise KeyboardInterrupt

    assert wait_for_cancel(Impatient(busy=5), poll=0) is False


class LateServer(ComfyServer):
    """/history times out ``late`` times (training holds the machine's two cores), then reports the job done."""

    def __init__(self, late, exits=False):
        self.late, self.polls, self.exits = late, 0, exits
        self.proc, self.log_path = None, None

    def post(self, path, body, timeout=30):
        return 200, {"prompt_id": "p1"}

    def get(self, path, timeout=30):
        assert path == "/history/p1"
        self.polls += 1
        if self.polls <= self.late:
            raise TimeoutError("timed out")
        return {"p1": {"status": {"completed": True, "status_str": "success"}, "outputs": {}}}

    def log(self):
        return "server log"


def test_a_job_survives_history_polls_that_time_out(monkeypatch):
    monkeypatch.setattr("demo.server.time.sleep", lambda s: None)
    server = LateServer(late=5)
    entry = server.run({"1": {}}, timeout=60)
    assert entry["status"]["status_str"] == "success" and server.polls == 6


def test_a_server_that_exited_ends_the_wait_with_its_log(monkeypatch):
    class Exited:
        def poll(self):
            return 1

    monkeypatch.setattr("demo.server.time.sleep", lambda s: None)
    server = LateServer(late=10**6)
    server.proc = Exited()
    with pytest.raises(AssertionError, match="ComfyUI exited while running prompt p1"):
        server.run({"1": {}}, timeout=60)
    assert server.polls == 1


def test_an_error_status_from_history_is_raised_at_once(monkeypatch):
    import urllib.error

    class Failing(LateServer):
        def get(self, path, timeout=30):
            self.polls += 1
            raise urllib.error.HTTPError(path, 500, "Internal Server Error", {}, None)

    monkeypatch.setattr("demo.server.time.sleep", lambda s: None)
    server = Failing(late=0)
    with pytest.raises(urllib.error.HTTPError):
        server.run({"1": {}}, timeout=60)
    assert server.polls == 1
