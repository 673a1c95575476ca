"""The demo's Ctrl-C: interrupt ComfyUI, then wait until the running node has ended (its state written), however long."""

from demo.__main__ import wait_for_cancel


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
