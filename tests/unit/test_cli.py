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
               "--phase2-lr", "1e-4", "--no-train-text-encoder"])
    assert rc == 0
    assert "step 3/3 phase 2" in capsys.readouterr().out
    comps = load_components(out / "model")
    ids = comps.tokenizer.convert_tokens_to_ids(["<asset0>", "<asset1>"])
    emb = load_file(out / "embeddings" / "dynasyn_asset1.safetensors")["emb_params"]
    torch.testing.assert_close(emb[0], comps.text_encoder.get_input_embeddings().weight[ids[1]])
    assert Image.open(out / "loss.png").size == (640, 360)
    assert len(json.loads((out / "history.json").read_text())) == 3


def test_train_command_bad_input_is_a_clear_error(files, capsys):
    rc = main(["train", "--model", "tiny", "--image", str(files / "missing.png"), "--mask", str(files / "m0.png"),
               "--class-nouns", "panda", "--out", str(files / "o")])
    assert rc == 2 and "missing.png does not exist" in capsys.readouterr().err
    rc = main(["train", "--model", "tiny", "--image", str(files / "img.png"), "--mask", str(files / "m0.png"),
               "--class-nouns", "panda", "bowl", "--out", str(files / "o")])
    assert rc == 2 and "one class noun per mask" in capsys.readouterr().err
