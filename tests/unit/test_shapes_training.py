"""scripts/train_shapes_world.py's lateral aids: mirror pairs (a lateral scene seen in a mirror is the scene of the other
word), the text encoder's lateral probe and token grounding (each object's words attend to its mask)."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dynasyn.shapes import scorer, world

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_shapes_world.py"


@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("train_shapes_world", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_mirrored_caption_swaps_only_the_lateral_words(trainer):
    assert trainer.mirrored_caption("a red ball left of a blue box on the beach") == "a red ball right of a blue box on the beach"
    assert trainer.mirrored_caption("an orange star right of a green ring left of a red cone") == \
        "an orange star left of a green ring right of a red cone"
    assert trainer.mirrored_caption("a red ball on top of a blue box") == "a red ball on top of a blue box"


def test_a_mirrored_lateral_scene_satisfies_the_mirrored_caption(trainer):
    seen = 0
    for seed in range(400):
        s = world.sample_scene(seed)  # plain scenes: the scorer finds an object by its one colour
        if s.relation not in ("left of", "right of"):
            continue
        seen += 1
        flipped = np.ascontiguousarray(s.image[:, ::-1])
        assert scorer.score_caption(s.image, s.caption)["relation"], s.caption
        assert scorer.score_caption(flipped, trainer.mirrored_caption(s.caption))["relation"], s.caption
        assert not scorer.score_caption(flipped, s.caption)["relation"], s.caption  # the word is all that differs
    assert seen >= 40


def test_stripes_and_dots_are_mirror_symmetric_and_checks_are_not():
    """Why --mirror-pairs leaves scenes with a checked object out: mirrored, a check swaps its two colours."""
    for pattern, symmetric in (("striped", True), ("dotted", True), ("checked", False)):
        o = world.SceneObject(cls="box", color="red", size=10.0, cx=23.0, cy=40.0, pattern=pattern, color2="blue")
        m = world.SceneObject(cls="box", color="red", size=10.0, cx=world.SIZE - 23.0, cy=40.0, pattern=pattern,
                              color2="blue")
        ys, xs = np.mgrid[0:world.SIZE, 0:world.SIZE] + 0.5
        box = (abs(xs - m.cx) < m.size) & (abs(ys - m.cy) < m.size)  # the mirrored object's square
        same = (world.pattern_mask(o, 1)[:, ::-1] == world.pattern_mask(m, 1))[box].mean()
        assert same == 1.0 if symmetric else same < 0.1, (pattern, same)


def test_the_lateral_probe_asks_only_the_tokens_after_left_or_right_to_tell_the_words_apart(trainer):
    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    caps = ["a red ball left of a blue box", "a red ball right of a blue box", "a red ball on top of a blue box", ""]
    ids = tok(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
    probe = trainer.LateralProbe(tok, 8)
    u = probe.direction.detach() / probe.direction.detach().norm()
    assert probe.loss(torch.zeros(2, 77, 8), ids[2:]) is None  # no lateral word in the batch: nothing to ask

    # states that already put the second object on its side by the margin: no loss; the words swapped: a loss
    states = torch.zeros(4, 77, 8)
    states[0, 5:] = u * probe.MARGIN  # "a red ball left of" = bos a red ball left -> positions 0..4; after: 5..
    states[1, 5:] = -u * probe.MARGIN
    assert float(probe.loss(states, ids).detach()) == pytest.approx(0.0, abs=1e-6)
    assert float(probe.loss(states, ids[[1, 0, 2, 3]]).detach()) > 1.0

    # only the tokens after the word and up to the end token count: the first object, the padding and the
    # non-lateral captions do not
    states = torch.zeros(4, 77, 8, requires_grad=True)
    probe.loss(states, ids).backward()
    touched = states.grad.abs().sum(-1) > 0
    eos = int((ids[0] == tok.eos_token_id).float().argmax())
    assert touched[0].nonzero().flatten().tolist() == list(range(5, eos + 1))
    assert not touched[2:].any()


def test_the_probe_on_names_leaves_of_and_the_articles_to_the_anchor(trainer):
    """--te-layout-words names: "of", articles and the background's prepositions come in every caption (and in "a photo
    of"), so the probe asks only the second object's words, the background noun and the end token to carry the side;
    with --te-anchor-lateral free the anchor keeps the others."""
    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    ids = tok(["a red ball left of a blue box in the snow"], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    words = lambda mask: tok.convert_ids_to_tokens(ids[0][mask[0]])  # noqa: E731
    assert words(trainer.LateralProbe(tok, 8).after_relation(ids)[0]) == [
        "of</w>", "a</w>", "blue</w>", "box</w>", "in</w>", "the</w>", "snow</w>", "<|endoftext|>"]
    probe = trainer.LateralProbe(tok, 8, "names")
    assert words(probe.after_relation(ids)[0]) == ["blue</w>", "box</w>", "snow</w>", "<|endoftext|>"]

    from transformers import CLIPTextConfig, CLIPTextModel
    te = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id))
    anchor = trainer.TextAnchor(te, tok.eos_token_id, "free")
    with torch.no_grad():
        states = te(ids).last_hidden_state.requires_grad_(True)
    anchor.loss(states + torch.randn(8), ids, probe).backward()
    anchored = states.grad.abs().sum(-1)[0] > 0
    eos = int((ids[0] == tok.eos_token_id).float().argmax())
    assert torch.equal(~anchored[:eos + 1], probe.after_relation(ids)[0][0, :eos + 1])  # free: only the probe's tokens
    assert anchored[5:7].all()  # "of a" right after "left"


@pytest.mark.parametrize("lateral", ["direction", "free"])
def test_the_text_anchor_leaves_the_probe_only_its_direction_after_the_relation_word(trainer, lateral):
    from transformers import CLIPTextConfig, CLIPTextModel

    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    caps = ["a red ball left of a blue box", "a red ball on top of a blue box"]
    ids = tok(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id))
    probe = trainer.LateralProbe(tok, 8)
    anchor = trainer.TextAnchor(te, tok.eos_token_id, lateral)
    with torch.no_grad():
        ref = te(ids).last_hidden_state
    assert float(anchor.loss(ref.clone(), ids, probe)) == 0.0  # the starting states: nothing to pay

    eos = [int((r == tok.eos_token_id).float().argmax()) for r in ids]
    u = probe.unit().detach()
    moved = ref.clone()
    moved[0, 5:eos[0] + 1] += 3 * u  # after "left", along the probe's direction: free
    assert float(anchor.loss(moved, ids, probe)) == pytest.approx(0.0, abs=1e-10)
    other = torch.randn(8)
    other -= (other @ u) * u  # orthogonal to it: anchored unless the lateral tokens are left free
    moved[0, 5:eos[0] + 1] += other
    assert (float(anchor.loss(moved, ids, probe)) > 1e-3) == (lateral == "direction")

    # the first object's tokens, the non-lateral caption and the end token count; the padding never does
    states = ref.clone().requires_grad_(True)
    anchor.loss(states + torch.randn(8), ids, probe).backward()  # (not along u, which starts as all ones)
    touched = states.grad.abs().sum(-1) > 0
    assert touched[0, :5].all() and touched[1].nonzero().flatten().tolist() == list(range(eos[1] + 1))
    assert not touched[0, eos[0] + 1:].any()
    assert touched[0, 5:eos[0] + 1].all() == (lateral == "direction")
    assert probe.direction.grad is None  # the probe's direction is the probe's to learn, not the anchor's

    # a mean over the anchored tokens' elements; the frozen copy stays the starting encoder while the trained one moves
    shift = torch.zeros_like(ref)
    shift[1, :eos[1] + 1] = 0.5  # the non-lateral caption only: each anchored element off by 0.5
    n_kept = eos[1] + 1 + (eos[0] + 1 if lateral == "direction" else 5)
    assert float(anchor.loss(ref + shift, ids, probe)) == pytest.approx(0.25 * (eos[1] + 1) / n_kept, rel=1e-5)
    with torch.no_grad():
        for w in te.parameters():
            w.add_(0.1 * torch.randn_like(w))
    assert float(anchor.loss(te(ids).last_hidden_state, ids, probe).detach()) > 1e-3
    assert torch.equal(anchor.frozen(ids).last_hidden_state, ref)


def test_the_text_anchor_over_all_positions_keeps_the_padding_and_leaves_the_lateral_tokens_free(trainer):
    """--te-anchor-span all: the padding after the end token (most of the UNet's cross-attention) is anchored too;
    with --te-anchor-lateral free the tokens after the relation word stay free."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    ids = tok(["a red ball left of a blue box", "a red ball on top of a blue box"], padding="max_length", max_length=77,
              return_tensors="pt").input_ids
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=77, eos_token_id=tok.eos_token_id))
    probe = trainer.LateralProbe(tok, 8)
    eos = [int((r == tok.eos_token_id).float().argmax()) for r in ids]
    for span in ("caption", "all"):
        anchor = trainer.TextAnchor(te, tok.eos_token_id, "free", span)
        with torch.no_grad():
            ref = te(ids).last_hidden_state
        states = ref.clone().requires_grad_(True)
        anchor.loss(states + torch.randn(8), ids, probe).backward()
        touched = states.grad.abs().sum(-1) > 0
        assert touched[0, :5].all() and not touched[0, 5:eos[0] + 1].any()  # after "left": free either way
        assert touched[0, eos[0] + 1:].all() == touched[1, eos[1] + 1:].all() == (span == "all")
        assert touched[1, :eos[1] + 1].all()
        if span == "caption":
            assert not touched[:, max(eos) + 1:].any()


