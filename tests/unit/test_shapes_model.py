"""The committed Shapes World weights: size, integrity, and the quality gates measured by the scorer."""


import numpy as np
import pytest
import torch

from dynasyn.errors import DynASynError
from dynasyn.shapes import model as sm
from dynasyn.shapes import scorer, world

# Issue 11's gates. ACHIEVED (below) would hold what the committed training run reached where a gate was missed (the
# test then asserts that figure minus a small margin, so a regression still fails); none is missed now.
GATES = {"class": 0.90, "color": 0.90, "relation_pose": 0.80, "vae_psnr_db": 30.0}
# Every gate is met by the committed weights (2026-12-08): relation/pose 0.949, class 0.901, colour 0.988, VAE PSNR
# 32.8 dB. Until then the weights ignored "left of" / "right of" (relation/pose 0.744); a lateral cool-down with token
# grounding and the text encoder's probe taught them, and its 16x16 cross-attention queries and keys, set back to the
# starting weights (--reset-map-sides 16), keep the demo's learned subjects (README, Shapes World). Class meets its
# gate by one object (0.9009): the test asserts the gate on the manifest's figures, which it re-measures.
ACHIEVED: dict[str, float] = {}
REROUND = {"class": 0.01}  # three objects of 323
MARGIN = {"class": 0.03, "color": 0.03, "relation_pose": 0.03, "vae_psnr_db": 0.5}


def bar(name: str) -> float:
    return GATES[name] if name not in ACHIEVED else ACHIEVED[name] - MARGIN[name]


@pytest.fixture(scope="module")
def comps():
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    return sm.load_shapes_components()


def test_weights_are_small_fp16_and_match_manifest():
    from safetensors.torch import load_file

    man = sm.manifest()
    assert sm.WEIGHTS_FILE.stat().st_size <= 20 * 1024 * 1024
    assert sm.sha256_of(sm.WEIGHTS_FILE) == man["sha256"]
    assert all(v.dtype == torch.float16 for v in load_file(str(sm.WEIGHTS_FILE)).values())
    assert man["file"] == sm.WEIGHTS_FILE.name
    for key in ("steps", "training_time_s", "quality", "command"):
        assert key in man
    assert man["quality"]["n_captions"] >= 200


def test_saving_the_loaded_weights_gives_the_committed_file_byte_for_byte(comps, tmp_path):
    """What the training script writes is reproducible to the byte (the manifest's sha256), not only to the tensor.
    With two metadata keys an unsorted writer still matches about half the time; test_export's 16 keys are the
    regression guard for the sorting itself."""
    assert sm.save_weights(comps, tmp_path / "again.safetensors") == sm.manifest()["sha256"]


def test_model_is_sd_shaped(comps):
    from dynasyn.attention import capture_layers

    assert comps.vae_scale_factor == 4 and comps.vae.config.scaling_factor == sm.LATENT_SCALE
    assert comps.text_encoder.config.vocab_size == 49408 and comps.tokenizer("a red ball").input_ids[1] == 320  # CLIP BPE
    assert comps.unet.config.sample_size == sm.LATENT_SIZE
    assert len(capture_layers(comps.unet, sm.LATENT_SIZE)) >= 2  # 16x16 cross-attention maps, down and up
    assert comps.prediction_type == "epsilon"
    assert comps.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_fold_latent_normalisation_keeps_reconstructions():
    c = sm.build_shapes_components(seed=3)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = c.vae.decode(c.vae.encode(x).latent_dist.mean).sample
        sm.fold_latent_normalisation(c.vae, torch.tensor([0.3, -0.2, 0.1, 0.0]), torch.tensor([2.0, 0.5, 1.0, 3.0]))
        after = c.vae.decode(c.vae.encode(x).latent_dist.mean).sample
    assert (before - after).abs().max() < 1e-4


def test_vae_reconstructs_held_out_scenes(comps):
    imgs = np.stack([world.sample_scene(scorer.EVAL_SEED0 + 10_000 + i).image for i in range(64)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        lat = comps.vae.encode(x).latent_dist.mean
        rec = comps.vae.decode(lat).sample.clamp(-1, 1)
    mse = ((rec - x) / 2).pow(2).flatten(1).mean(1)
    psnr = float((10 * torch.log10(1 / mse)).mean())
    assert psnr >= bar("vae_psnr_db"), psnr
    # SD's convention: latents x 0.18215 have about unit spread
    assert 0.6 < float((lat * comps.vae.config.scaling_factor).std()) < 1.6


def test_quality_gates_on_held_out_captions(comps):
    """>= 200 held-out captions, DDIM with a fixed seed per caption, scored by the scorer."""
    q = scorer.evaluate_model(comps)
    assert q["n_captions"] >= 200
    man = sm.manifest()["quality"]
    for name in ("class", "color", "relation_pose"):
        assert man[name] >= bar(name), (name, man)  # the gate, on the figures measured with the weights
        # and measured again here: the same on this machine; another CPU may round a few of the 200 captions' pictures
        # otherwise. Class is 0.9009 (291 of 323 objects, one above its gate), so it alone may miss by up to three
        # objects here; the others must meet their gates
        assert q[name] >= bar(name) - REROUND.get(name, 0.0), (name, q)
        assert abs(q[name] - man[name]) <= 0.03, (name, q, man)  # the manifest's figures are reproducible
    # each relation on its own, the lateral ones included (they were 0.23 / 0.39 before 2026-12-08)
    assert q["relation_pose_not_lateral"] >= GATES["relation_pose"], q
    for rel in ("on top of", "under", "next to", "left of", "right of"):
        assert q["by_relation"][rel] >= 0.80, (rel, q)


def test_sampling_is_seeded_and_batch_independent(comps):
    a = sm.sample_images(comps, ["a red ball", "a blue box left of a green star"], [7, 8], steps=4, batch=2)
    b = sm.sample_images(comps, ["a blue box left of a green star"], [8], steps=4, batch=1)
    assert torch.allclose(a[1], b[0], atol=1e-4)
    with pytest.raises(DynASynError, match="one seed per caption"):
        sm.sample_images(comps, ["a red ball"], [1, 2])


def test_missing_weights_give_a_clear_error(tmp_path):
    with pytest.raises(DynASynError, match="train_shapes_world"):
        sm.load_shapes_components(tmp_path / "none.safetensors")
