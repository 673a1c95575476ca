import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from dynasyn.errors import DynASynError, UnsupportedModelError
from dynasyn.models import load_clip_state_dict, load_components, make_noise_scheduler, normalize_clip_keys, save_components
from dynasyn.tiny import tiny_components, tiny_tokenizer


def test_tiny_tokenizer_knows_words_and_falls_back_to_characters():
    tok = tiny_tokenizer()
    ids = tok("a photo of a panda").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and len(ids) == 7
    assert len(tok("a zyx").input_ids) > 4  # unknown word -> several character tokens
    assert tok.pad_token_id == tok.eos_token_id
    assert tiny_tokenizer("sd2").pad_token_id == 0


def test_tiny_components_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = tiny_components(seed=1)
    after = torch.rand(1)
    b = tiny_components(seed=1)
    assert torch.equal(before, after)
    for (ka, va), (kb, vb) in zip(a.unet.state_dict().items(), b.unet.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_save_and_load_round_trip_through_the_real_loader(tmp_path, prediction):
    comps = tiny_components(seed=0, prediction_type=prediction)
    comps.tokenizer.add_tokens(["<asset0>"])
    comps.text_encoder.resize_token_embeddings(len(comps.tokenizer))
    save_components(comps, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == prediction
    back = load_components(tmp_path / "m")
    assert back.prediction_type == prediction
    assert back.tokenizer.convert_tokens_to_ids("<asset0>") == len(back.tokenizer) - 1
    for src, dst in [(comps.unet, back.unet), (comps.text_encoder, back.text_encoder), (comps.vae, back.vae)]:
        s, d = src.state_dict(), dst.state_dict()
        assert s.keys() == d.keys()
        assert all(torch.equal(s[k], d[k]) for k in s)
    x = torch.randn(1, 4, 32, 32)
    c = torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(comps.unet(x, 10, c).sample, back.unet(x, 10, c).sample)


def test_clip_keys_of_either_transformers_layout_load(tmp_path):
    comps = tiny_components(seed=0)
    te = comps.text_encoder
    sd = te.state_dict()
    with_prefix = {("text_model." + k if not k.startswith("text_model.") else k): v + 1 for k, v in sd.items()}
    without = normalize_clip_keys(with_prefix, sd.keys())
    assert without.keys() == sd.keys()
    load_clip_state_dict(te, with_prefix)
    assert all(torch.equal(te.state_dict()[k], with_prefix[("text_model." + k if not k.startswith("text_model.") else k)])
               for k in sd)


def test_partial_clip_weights_are_refused_not_silently_random():
    te = tiny_components(seed=0).text_encoder
    sd = dict(list(te.state_dict().items())[:3])
    with pytest.raises(DynASynError, match="tensors are missing"):
        load_clip_state_dict(te, sd)


def test_unsupported_folders_get_clear_errors(tmp_path):
    with pytest.raises(DynASynError, match="not a diffusers Stable Diffusion folder"):
        load_components(tmp_path)
    comps = tiny_components(seed=0)
    save_components(comps, tmp_path / "xl")
    idx = json.loads((tmp_path / "xl" / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionXLPipeline"
    idx["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps(idx))
    with pytest.raises(UnsupportedModelError, match="Stable Diffusion 1.x"):
        load_components(tmp_path / "xl")


def test_inpainting_unet_is_refused(tmp_path):
    comps = tiny_components(seed=0)
    save_components(comps, tmp_path / "inp")
    cfg_path = tmp_path / "inp" / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = 9
    cfg_path.write_text(json.dumps(cfg))
    w = tmp_path / "inp" / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(w)
    sd["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    save_file(sd, w)
    with pytest.raises(UnsupportedModelError, match="input channels"):
        load_components(tmp_path / "inp")


def test_noise_scheduler_prediction_type():
    assert make_noise_scheduler("v_prediction").config.prediction_type == "v_prediction"
    with pytest.raises(UnsupportedModelError, match="sample"):
        make_noise_scheduler("sample")
