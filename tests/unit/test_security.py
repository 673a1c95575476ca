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
def test_reply_bodies_are_not_echoed_into_errors(clean_env, foreign, reply, caplog, monkeypatch):
    import dynasyn.llm

    monkeypatch.setattr(dynasyn.llm, "RETRY_BASE_S", 0.01)  # a 500 is retried: every attempt gets the same reply
    foreign.replies = [reply] * (dynasyn.llm.RETRIES + 1)
    with caplog.at_level(logging.DEBUG, logger="DynASyn"):
        with pytest.raises(LLMError) as err:
            chat(foreign.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=None)
    shown = str(err.value) + "".join(str(a) for a in err.value.args)
    assert "INTERNAL-SECRET" not in shown and err.value.__cause__ is None and err.value.__suppress_context__
    assert "INTERNAL-SECRET" in caplog.text  # kept for the operator, at debug level


# ------------------------------------------------------------------ 2 / 5. resume: no unpickling, no wrong run
def _trainer(config=None, image=None, masks=None, nouns=None, comps_seed=0, **kw):
    from dynasyn.tiny import tiny_components
    from dynasyn.train import DynASynTrainer, TrainConfig
    from tests.support.scene import tensor_scene

    img0, masks0, nouns0 = tensor_scene()
    config = config or TrainConfig(mode="break_a_scene", phase1_steps=2, phase2_steps=2, resolution=64, seed=0, prior_preservation=False)
    return DynASynTrainer(tiny_components(seed=comps_seed), img0 if image is None else image,
                          masks0 if masks is None else masks, nouns0 if nouns is None else nouns, config,
                          device="cpu", log=lambda *_: None, **kw)


@pytest.fixture(scope="module")
def saved_state(tmp_path_factory):
    """A real resumable state: a run cancelled after 3 steps."""
    from dynasyn.train import Cancelled

    folder = tmp_path_factory.mktemp("run") / "state"
    t = _trainer(should_stop=lambda: t.step >= 3)
    with pytest.raises(Cancelled):
        t.train(state_dir=folder)
    return folder


def _copy(src, tmp_path):
    import shutil

    dst = tmp_path / "state"
    shutil.copytree(src, dst)
    return dst


class _Payload:
    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return exec, (f"open({self.flag!r}, 'w').write('code ran')",)


@pytest.mark.parametrize("layout", ["versioned", "format 1"])
def test_a_planted_pickle_in_the_state_is_refused_and_never_runs(saved_state, tmp_path, layout):
    """In the version the pointer names, and in a first-format state (files beside state.json), still read."""
    import json
    import shutil

    from dynasyn.errors import DynASynError
    from dynasyn.state import current_version

    state = _copy(saved_state, tmp_path)
    data = current_version(state)
    if layout == "format 1":
        for f in data.iterdir():
            shutil.move(str(f), state / f.name)
        data.rmdir()
        meta = json.loads((state / "state.json").read_text())
        del meta["data"], meta["format"]
        (state / "state.json").write_text(json.dumps(meta))
        data = state
    flag = tmp_path / "pwned"
    torch.save({"optimizer": _Payload(flag), "torch_gen": torch.zeros(1)}, data / "trainer.pt")
    t = _trainer()
    with pytest.raises(DynASynError, match="never unpickled"):
        t.load_state(state)
    assert not flag.exists()
    assert t.step == 0


@pytest.mark.parametrize("change,named", [
    ("picture", "the reference picture"),
    ("masks", "the subject masks"),
    ("base_model", "the base model"),
    ("config", "lambda_m2a: 0.01 -> 0.5"),
])
def test_resume_refuses_a_state_made_from_other_inputs(saved_state, change, named):
    from dynasyn.errors import DynASynError
    from dynasyn.train import TrainConfig
    from tests.support.scene import tensor_scene

    image, masks, _ = tensor_scene()
    kw = {}
    if change == "picture":
        kw["image"] = image.flip(0)
    elif change == "masks":
        kw["masks"] = [m.roll(2, dims=1) for m in masks]
    elif change == "base_model":
        kw["comps_seed"] = 1
    else:
        kw["config"] = TrainConfig(mode="break_a_scene", phase1_steps=2, phase2_steps=2, resolution=64, seed=0, prior_preservation=False,
                                   lambda_m2a=0.5)
    t = _trainer(**kw)
    with pytest.raises(DynASynError, match="other inputs") as err:
        t.load_state(saved_state)
    msg = str(err.value)
    assert named in msg
    assert [w for w in ("picture", "masks", "base model", "settings") if w in msg] == \
        [w for w in ("picture", "masks", "base model", "settings") if w in named or (w == "settings" and change == "config")]
    assert t.step == 0


def test_resume_accepts_the_same_inputs_with_a_longer_run(saved_state):
    from dynasyn.train import TrainConfig

    t = _trainer(config=TrainConfig(mode="break_a_scene", phase1_steps=2, phase2_steps=5, resolution=64, seed=0, prior_preservation=False))
    t.load_state(saved_state)
    assert t.step == 3


def test_resume_refuses_other_class_nouns_and_unmarked_folders(saved_state, tmp_path):
    from dynasyn.errors import DynASynError

    with pytest.raises(DynASynError, match="other subjects"):
        _trainer(nouns=["cat", "bowl"]).load_state(saved_state)
    state = _copy(saved_state, tmp_path)
    (state / ".dynasyn_state").unlink()
    with pytest.raises(DynASynError, match="not a DynASyn training state"):
        _trainer().load_state(state)