def test_random_anchor_captions_hold_no_special_or_avoided_tokens(trainer):
    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    # most of the vocabulary avoided, so the redraws surely run (plain draws rarely hit a special id)
    avoid = (tok.convert_tokens_to_ids("left</w>"), tok.convert_tokens_to_ids("right</w>"), *range(45_000))
    ids = trainer.TextAnchor.random_tokens(tok, 64, np.random.default_rng(3), avoid)
    assert ids.shape == (64, 77)
    assert torch.equal(ids, trainer.TextAnchor.random_tokens(tok, 64, np.random.default_rng(3), avoid))  # seeded
    lengths = set()
    for row in ids.tolist():
        end = row.index(tok.eos_token_id)
        assert row[0] == tok.bos_token_id and 2 <= end <= 21 and set(row[end:]) == {tok.pad_token_id}
        body = row[1:end]
        assert not set(body) & {tok.bos_token_id, tok.eos_token_id, *avoid} and min(body) >= 45_000
        lengths.add(len(body))
    assert len(lengths) > 5  # lengths vary, so the anchor sees end tokens and padding at many positions


def test_the_script_runs_every_stage_with_the_lateral_aids_and_resumes(tmp_path):
    """End to end in miniature (every stage, mirror pairs, the probe and token grounding on), then a resumed run: the
    probe's direction is part of the checkpoint, so resuming is exact."""
    import subprocess
    import sys

    def run(unet_steps, te_layout="1.0", ok=True):
        cmd = [sys.executable, str(SCRIPT), "--scenes", "48", "--vae-steps", "2", "--vae-batch", "2", "--decoder-steps", "1",
               "--decoder-patterned", "2", "--unet-patterned", "12", "--unet-steps", str(unet_steps), "--batch", "8",
               "--lateral-boost", "0.5", "--mirror-pairs", "--te-layout", te_layout, "--token-grounding", "1.0",
               "--grounding-t-min", "300",
               "--eval-captions", "2", "--eval-vae", "2",
               "--ckpt-every", "1", "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "w.safetensors")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert (r.returncode == 0) == ok, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout + r.stderr

    assert "--te-layout is a loss weight" in run(2, te_layout="-1", ok=False)
    run(2)
    assert "probe" in torch.load(tmp_path / "work" / "unet.pt", weights_only=True)
    assert "trained with --te-layout 1.0 (now 0.0): resume it the same way" in run(3, te_layout="0", ok=False)
    out = run(3)
    assert "unet: resumed at step 2" in out
    man = json.loads((tmp_path / "w.json").read_text())
    assert man["steps"]["unet"] == 3 and "--te-layout 1.0" in man["command"] and "--mirror-pairs" in man["command"]
    assert "--token-grounding 1.0" in man["command"] and "--grounding-t-min 300" in man["command"]

    # a cool-down from those weights with the text anchor (it needs --init-from: the states it keeps are theirs)
    cont = [sys.executable, str(SCRIPT), "--init-from", str(tmp_path / "w.safetensors"), "--scenes", "48",
            "--unet-patterned", "12", "--unet-steps", "2", "--decay-steps", "2", "--batch", "8", "--lateral-boost", "0.5",
            "--te-layout", "1.0", "--te-anchor", "1.0", "--te-anchor-span", "all", "--te-anchor-random", "2",
            "--layout-x0", "1.0", "--frozen-map-sides", "16", "--reset-map-sides", "8", "--eval-captions", "2", "--eval-vae", "2",
            "--work-dir", str(tmp_path / "work2"), "--out", str(tmp_path / "w2.safetensors")]
    r = subprocess.run(cont, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    man2 = json.loads((tmp_path / "w2.json").read_text())
    assert "--te-anchor 1.0 --te-anchor-lateral direction --te-anchor-span all --te-anchor-random 2" in man2["command"]
    assert man2["init_from"]["sha256"] == man["sha256"]
    assert "--layout-x0 1.0 --layout-x0-cap 20.0" in man2["command"] and "--frozen-map-sides 16 --reset-map-sides 8" in man2["command"]
    # the 16x16 maps' queries and keys kept the starting weights exactly (frozen), the 8x8 ones were set back to
    # them after training; the 4x4 ones (the mid block) trained
    from safetensors.torch import load_file

    before, after = load_file(tmp_path / "w.safetensors"), load_file(tmp_path / "w2.safetensors")
    qk = [k for k in before if ".attn2.to_q." in k or ".attn2.to_k." in k]
    kept = [k for k in qk if "mid_block." not in k]
    assert len(kept) == 12 and all(torch.equal(before[k], after[k]) for k in kept)
    assert all(not torch.equal(before[k], after[k]) for k in set(qk) - set(kept))


def test_token_grounding_finds_each_objects_words_and_scores_maps_against_its_mask(trainer):
    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    _, caps, objs, masks = trainer.render_set(40, 0, patterned=0.7, with_masks=True)
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    spans = trainer.TokenGrounding.spans_of(tok, ids, objs)
    for i in range(40):  # each object's colours, pattern and class noun, in caption order; never "a", "an", "and"
        for k in range(trainer.MAX_OBJECTS):
            words = tok.decode(ids[i][spans[i, k]]).split()
            expected = [] if k >= len(objs[i]) else [w for w in world.object_phrase(objs[i][k]).split()
                                                      if w not in ("a", "an", "and")]
            assert words == expected, (caps[i], k)
        assert masks[i, :len(objs[i])].reshape(len(objs[i]), -1).any(1).all()  # every object is visible
    only_class = trainer.TokenGrounding.spans_of(tok, ids, objs, words="class")  # --grounding-words class
    for i in range(40):
        for k in range(trainer.MAX_OBJECTS):
            assert tok.decode(ids[i][only_class[i, k]]).split() == ([] if k >= len(objs[i]) else [objs[i][k].cls])
        assert not (only_class[i] & ~spans[i]).any()

    # two objects side by side, maps at 16x16 and 8x8: attention where each object is scores lower than swapped
    class Store:
        maps = {}
    g = trainer.TokenGrounding.__new__(trainer.TokenGrounding)
    g.store = Store()
    cov = torch.zeros(1, trainer.MAX_OBJECTS, 16, 16)
    cov[0, 0, 8:, 2:6], cov[0, 1, 8:, 10:14] = 1.0, 1.0
    sp = torch.zeros(1, trainer.MAX_OBJECTS, 77, dtype=torch.bool)
    sp[0, 0, 2:4], sp[0, 1, 7:9] = True, True

    def maps_for(first, second):
        out = {}
        for side in (16, 8):
            m = torch.full((1, 2, side * side, 77), 0.01)
            a = torch.nn.functional.adaptive_avg_pool2d(cov[:, [first, second]], side).flatten(2)  # [1, 2, HW]
            m[0, :, :, 2:4] += a[0, 0, :, None]
            m[0, :, :, 7:9] += a[0, 1, :, None]
            out[f"layer{side}"] = m
        return out

    keep = torch.ones(1, dtype=torch.bool)
    g.store.maps = maps_for(0, 1)
    right = float(g.loss(sp, cov, keep))
    g.store.maps = maps_for(1, 0)
    swapped = float(g.loss(sp, cov, keep))
    assert right < 0.1 < swapped
    assert g.loss(sp, cov, torch.zeros(1, dtype=torch.bool)) is None  # an empty caption (dropped) has nothing to ground


def test_a_mirrored_row_grounds_its_own_words_on_its_mirrored_masks(trainer):
    """With --mirror-pairs the second half of the lateral share holds the first half's scenes mirrored: their spans
    must be those scenes' (patterned and three-object captions differ in length) and their masks mirrored."""
    import torch.nn.functional as F

    from dynasyn.shapes import model as sm

    tok = sm.clip_tokenizer()
    _, caps, objs, masks = trainer.render_set(120, 40_000_000, patterned=0.7, with_masks=True)
    ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    lateral = np.array([i for i, c in enumerate(caps) if (" left of " in c or " right of " in c) and " checked " not in c])
    mirrored_ids = tok([trainer.mirrored_caption(caps[i]) for i in lateral], padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt").input_ids
    coverage = F.adaptive_avg_pool2d(torch.from_numpy(masks).float(), 16)
    data = (trainer.TokenGrounding.spans_of(tok, ids, objs), coverage, coverage[lateral].flip(-1))
    j = np.arange(len(lateral))[::-1].copy()  # first half: scenes j[:n]; the second half's own rows hold others
    n = len(j) // 2
    idx = lateral[j]
    spans, batch_masks = trainer.grounding_batch(data, idx, j[:n])
    assert len({len(caps[i].split()) for i in idx[:2 * n]}) > 1  # captions of different lengths in the batch
    for r in range(2 * n):
        scene = idx[r] if r < n or r >= 2 * n else idx[r - n]
        row_ids = ids[scene] if r < n else mirrored_ids[j[r - n]]
        for k, o in enumerate(objs[scene]):
            words = [w for w in world.object_phrase(o).split() if w not in ("a", "an", "and")]
            assert tok.decode(row_ids[spans[r, k]]).split() == words, (r, caps[scene])
        expected = coverage[scene].flip(-1) if n <= r < 2 * n else coverage[scene]
        assert torch.equal(batch_masks[r], expected)
    assert torch.equal(trainer.grounding_batch(data, idx)[0], data[0][idx])  # no mirror pairs: the rows as drawn


@pytest.mark.parametrize("args, message", [
    (["--token-grounding", "-1"], "--token-grounding is a loss weight"),
    (["--token-grounding", "1", "--grounding-sides", "16,32"], "cross-attention maps are 16, 8 and 4 cells wide"),
    (["--grounding-words", "class"], "give --token-grounding too"),
    (["--te-anchor", "-1"], "--te-anchor is a loss weight"),
    (["--te-anchor", "1"], "give --init-from"),
    (["--te-anchor-lateral", "free"], "give both"),
    (["--te-anchor-span", "all"], "give --te-anchor"),
    (["--te-layout-words", "names"], "give --te-layout too"),
    (["--layout-x0", "1"], "give --lateral-boost"),
    (["--grounding-t-min", "500"], "give --token-grounding too"),
    (["--token-grounding", "1", "--grounding-t-min", "1000"], "a timestep: 0 to 999"),
    (["--lateral-boost", "0.5", "--layout-x0", "-1"], "--layout-x0 is a loss weight"),
    (["--init-from", "w.safetensors", "--frozen-map-sides", "16,32"], "cross-attention maps are 16, 8 and 4 cells wide"),
    (["--frozen-map-sides", "16"], "give --init-from"),
    (["--reset-map-sides", "16"], "give --init-from"),
    (["--init-from", "w.safetensors", "--frozen-map-sides", "16,,x"], "whole numbers separated by commas"),
    (["--init-from", "w.safetensors", "--reset-map-sides", "2"], "cross-attention maps are 16, 8 and 4 cells wide"),
    (["--lateral-boost", "0.5", "--layout-x0", "1", "--layout-x0-cap", "0"], "a positive bound"),
    (["--lateral-boost", "0.5", "--layout-x0", "nan"], "a positive bound"),
    (["--layout-x0-cap", "5"], "give --layout-x0 too"),
    (["--init-from", "w.safetensors", "--te-anchor", "1", "--te-anchor-span", "all", "--te-anchor-random", "-1"],
     "--te-anchor-random is a number of captions"),
    (["--init-from", "w.safetensors", "--te-anchor", "1", "--te-anchor-random", "4"], "give --te-anchor-span all"),
])
def test_bad_grounding_options_are_refused_before_any_work(tmp_path, args, message):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(SCRIPT), *args, "--work-dir", str(tmp_path / "work")], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "work").exists()


def test_x0_error_is_the_error_of_the_predicted_picture_capped(trainer):
    """--layout-x0: the epsilon error over SNR equals the error of x0 = (xt - sqrt(1 - a) eps) / sqrt(a), computed
    here from the scheduler's own add_noise; above the cap the weight stops growing."""
    from dynasyn.shapes import model as sm

    sched = sm.build_shapes_components(seed=0).noise_scheduler
    ac = sched.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    pred = (noise + 0.1 * torch.randn(3, 4, 8, 8, generator=g)).requires_grad_()
    t = torch.tensor([300, 700, 999])
    xt = sched.add_noise(x0, noise, t)
    a = ac[t].view(-1, 1, 1, 1)
    x0_pred = (xt - (1 - a).sqrt() * pred) / a.sqrt()
    exact = (x0_pred - x0).pow(2).mean(dim=(1, 2, 3)).detach()
    snr = ac / (1 - ac)
    assert torch.allclose(trainer.x0_error(pred, noise, snr[t], cap=1e9), exact.mean(), rtol=1e-3)
    capped = trainer.x0_error(pred, noise, snr[t], cap=20.0)  # 1 / SNR is 0.69, 11.1 and 213 at these t
    per = (pred - noise).pow(2).mean(dim=(1, 2, 3)).detach()
    assert torch.allclose(capped, (per * torch.tensor([1 / snr[300], 1 / snr[700], 20.0])).mean(), rtol=1e-4)
    assert capped < exact.mean() / 3
    capped.backward()  # a loss: it trains the UNet
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_the_rows_each_aid_weighs(trainer):
    """--layout-x0 weighs the lateral share (mirror pairs included) less dropped captions; --grounding-t-min keeps the
    captioned rows at or above its timestep (0: every captioned row, as before the option)."""
    drop = torch.tensor([False, True, False, False, False, True])
    t = torch.tensor([999, 999, 100, 750, 749, 800])
    assert trainer.lateral_rows(6, 4, drop).tolist() == [True, False, True, True, False, False]
    assert not trainer.lateral_rows(6, 0, drop).any()
    assert trainer.grounding_rows(drop, t, 750).tolist() == [True, False, False, True, False, False]
    assert torch.equal(trainer.grounding_rows(drop, t, 0), ~drop)


def test_checkpoints_made_before_the_later_options_resume_with_them_off(trainer):
    """A checkpoint's options written before an option existed lack its key: with every later option off (the
    defaults), the stored options completed by LATER_OPTIONS must equal a new run's, or old checkpoints would be
    refused; and a later option that is on must differ from them."""
    args = trainer.parser().parse_args(["--decay-steps", "100"])
    now = trainer.step_options(args)
    old = {k: v for k, v in now.items() if k not in trainer.LATER_OPTIONS}
    assert set(old) < set(now) and {**trainer.LATER_OPTIONS, **old} == now
    for on in (["--lateral-boost", "0.5", "--layout-x0", "1"], ["--token-grounding", "1", "--grounding-t-min", "750"],
               ["--init-from", "w.safetensors", "--frozen-map-sides", "16"]):
        with_on = trainer.step_options(trainer.parser().parse_args(["--decay-steps", "100", *on]))
        assert {**trainer.LATER_OPTIONS, **old} != {**with_on, "lateral_boost": 0.0}


def test_frozen_map_sides_are_the_queries_and_keys_of_those_levels_only(trainer):
    """--frozen-map-sides 16: the query and key weights of the 16x16 cross-attention layers (the first down block and
    the last up block), not their values or output, nor any other level's; an absent level is refused."""
    from dynasyn.shapes import model as sm

    unet = sm.build_shapes_components(seed=0).unet
    names = {id(p): n for n, p in unet.named_parameters()}
    got = sorted(names[id(p)] for p in trainer.map_projections(unet, (16,)))
    assert len(got) == 6 and all(".attn2.to_q." in n or ".attn2.to_k." in n for n in got)
    assert all(n.startswith(("down_blocks.0.", "up_blocks.2.")) for n in got)
    assert sorted(names[id(p)] for p in trainer.map_projections(unet, (8, 4))) == sorted(
        n for n in names.values() if (".attn2.to_q." in n or ".attn2.to_k." in n) and n not in got)
    assert trainer.map_projections(unet, ()) == []
    with pytest.raises(ValueError, match="no cross-attention at \\[2\\]"):
        trainer.map_projections(unet, (2,))
