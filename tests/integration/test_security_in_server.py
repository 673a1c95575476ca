"""Attacks through the real server's HTTP API (issue 13): planted resume state, dataset paths, served folders."""

import json
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest
import torch

from tests.integration.test_train_in_server import Listener, train_graph, write_inputs
from tests.support.comfy_server import execution_error

pytestmark = pytest.mark.slow


def upload(server, kind: str, subfolder: str, filename: str, data: bytes) -> int:
    """POST /upload/image as a browser would (multipart), into ``kind`` = output / input / temp."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in (("type", kind), ("subfolder", subfolder), ("overwrite", "true")):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    req = urllib.request.Request(server.url + "/upload/image", data=body,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


class _Payload:
    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return exec, (f"open({self.flag!r}, 'w').write('code ran')",)


def test_an_uploaded_state_is_never_resumed_or_unpickled(server, tmp_path):
    write_inputs(server)
    flag = server.base / "pwned"
    pickle_file = tmp_path / "trainer.pt"
    torch.save({"optimizer": _Payload(flag), "orig_embeddings": None}, pickle_file)
    state = {"step": 1, "phase": 1, "config": {}, "tokens": ["<asset0>", "<asset1>"], "class_nouns": ["panda", "bowl"],
             "history": []}
    # the old state location (output/dynasyn/<run>/state) is writable by anyone who reaches the port
    for name, data in (("state.json", json.dumps(state).encode()), ("trainer.pt", pickle_file.read_bytes()),
                       (".dynasyn_state", b"")):
        assert upload(server, "output", "dynasyn/it_evil/state", name, data) == 200
    # the new one (user/__dynasyn, a System User folder) is reachable by no route
    req = urllib.request.Request(server.url + "/userdata/" + urllib.parse.quote("../__dynasyn/runs/it_evil/x.json", safe=""),
                                 data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=30)
    assert not (server.base / "user" / "__dynasyn" / "runs" / "it_evil").exists()
    listener = Listener(server)
    try:
        entry = server.run(train_graph("it_evil", phase1=1, phase2=1), client_id=listener.client_id)
    finally:
        listener.close()
    assert entry["status"]["status_str"] == "success", execution_error(entry) or server.log()[-3000:]
    assert not flag.exists()
    steps = [e["step"] for e in listener.events("dynasyn.train") if e["node"] == "6"]
    assert steps == [1, 2]  # a fresh run: nothing planted was resumed


def test_load_dataset_takes_no_path_over_http(server, tmp_path):
    from dynasyn.dataset import AugmentedPair, save_dataset

    pair = AugmentedPair(torch.rand(8, 8, 3), "a panda and a bowl", [0, 1], torch.ones(2, 8, 8))
    outside = save_dataset([pair], server.base / "outside_ds")  # a valid dataset on the host, outside the folder
    for name in ("dataset.json", "0000.png", "0000_mask0.png", "0000_mask1.png"):  # and one uploaded into output/
        assert upload(server, "output", "dynasyn/datasets/uploaded", name, (outside / name).read_bytes()) == 200
    options = server.get("/object_info/DynASynLoadDataset")["DynASynLoadDataset"]["input"]["required"]["folder"][0]
    assert "uploaded" not in options and str(outside) not in options
    for folder in (str(outside), "../../outside_ds", "uploaded", "/etc"):
        graph = {"1": {"class_type": "DynASynLoadDataset", "inputs": {"folder": folder}},
                 "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}}}
        status, resp = server.post("/prompt", {"prompt": graph, "client_id": uuid.uuid4().hex})
        assert status == 400, resp  # refused at validation: not one of the listed datasets
        assert "value_not_in_list" in json.dumps(resp)