# ------------------------------------------------------------------ 6. only the pack's own folders are deleted
def test_saving_state_never_replaces_or_deletes_a_folder_the_trainer_did_not_write(tmp_path):
    from dynasyn.errors import DynASynError
    from dynasyn.state import remove_owned

    precious = tmp_path / "state"
    precious.mkdir()
    (precious / "dataset.json").write_text("{}")
    t = _trainer()
    with pytest.raises(DynASynError, match="not a DynASyn training state"):
        t.save_state(precious)
    assert (precious / "dataset.json").read_text() == "{}"
    assert not remove_owned(precious) and precious.is_dir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".dynasyn_state").write_text("")
    link = tmp_path / "link"
    link.symlink_to(outside)
    assert not remove_owned(link) and outside.is_dir()  # a symlink is never followed into a deletion
    saved = t.save_state(tmp_path / "mine")
    assert remove_owned(saved) and not saved.exists()


# ------------------------------------------------------------------ 3. a dataset reads only its own PNGs
def _dataset(tmp_path, name="ds"):
    from dynasyn.dataset import AugmentedPair, save_dataset

    g = torch.Generator().manual_seed(0)
    pair = AugmentedPair(torch.rand(8, 8, 3, generator=g), "a panda and a bowl", [0, 1],
                         (torch.rand(2, 8, 8, generator=g) > 0.5).float())
    return save_dataset([pair], tmp_path / name)


def _rewrite(folder, **changes):
    import json

    index = json.loads((folder / "dataset.json").read_text())
    index["pairs"][0].update(changes)
    (folder / "dataset.json").write_text(json.dumps(index))


@pytest.fixture()
def host_secret(tmp_path):
    """A readable PNG outside every dataset folder: what an attacker would like served back."""
    from PIL import Image

    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(secret)
    return secret


@pytest.mark.parametrize("entry", ["absolute", "dotdot", "subfolder", "not_png_name"])
def test_dataset_entries_naming_files_outside_the_folder_are_refused(tmp_path, host_secret, entry):
    from dynasyn.dataset import load_dataset
    from dynasyn.errors import DynASynError

    folder = _dataset(tmp_path)
    name = {"absolute": str(host_secret), "dotdot": "../outside/secret.png", "subfolder": "sub/x.png",
            "not_png_name": "/etc/passwd"}[entry]
    _rewrite(folder, image=name)
    with pytest.raises(DynASynError, match="not a plain .png file name") as err:
        load_dataset(folder)
    assert str(tmp_path) not in str(err.value) and "secret" not in str(err.value)
    _rewrite(folder, image="0000.png", masks=[name, "0000_mask1.png"])
    with pytest.raises(DynASynError, match="not a plain .png file name"):
        load_dataset(folder)


def test_a_symlink_out_of_the_dataset_is_refused(tmp_path, host_secret):
    from dynasyn.dataset import load_dataset
    from dynasyn.errors import DynASynError

    folder = _dataset(tmp_path)
    (folder / "0000.png").unlink()
    (folder / "0000.png").symlink_to(host_secret)
    with pytest.raises(DynASynError, match="not a regular file inside the dataset folder"):
        load_dataset(folder)
    link = tmp_path / "linked_ds"
    link.symlink_to(_dataset(tmp_path, "real"))
    with pytest.raises(DynASynError, match="no dataset folder"):
        load_dataset(link)  # the dataset folder itself may not be a symlink either


def test_dataset_index_and_images_are_validated(tmp_path):
    import json

    from PIL import Image

    from dynasyn.dataset import load_dataset
    from dynasyn.errors import DynASynError

    folder = _dataset(tmp_path)
    for bad in ({"image": 3}, {"subjects": ["0", 1]}, {"masks": ["0000_mask0.png"]}, {"class_prompt": None}):
        good = json.loads((folder / "dataset.json").read_text())
        _rewrite(folder, **bad)
        with pytest.raises(DynASynError, match="expected fields"):
            load_dataset(folder)
        (folder / "dataset.json").write_text(json.dumps(good))
    (folder / "0000.png").write_bytes(b"\x80\x04 not a png, e.g. a pickle")
    with pytest.raises(DynASynError, match="not a readable PNG"):
        load_dataset(folder)
    Image.new("RGB", (64, 64)).save(folder / "0000.png")
    with pytest.raises(DynASynError, match="at most 1024 allowed"):
        load_dataset(folder, max_pixels=1024)  # pixels are capped before decoding
    (folder / "dataset.json").write_text("[1, 2]")
    with pytest.raises(DynASynError, match="version 1"):
        load_dataset(folder)


def test_a_host_without_the_key_says_why_on_401(clean_env, foreign):
    foreign.replies = [{"status": 401, "message": "INTERNAL-SECRET no key"}]
    with pytest.raises(LLMError, match="none was sent.*DYNASYN_API_HOSTS") as err:
        chat(foreign.base_url, "m", [{"role": "user", "content": "hi"}], seed=0, api_key=resolve_api_key(foreign.base_url))
    assert "INTERNAL-SECRET" not in str(err.value)
