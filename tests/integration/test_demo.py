"""The one-command demo: runs the shipped dynasyn_full workflow headless on the built-in model, and
refuses bad input before any work starts."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from demo.server import ROOT

pytestmark = pytest.mark.slow


def demo(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "demo", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_demo_makes_every_promised_output(tmp_path):
    out = tmp_path / "run"
    r = demo("--tiny", "--out", out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"everything is in {out}" in r.stdout
    augmented = sorted((out / "augmented").glob("*.png"))
    samples = sorted((out / "samples").glob("*.png"))
    assert augmented and len(samples) == 2
    for f in [*augmented, *samples, out / "loss_curve.png"]:
        with Image.open(f) as im:
            im.load()
            assert min(im.size) >= 64
    index = json.loads((out / "dataset" / "dataset.json").read_text())
    assert len(index["pairs"]) == len(augmented)
    embeddings = sorted((out / "embeddings").glob("*.safetensors"))
    assert [e.name for e in embeddings] == ["dynasyn_ball.safetensors", "dynasyn_box.safetensors"]  # <run>_<noun>
    for e in embeddings:
        vec = next(iter(load_file(e).values()))
        assert vec.shape[-1] == 32 and torch.isfinite(vec).all()  # the tiny model's text width
    ckpt = load_file(out / "checkpoint" / "dynasyn.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in ckpt) and any(k.startswith("cond_stage_model.") for k in ckpt)
    times = json.loads((out / "timings.json").read_text())
    assert {"augment", "train", "sample", "total"} <= set(times)
    assert "wall time per stage" in r.stdout
    assert not (out / ".comfyui").exists()


def test_demo_bad_input_is_refused_before_any_work(tmp_path):
    r = demo("--checkpoint", tmp_path / "nope.safetensors", "--out", tmp_path / "a")
    assert r.returncode == 2 and "no such file" in r.stderr
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, tmp_path / "flux.safetensors")
    r = demo("--checkpoint", tmp_path / "flux.safetensors", "--out", tmp_path / "b")
    assert r.returncode == 2 and "not a Stable Diffusion 1.x / 2.x checkpoint" in r.stderr
    save_file({"conditioner.embedders.0.transformer.x": torch.zeros(1),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, tmp_path / "xl.safetensors")
    r = demo("--checkpoint", tmp_path / "xl.safetensors", "--out", tmp_path / "c")
    assert r.returncode == 2 and "SDXL" in r.stderr
    (tmp_path / "notes.txt").write_text("hello")
    r = demo("--checkpoint", tmp_path / "notes.txt", "--out", tmp_path / "d")
    assert r.returncode == 2 and ".safetensors or .ckpt" in r.stderr
    Image.new("RGB", (64, 64)).save(tmp_path / "me.png")
    r = demo("--image", tmp_path / "me.png", "--out", tmp_path / "e")
    assert r.returncode == 2 and "--image needs --masks" in r.stderr
    Image.new("L", (32, 32)).save(tmp_path / "m.png")
    r = demo("--image", tmp_path / "me.png", "--masks", tmp_path / "m.png", "--class-nouns", "dog", "--out", tmp_path / "f")
    assert r.returncode == 2 and "must be the size of the picture" in r.stderr
    r = demo("--image", tmp_path / "me.png", "--masks", tmp_path / "m.png", "--class-nouns", "dog, cat", "--out", tmp_path / "g")
    assert r.returncode == 2 and "1 masks but 2 class nouns" in r.stderr
    assert not any((tmp_path / x).exists() for x in "abcdefg")  # nothing started


def test_ctrl_c_cancels_cleanly_and_keeps_the_training_state(tmp_path):
    import signal
    import time

    out = tmp_path / "run"
    # SIGINT as a terminal's Ctrl-C delivers it, also when this test runs in a background job (whose shell starts it
    # with SIGINT ignored, which Python and so the demo inherit: the demo then ran to the end and CI failed once)
    proc = subprocess.Popen([sys.executable, "-m", "demo", "--tiny", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 600
        seen = []
        for line in proc.stdout:  # bounded by the deadline and by the process ending
            seen.append(line)
            if "train step 10/" in line or time.time() > deadline:
                break
        assert any("train step 10/" in s for s in seen), "".join(seen)[-3000:]
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr[-3000:]
    assert "cancelling" in stderr and "cancelled; what was made so far is under" in stderr
    state = out / ".comfyui" / "user" / "__dynasyn" / "runs" / "dynasyn" / "state" / "state.json"
    assert state.is_file()  # the trainer saved a resumable state
    assert (out / ".comfyui" / "user" / "__dynasyn" / "datasets" / "dynasyn_dataset" / "dataset.json").is_file()


@pytest.mark.realsize
def test_demo_with_a_real_size_checkpoint_quick(tmp_path):
    """--checkpoint path end to end: a random-weight SD 1.5 checkpoint at its real size (512 px), no SAM."""
    from tests.support.sd_fixtures import random_checkpoint

    ckpt = random_checkpoint("sd15")
    out = tmp_path / "real"
    r = demo("--checkpoint", ckpt, "--quick", "--out", out, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no --sam: pseudo-masks come from the attention maps" in r.stdout
    samples = sorted((out / "samples").glob("*.png"))
    assert len(samples) == 1 and Image.open(samples[0]).size == (512, 512)
    for e in sorted((out / "embeddings").glob("*.safetensors")):
        assert next(iter(load_file(e).values())).shape[-1] == 768  # SD 1.x text width
    assert (out / "checkpoint" / "dynasyn.safetensors").stat().st_size > 1e9
    assert not list((out / "checkpoint").glob(ckpt.name))  # the input checkpoint is not copied as an output


def test_a_killed_demo_leaves_no_server_behind(tmp_path):
    """SIGKILL gives the demo no chance to stop its ComfyUI server: the kernel does (PR_SET_PDEATHSIG)."""
    import os
    import time

    code = ("import sys, time; from demo.server import ComfyServer\n"
            f"with ComfyServer(__import__('pathlib').Path({str(tmp_path / 'base')!r})) as s:\n"
            "    print(s.proc.pid, flush=True); time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(server_pid, 0)
            if open(f"/proc/{server_pid}/stat").read().split(")")[-1].split()[0] == "Z":  # exited, not yet reaped
                return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.2)
    os.kill(server_pid, 9)
    raise AssertionError("the ComfyUI server outlived its killed parent")
