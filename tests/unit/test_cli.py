import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dynasyn.cli import main
from dynasyn.models import load_components
from tests.support.scene import write_scene


@pytest.fixture()
def files(tmp_path):
    return write_scene(tmp_path, "img.png", ("m0.png", "m1.png"))


def test_train_command_writes_model_embeddings_and_curve(files, capsys):
    out = files / "out"
    rc = main(["train", "--model", "tiny", "--image", str(files / "img.png"), "--mask", str(files / "m0.png"),
               "--mask", str(files / "m1.png"), "--class-nouns", "panda", "bowl", "--out", str(out),
               "--phase1-steps", "2", "--phase2-steps", "1", "--resolution", "64", "--mode", "break_a_scene",
               "--phase2-lr", "1e-4", "--no-train-text-encoder", "--num-class-images", "2", "--class-image-steps", "2"])
    assert rc == 0
    assert "step 3/3 phase 2" in capsys.readouterr().out
    comps = load_components(out / "model")
    ids = comps.tokenizer.convert_tokens_to_ids(["<asset0>", "<asset1>"])
    emb = load_file(out / "embeddings" / "dynasyn_asset1.safetensors")["emb_params"]
    torch.testing.assert_close(emb[0], comps.text_encoder.get_input_embeddings().weight[ids[1]])
    assert Image.open(out / "loss.png").size == (640, 360)
    assert len(json.loads((out / "history.json").read_text())) == 3
    # break_a_scene keeps Break-a-Scene's prior preservation: its class images are cached with the run
    assert sorted(p.name for p in (out / "class_images").glob("*.png")) == ["class_0000.png", "class_0001.png"]
    assert "prior" in json.loads((out / "history.json").read_text())[-1]["terms"]


def test_train_help_states_each_modes_terms_phases_subsets_and_prior(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "dynasyn: L_MD + L_M2A + L_ICA + L_AUG; phases 1 + 2; union sampling; prior preservation off" in text
    assert "dreambooth: L_MD; phase 2 only" in text and "one subject per step; prior preservation on" in text
    assert "dynasyn_md: L_MD + L_M2A;" in text and "Table 3" in text and "Break-a-Scene" in text


def test_train_command_bad_input_is_a_clear_error(files, capsys):
    rc = main(["train", "--model", "tiny", "--image", str(files / "missing.png"), "--mask", str(files / "m0.png"),
               "--class-nouns", "panda", "--out", str(files / "o")])
    assert rc == 2 and "missing.png does not exist" in capsys.readouterr().err
    rc = main(["train", "--model", "tiny", "--image", str(files / "img.png"), "--mask", str(files / "m0.png"),
               "--class-nouns", "panda", "bowl", "--out", str(files / "o")])
    assert rc == 2 and "one class noun per mask" in capsys.readouterr().err


def test_train_command_runs_data_parallel_on_two_processes(files):
    """torchrun (what ``accelerate launch --multi_gpu`` runs underneath) with two CPU processes, gloo on
    127.0.0.1: gradients are averaged and the trainer checks at the end that both hold the same weights."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = files / "out_dp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "dynasyn", "train", "--model", "tiny", "--device", "cpu",
           "--image", str(files / "img.png"), "--mask", str(files / "m0.png"), "--mask", str(files / "m1.png"),
           "--class-nouns", "panda", "bowl", "--out", str(out), "--phase1-steps", "2", "--phase2-steps", "2",
           "--resolution", "64", "--mode", "dynasyn", "--phase2-lr", "1e-4"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(__import__("pathlib").Path(__file__).parents[2]))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "data parallel on 2 processes" in log
    assert proc.stdout.count("step 4/4 phase 2") == 1, log[-3000:]  # only the main process reports
    assert (out / "model" / "unet").is_dir() and (out / "embeddings" / "dynasyn_asset0.safetensors").is_file()
    assert len(json.loads((out / "history.json").read_text())) == 4
