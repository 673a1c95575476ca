"""Train the Shapes World model from scratch on a CPU, deterministically.

Stages (each checkpointed into --work-dir, so an interrupted run resumes where it stopped):
  1. VAE: the 3-level AutoencoderKL on rendered scenes (MSE + L1 + a tiny KL).
  2. Fold the latent statistics into the VAE so latents x 0.18215 have unit std (SD's convention).
  3. UNet + CLIP text encoder on the frozen encoder's latents of the training scenes (epsilon,
     min-SNR weighting, 10 % empty captions for classifier-free guidance, EMA weights). From step
     --patterned-from on, --unet-patterned scenes join them whose objects wear two-colour patterns in the
     colour pairs the novel subjects do not use (world.NOVEL_COLOR_PAIRS): the model learns what a pattern
     is, so GSA keeps a subject's pattern, while every novel subject stays a look it never saw. Optional aids
     for "left of" / "right of": --lateral-boost, --mirror-pairs, --te-layout (LateralProbe),
     --token-grounding (TokenGrounding: each object's words attend to its mask; --grounding-t-min: only on the
     noisier timesteps, where the layout is decided), --layout-x0 (the lateral
     scenes' error weighted as an error of the picture, where the sampler fixes the layout) and, on a cool-down, --te-anchor
     (TextAnchor: the text encoder's states kept near the starting weights').
  4. Decoder fine-tuning on the same frozen latents (sharper reconstructions), plus --decoder-patterned scenes of
     two-colour patterned objects in any colours (like the novel subjects of the benchmark and the demo): the
     UNet never sees those colour pairs, but the decoder must be able to draw them once a subject is learned.
  5. Evaluation on held-out scenes/captions with the scorer; writes the fp16 weights + manifest.

Continuing from released weights (``--init-from``): the VAE is taken as it is (stages 1, 2 and 4 are skipped) and the
UNet + text encoder train --unet-steps more steps from them with a fresh optimizer, the learning rate decaying
linearly to 0 over the last --decay-steps of them (a cool-down); the manifest records the chain of runs. Its steps
draw as the first run's steps of the same index do (seed, stage, step), from all its scenes.

Usage: python scripts/train_shapes_world.py [--vae-steps N] [--unet-steps N] ...
A file named STOP_vae, STOP_unet or STOP_decoder in --work-dir ends that stage at its next checkpoint
(the manifest records the steps actually run; rerunning with those step counts reproduces the weights,
as every step draws its randomness from (seed, stage, step) and the learning rate does not depend on
the total). A UNet checkpoint continues only with the options its steps were made with (UNET_STEP_OPTIONS);
another value is refused, naming it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dynasyn.shapes import model as sm  # noqa: E402
from dynasyn.shapes import world  # noqa: E402

TRAIN_SEED0 = 0
EVAL_SEED0 = 50_000_000  # held-out scenes / captions: disjoint seed range
PATTERNED_SEED0 = 30_000_000  # the decoder's patterned scenes (the benchmark's subjects are hand-picked)
KNOWN_PATTERN_SEED0 = 40_000_000  # the UNet's scenes with known patterns (colour pairs outside NOVEL_COLOR_PAIRS)
KNOWN_PATTERN_P = 0.7  # each object's chance of wearing a pattern in those scenes
UNET_STEP_OPTIONS = ("seed", "batch", "lr", "warmup", "decay_steps", "decay_end", "scenes", "unet_patterned",
                     "patterned_from", "lateral_boost", "mirror_pairs", "te_layout", "token_grounding", "grounding_sides",
                     "grounding_words", "te_anchor", "te_anchor_lateral", "te_anchor_span", "te_anchor_random",
                     "te_layout_words", "layout_x0", "layout_x0_cap", "grounding_t_min", "frozen_map_sides", "min_snr",
                     "uncond_p", "ema")
# options added later, with the value that means "off": a checkpoint made before them was made without them
LATER_OPTIONS = {"token_grounding": 0.0, "grounding_sides": None, "grounding_words": None, "te_anchor": 0.0,
                 "te_anchor_lateral": None, "te_anchor_span": None, "te_anchor_random": None,
                 "te_layout_words": None, "layout_x0": 0.0, "layout_x0_cap": None,
                 "grounding_t_min": 0, "frozen_map_sides": None}
MAX_OBJECTS = 3


def map_sides(value: str) -> tuple[int, ...]:
    """A comma list of cross-attention map sides, e.g. "16,8": largest first, each once."""
    try:
        return tuple(sorted({int(x) for x in value.split(",")}, reverse=True))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give map sides as whole numbers separated by commas, e.g. 16,8")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def render_set(n: int, seed0: int, patterned: float = 0.0, with_masks: bool = False):
    """``n`` scenes from seeds seed0.. : pictures, captions and (``with_masks``) the objects in caption order with
    their masks, ``[n, MAX_OBJECTS, 64, 64]`` bool (missing objects all False)."""
    imgs, caps, objs = np.empty((n, 64, 64, 3), np.uint8), [], []
    masks = np.zeros((n, MAX_OBJECTS, 64, 64), bool) if with_masks else None
    for i in range(n):
        s = world.sample_scene(seed0 + i, patterned=patterned)
        imgs[i] = s.image
        caps.append(s.caption)
        if with_masks:
            masks[i, :len(s.objects)] = s.masks
            objs.append(s.objects)
    return (imgs, caps, objs, masks) if with_masks else (imgs, caps)


def mirrored_caption(caption: str) -> str:
    """The caption of a lateral scene seen in a mirror: 'left of' and 'right of' swap. The objects, stripes and dots
    are mirror-symmetric; a check is not (its colours trade places), so mirror pairs leave checked scenes out."""
    return " ".join({"left": "right", "right": "left"}.get(w, w) for w in caption.split(" "))


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR (dB) of pictures in [-1, 1]."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def save_ckpt(path: Path, **state) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """Everything random in one training step comes from (seed, stage, step): a resumed run equals an uninterrupted one."""
    torch.manual_seed(seed * 1_000_003 + stage * 100_003 + step)
    return np.random.default_rng([seed, stage, step])


def stop_requested(work: Path, stage: str) -> bool:
    return (work / f"STOP_{stage}").exists()


# ------------------------------------------------------------------------------------------------

def train_vae(comps, imgs, args, work: Path, params=None, name="vae", steps=0, lr=1e-3, latents=None):
    """Stage 1 (full VAE on pictures) or stage 4 (decoder only, on fixed latents)."""
    vae = comps.vae
    params = list(params if params is not None else vae.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    ck = work / f"{name}.pt"
    start = 0
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        vae.load_state_dict(st["vae"])
        opt.load_state_dict(st["opt"])
        start = st["step"]
        torch.set_rng_state(st["rng"])
        log(f"{name}: resumed at step {start}")
    if start >= steps:
        return start
    vae.train()
    stage = 1 if latents is None else 4
    t0, done = time.time(), start
    for step in range(start, steps):
        g = step_rng(args.seed, stage, step)
        idx = g.integers(0, len(imgs), args.vae_batch)
        x = to_tensor(imgs[idx])
        if latents is None:
            post = vae.encode(x).latent_dist
            z = post.sample()
            kl = post.kl().mean() / x[0].numel()
        else:
            z = latents[idx] / vae.config.scaling_factor
            kl = torch.zeros(())
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.1 * F.l1_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        done = step + 1
        if done % 50 == 0:
            log(f"{name} {done}/{steps} loss {loss.item():.5f} psnr {psnr(rec.detach(), x):.2f} "
                f"({(time.time() - t0) / (done - start):.2f} s/step)")
        if done % args.ckpt_every == 0 or done == steps:
            save_ckpt(ck, vae=vae.state_dict(), opt=opt.state_dict(), step=done, rng=torch.get_rng_state())
            if stop_requested(work, name):
                log(f"{name}: STOP file found, ending at {done}")
                break
    vae.eval()
    return done


class LateralProbe:
    """--te-layout: an auxiliary text-encoder objective for the horizontal relations.

    Trained by the diffusion loss alone, the text encoder makes "left" and "right" all but equal: the final states
    of the tokens after them differ by < 1 % (those after "on top of" / "under" differ by > 100 %, as the two phrases
    have different lengths and shift every later token's position). Real SD's CLIP learned such words from images
    before SD was trained; this stands in for that: on one learned unit direction u, every token after the relation
    word, up to the end token, must score <h, u> >= MARGIN for "left of" and <= -MARGIN for "right of" (a squared
    hinge). Those are the tokens that name the second object, so its cross-attention values carry which side it is
    on. Not saved in the weights. Measured (README, Shapes World): met within 300 steps of a cool-down, the states
    then differ by 145-195 %, yet the UNet still draws the same order for both words; the text encoder was not
    the bottleneck.
    """

    MARGIN = 1.0  # the final states are layer-normed: |h| ~ sqrt(TEXT_WIDTH) = 8
    # words="names" leaves these out: "of" follows every "left" / "right", so asking it to carry the side changed
    # "of" everywhere ("a photo of ball and box": by 126 %, and every token after it; README, Shapes World); the
    # articles and the background's prepositions come in every other caption too
    FUNCTION_WORDS = ("of", "a", "an", "the", "in", "on")

    def __init__(self, tokenizer, width: int, words: str = "all"):
        self.left, self.right = (tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("left", "right"))
        if tokenizer.unk_token_id in (self.left, self.right):  # CLIP's unknown token is its end token: all would count
            raise ValueError("the tokenizer has no single tokens for 'left' and 'right'")
        self.eos = tokenizer.eos_token_id
        self.skip = torch.tensor([tokenizer.convert_tokens_to_ids(w + "</w>") for w in self.FUNCTION_WORDS]
                                 if words == "names" else [], dtype=torch.long)
        self.direction = torch.nn.Parameter(torch.ones(width) / width ** 0.5)

    def after_relation(self, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, 77]`` bool: the tokens after the relation word, up to the end token; ``[B]``: +1 left, -1 right."""
        is_rel = (tok == self.left) | (tok == self.right)  # (B, 77)
        has = is_rel.any(1)
        rel_pos = is_rel.float().argmax(1)  # the first relation word: one relation per caption
        eos_pos = (tok == self.eos).float().argmax(1)
        side = torch.where(tok.gather(1, rel_pos[:, None])[:, 0] == self.left, 1.0, -1.0)  # (B,)
        pos = torch.arange(tok.shape[1], device=tok.device)
        after = has[:, None] & (pos > rel_pos[:, None]) & (pos <= eos_pos[:, None])
        return after & ~torch.isin(tok, self.skip.to(tok.device)), side

    def unit(self) -> torch.Tensor:
        return self.direction / self.direction.norm()

    def loss(self, text_states: torch.Tensor, tok: torch.Tensor) -> torch.Tensor | None:
        mask, side = self.after_relation(tok)
        if not mask.any():
            return None
        score = text_states @ self.unit()  # (B, 77)
        hinge = F.relu(self.MARGIN - side[:, None] * score).pow(2)
        return (hinge * mask).sum() / mask.sum()


class TextAnchor:
    """--te-anchor: keep the text encoder's final states near those of the weights the run started from.

    Without it, the lateral probe's weights (README, Shapes World) met every gate but the demo learned neither subject,
    and the same recipe without the probe learned both; with the probe, the states after "left" and "right" came to
    differ by 145-195 %, where its margin asks for about 25 % (2 of a state's norm of about 8). This squared error
    (per state element, averaged over the anchored tokens: see ``span``) against a frozen copy of the starting
    text encoder leaves the probe one way to change a state: after "left" / "right", along the probe's direction only
    (``lateral="direction"``), or freely there (``lateral="free"``).

    ``span="caption"`` anchors each caption's tokens up to its end token; ``"all"`` the padding after it too, which
    takes 85-95 % of the UNet's cross-attention (the padding states see the whole caption). Anchored on the captions
    only, a run's states moved by 50-100 % at the padding and by 54 % before it on "a photo of ball and box", words
    the world never shows (README, Shapes World). ``random_tokens(n, rng)`` makes captions of random vocabulary
    tokens to anchor as well (with ``span="all"``), so that words outside the world keep their states too.
    """

    def __init__(self, te, eos: int, lateral: str = "direction", span: str = "caption"):
        self.frozen = copy.deepcopy(te).requires_grad_(False).eval()
        self.eos, self.lateral, self.span = eos, lateral, span

    @staticmethod
    def random_tokens(tokenizer, n: int, rng: np.random.Generator, avoid=()) -> torch.Tensor:
        """``[n, 77]`` ids: start token, 1-20 random vocabulary tokens (not special, not ``avoid``), end token, padding."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        out = torch.full((n, 77), pad, dtype=torch.long)
        bad = torch.tensor(sorted({bos, eos, pad, *avoid}))
        for i in range(n):
            k = int(rng.integers(1, 21))
            ids = torch.from_numpy(rng.integers(0, len(tokenizer), k))
            while (hit := torch.isin(ids, bad)).any():  # redraw the few special or avoided ids
                ids[hit] = torch.from_numpy(rng.integers(0, len(tokenizer), int(hit.sum())))
            out[i, 0], out[i, 1:k + 1], out[i, k + 1] = bos, ids, eos
        return out

    def loss(self, text_states: torch.Tensor, tok: torch.Tensor, probe: LateralProbe | None) -> torch.Tensor:
        with torch.no_grad():
            ref = self.frozen(tok).last_hidden_state  # (B, 77, W)
        diff = text_states - ref
        pos = torch.arange(tok.shape[1], device=tok.device)
        keep = pos <= (tok == self.eos).float().argmax(1)[:, None]  # (B, 77)
        if self.span == "all":
            keep = torch.ones_like(keep)
        if probe is not None:
            after, _ = probe.after_relation(tok)
            if self.lateral == "free":
                keep = keep & ~after
            else:  # the probe's direction is free after the relation word; the rest is anchored
                u = probe.unit().detach()
                diff = diff - after[..., None] * (diff @ u)[..., None] * u
        return (diff.pow(2).mean(-1) * keep).sum() / keep.sum()


class TokenGrounding:
    """--token-grounding: each object's words attend to where it is (TokenCompose's token loss, CVPR 2024).

    The diffusion loss hardly sees a layout: at the high noise levels where the sampler fixes it, epsilon barely
    depends on the picture, and a world seen side-on gives the UNet no cue for "left of" but the word. So the
    cross-attention maps of each object's words (its colours, pattern and class noun, or with --grounding-words class
    the class noun alone; not "a" / "an" / "and") at the --grounding-sides levels (16x16 and 8x8 by default; 4x4 is
    the mid block) are pulled towards its mask with the
    pack's own L_M2A (``losses.masked_attention_loss``: each map max-normalised, squared error against the 0/1 mask,
    the mask as each cell's covered share), averaged over objects and levels, on every step and timestep.
    The words' keys come from the text encoder and the queries from the UNet, so both learn which object is where.
    """

    SKIP = ("a", "an", "and")

    def __init__(self, unet, sides=(16, 8)):
        from dynasyn.attention import AttentionStore, cross_attention_resolutions, install_attention_capture

        res = cross_attention_resolutions(unet, int(unet.config.sample_size))
        if set(sides) - set(res.values()):
            raise ValueError(f"no cross-attention at {sorted(set(sides) - set(res.values()))}; the UNet has "
                             f"{sorted(set(res.values()))}")
        self.layers = [n for n, r in res.items() if r in sides]
        self.store = AttentionStore()
        install_attention_capture(unet, self.store, self.layers)

    @classmethod
    def spans_of(cls, tokenizer, ids: torch.Tensor, objects: list[list], words: str = "all") -> torch.Tensor:
        """``[n, MAX_OBJECTS, 77]`` bool: the token positions of each object's words in its caption's ids (``words``
        "class": its class noun only)."""
        out = torch.zeros(len(objects), MAX_OBJECTS, ids.shape[1], dtype=torch.bool)
        word_ids: dict[str, list[int]] = {}
        for i, objs in enumerate(objects):
            row, at = ids[i].tolist(), 1  # after the start token
            for k, o in enumerate(objs):
                for w in world.object_phrase(o).split(" "):
                    if w not in word_ids:
                        word_ids[w] = tokenizer(w, add_special_tokens=False).input_ids
                    tid = word_ids[w]
                    at = _find(row, tid, at)
                    if w not in cls.SKIP and (words == "all" or w in world.CLASSES):
                        out[i, k, at:at + len(tid)] = True
                    at += len(tid)
        return out

    def loss(self, spans: torch.Tensor, masks: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """``spans`` [B, K, 77] bool, ``masks`` [B, K, H, W] float, ``keep`` [B] bool (not the empty caption)."""
        from dynasyn.losses import masked_attention_loss

        has = spans.any(-1) & keep[:, None] & (masks.flatten(2).amax(-1) > 0)  # [B, K]
        if not has.any():
            return None
        weights = spans.float() / spans.sum(-1, keepdim=True).clamp_min(1)  # mean over each object's tokens
        by_side: dict[int, list[torch.Tensor]] = {}
        for m in self.store.maps.values():  # [B, heads, HW, 77]
            by_side.setdefault(int(m.shape[2] ** 0.5), []).append(m.mean(1))
        total = 0.0
        for side, maps in by_side.items():
            a = torch.stack(maps).mean(0)  # [B, HW, 77]
            obj = torch.einsum("bqt,bkt->bkq", a, weights).reshape(*has.shape, side, side)  # [B, K, side, side]
            m = F.adaptive_avg_pool2d(masks[has][:, None], side)[:, 0]  # area coverage at this side
            total = total + masked_attention_loss(obj[has], m) / int(has.sum())
        return total / len(by_side)


def grounding_batch(grounding_data, idx: np.ndarray, mirrored: np.ndarray | None = None):
    """The spans and masks of a batch's rows ``idx``; with ``mirrored`` (positions in the lateral scenes of the first
    ``len(mirrored)`` rows), the next as many rows are those scenes mirrored: "left" and "right" are one token each,
    so the words sit where they sat, and the masks are the mirrored ones."""
    spans, masks = grounding_data[0][idx], grounding_data[1][idx]  # copies (index arrays)
    if mirrored is not None and len(mirrored):
        n = len(mirrored)
        spans[n:2 * n] = spans[:n]
        masks[n:2 * n] = grounding_data[2][mirrored]
    return spans, masks


def _find(row: list[int], sub: list[int], start: int) -> int:
    for j in range(start, len(row) - len(sub) + 1):
        if row[j:j + len(sub)] == sub:
            return j
    raise ValueError(f"tokens {sub} not found in the caption after position {start}")


def lateral_rows(batch: int, k: int, drop: torch.Tensor) -> torch.Tensor:
    """[batch] bool: the rows --layout-x0 weighs, the lateral share (the first ``k``, mirror pairs included) less the
    rows whose caption was dropped (an empty caption says no side)."""
    return (torch.arange(batch) < k) & ~drop


def grounding_rows(drop: torch.Tensor, t: torch.Tensor, t_min: int) -> torch.Tensor:
    """[B] bool: the rows --token-grounding supervises: captioned, and (--grounding-t-min) at timestep t_min or above."""
    return ~drop & (t >= t_min)


def x0_error(pred_eps: torch.Tensor, noise: torch.Tensor, snr_t: torch.Tensor, cap: float) -> torch.Tensor:
    """Mean squared error of the picture predicted from an epsilon prediction, x0 = (xt - sqrt(1 - a) eps) / sqrt(a):
    |x0 error|^2 = |eps error|^2 / SNR, each scene's weight 1 / SNR capped at ``cap`` (--layout-x0).
    At high noise, where the sampler fixes the layout, the epsilon loss (min-SNR weight 1 there) hardly depends on
    the picture, so a model that ignores "left" / "right" loses almost nothing by it; the cap bounds the gradient,
    which grows with 1 / SNR (213 at t = 999)."""
    x0_weight = torch.clamp(1 / snr_t, max=cap)  # [B]
    return ((pred_eps - noise).pow(2).mean(dim=(1, 2, 3)) * x0_weight).mean()


@torch.no_grad()
def encode_all(vae, imgs, batch=64) -> torch.Tensor:
    out = []
    for i in range(0, len(imgs), batch):
        out.append(vae.encode(to_tensor(imgs[i:i + batch])).latent_dist.mean * vae.config.scaling_factor)
    return torch.cat(out)


def step_options(args) -> dict:
    """What a UNet step draws and optimises: a checkpoint made with other values must not be continued (--unet-steps
    may grow). An option that does nothing in this run is None (without a cool-down its end does not matter; without
    grounding, its levels do not)."""
    unused = {"decay_end": not args.decay_steps, "grounding_sides": not args.token_grounding,
              "grounding_words": not args.token_grounding or args.grounding_words == "all",  # "all": as before it existed
              "te_anchor_lateral": not (args.te_anchor and args.te_layout),
              "te_layout_words": not args.te_layout or args.te_layout_words == "all",  # as before it existed
              "te_anchor_span": not args.te_anchor or args.te_anchor_span == "caption",  # as before it existed
              "te_anchor_random": not args.te_anchor or not args.te_anchor_random,
              "layout_x0_cap": not args.layout_x0, "frozen_map_sides": not args.frozen_map_sides}
    return {k: None if unused.get(k) else getattr(args, k) for k in UNET_STEP_OPTIONS}


def map_projections(unet, sides) -> list[torch.nn.Parameter]:
    """--frozen-map-sides / --reset-map-sides: the cross-attention query and key weights of the layers whose maps are
    ``sides`` cells wide, i.e. what decides where each word attends at that level (the values, what a word draws
    there, are not included). Measured (README, Shapes World): with the lateral recipe's 16x16 queries and keys set
    back to the starting weights after training (--reset-map-sides 16), "left of" / "right of" were still read (they
    need the 8x8 ones) and the demo learned its dotted ball again; with all of them set back, neither. Kept frozen
    during training instead (--frozen-map-sides 16), the ball was lost."""
    from dynasyn.attention import cross_attention_resolutions

    if not sides:
        return []
    res = cross_attention_resolutions(unet, int(unet.config.sample_size))
    if set(sides) - set(res.values()):
        raise ValueError(f"no cross-attention at {sorted(set(sides) - set(res.values()))}; the UNet has "
                         f"{sorted(set(res.values()))}")
    out = []
    for name, side in res.items():
        if side in sides:
            attn = unet.get_submodule(name.removesuffix(".processor"))
            out += [*attn.to_q.parameters(), *attn.to_k.parameters()]
    return out


def train_unet(comps, latents, ids, args, work: Path, n_before: int | None = None, lateral=None, mirrors=None,
               grounding_data=None):
    """``grounding_data`` (--token-grounding): (spans [N, K, 77] bool, masks [N, K, 16, 16], the mirrored lateral
    scenes' masks) of every scene, as ``TokenGrounding`` takes them.
    ``n_before``: steps before --patterned-from draw only from the first n_before scenes (the plain ones).
    ``lateral``: indices of the scenes captioned "left of" / "right of"; --lateral-boost of each batch comes from them.
    ``mirrors``: (latents, ids) of those scenes mirrored, captioned with the other word (--mirror-pairs)."""
    unet, te, sched = comps.unet, comps.text_encoder, comps.noise_scheduler
    model_params = list(unet.parameters()) + list(te.parameters())
    frozen = [p.requires_grad_(False) for p in map_projections(unet, args.frozen_map_sides)]  # no gradient kept
    params = [p for p in model_params if not any(p is f for f in frozen)]  # frozen ones keep their weights (EMA too)
    probe = LateralProbe(comps.tokenizer, te.config.hidden_size, args.te_layout_words) if args.te_layout else None
    if probe is not None:  # trained with the model, never saved into the weights
        params.append(probe.direction)
    anchor = (TextAnchor(te, comps.tokenizer.eos_token_id, args.te_anchor_lateral, args.te_anchor_span)
              if args.te_anchor else None)
    avoid = (probe.left, probe.right) if probe is not None else ()  # random captions must not hold the probe's words
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    grounding = TokenGrounding(unet, args.grounding_sides) if args.token_grounding else None
    empty = comps.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    ac = sched.alphas_cumprod
    snr = ac / (1 - ac)
    ck = work / "unet.pt"
    start = 0
    options = json.dumps(step_options(args), sort_keys=True)
    if ck.exists():
        st = torch.load(ck, weights_only=True)
        was, now = {**LATER_OPTIONS, **json.loads(st.get("options", options))}, json.loads(options)
        if was != now:
            diff = ", ".join(f"--{k.replace('_', '-')} {was[k]} (now {now[k]})" for k in UNET_STEP_OPTIONS
                             if was[k] != now[k])
            raise SystemExit(f"{ck} was trained with {diff}: resume it the same way, or start in another --work-dir")
        unet.load_state_dict(st["unet"]); te.load_state_dict(st["te"])
        ema_u.load_state_dict(st["ema_u"]); ema_t.load_state_dict(st["ema_t"])
        if (probe is not None) != ("probe" in st):
            raise SystemExit(f"{ck} was trained {'with' if 'probe' in st else 'without'} --te-layout: resume it the same "
                             "way, or start in another --work-dir")
        if probe is not None:
            probe.direction.data.copy_(st["probe"])
        opt.load_state_dict(st["opt"]); start = st["step"]
        torch.set_rng_state(st["rng"])
        log(f"unet: resumed at step {start}")
    unet.train(); te.train()
    t0, done = time.time(), start
    ema_params = list(ema_u.parameters()) + list(ema_t.parameters())
    for step in range(start, args.unet_steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        if args.decay_steps:  # linear cool-down to 0 over the decay_steps steps before decay_end
            lr *= min(1.0, (args.decay_end - step) / args.decay_steps)
        for gr in opt.param_groups:
            gr["lr"] = lr
        g = step_rng(args.seed, 3, step)
        pool = len(latents) if n_before is None or step >= args.patterned_from else n_before
        idx = g.integers(0, pool, args.batch)
        pairs = k = 0
        if args.lateral_boost:  # the horizontal relations: the only ones the picture's layout cannot give away
            k = round(args.lateral_boost * args.batch)
            j = np.flatnonzero(lateral < pool)[g.integers(0, int((lateral < pool).sum()), k)]
            idx[:k] = lateral[j]
            pairs = k // 2 if mirrors is not None else 0
        x0 = latents[idx]
        tok = ids[idx].clone()
        if pairs:  # second half of the lateral share: the first half's scenes mirrored, with the other word
            x0[pairs:2 * pairs] = mirrors[0][j[:pairs]]
            tok[pairs:2 * pairs] = mirrors[1][j[:pairs]]
        if grounding is not None:
            spans, obj_masks = grounding_batch(grounding_data, idx, j[:pairs] if pairs else None)
        drop = torch.from_numpy(g.random(args.batch) < args.uncond_p)
        t = torch.from_numpy(g.integers(0, sched.config.num_train_timesteps, args.batch))
        noise = torch.randn_like(x0)
        if pairs:  # same noise, timestep and dropout: at high noise only the word tells the two targets apart
            drop[pairs:2 * pairs], t[pairs:2 * pairs] = drop[:pairs], t[:pairs]
            noise[pairs:2 * pairs] = noise[:pairs]
        tok[drop] = empty
        xt = sched.add_noise(x0, noise, t)
        text_states = te(tok).last_hidden_state  # (B, 77, TEXT_WIDTH)
        if grounding is not None:
            grounding.store.clear()
            grounding.store.enabled = True
        pred = unet(xt, t, encoder_hidden_states=text_states).sample
        w = torch.clamp(snr[t], max=args.min_snr) / snr[t]  # min-SNR-gamma weighting (epsilon target)
        loss = ((pred - noise).pow(2).mean(dim=(1, 2, 3)) * w).mean()
        layout_loss = None
        if args.layout_x0:
            lat = lateral_rows(args.batch, k, drop)
            if lat.any():
                layout_loss = x0_error(pred[lat], noise[lat], snr[t[lat]], args.layout_x0_cap)
                loss = loss + args.layout_x0 * layout_loss
        probe_loss = probe.loss(text_states, tok) if probe is not None else None
        if probe_loss is not None:
            loss = loss + args.te_layout * probe_loss
        anchor_loss = anchor.loss(text_states, tok, probe) if anchor is not None else None
        if anchor_loss is not None and args.te_anchor_random:  # drawn last: the step's other draws are as before
            rand = TextAnchor.random_tokens(comps.tokenizer, args.te_anchor_random, g, avoid)
            n = len(tok)
            anchor_loss = (n * anchor_loss + len(rand) * anchor.loss(te(rand).last_hidden_state, rand, None)) / (n + len(rand))
        if anchor_loss is not None:
            loss = loss + args.te_anchor * anchor_loss
        ground_loss = None
        if grounding is not None:
            grounding.store.enabled = False
            # --grounding-t-min: only where the sampler fixes the layout; below it the words draw shape and detail
            ground_loss = grounding.loss(spans, obj_masks, grounding_rows(drop, t, args.grounding_t_min))
            grounding.store.clear()
            if ground_loss is not None:
                loss = loss + args.token_grounding * ground_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        done = step + 1
        if done % 50 == 0:
            log(f"unet {done}/{args.unet_steps} loss {loss.item():.4f} lr {lr:.1e} "
                + (f"probe {probe_loss.item():.3f} " if probe_loss is not None else "")
                + (f"grounding {ground_loss.item():.3f} " if ground_loss is not None else "")
                + (f"layout-x0 {layout_loss.item():.3f} " if layout_loss is not None else "")
                + (f"anchor {anchor_loss.item():.4f} " if anchor_loss is not None else "") +
                f"({(time.time() - t0) / (done - start):.2f} s/step)")
        if done % args.ckpt_every == 0 or done == args.unet_steps:
            save_ckpt(ck, unet=unet.state_dict(), te=te.state_dict(), ema_u=ema_u.state_dict(), ema_t=ema_t.state_dict(),
                      opt=opt.state_dict(), step=done, rng=torch.get_rng_state(), options=options,
                      **({"probe": probe.direction.detach()} if probe is not None else {}))
            if stop_requested(work, "unet"):
                log(f"unet: STOP file found, ending at {done}")
                break
    if grounding is not None:
        from dynasyn.attention import remove_attention_capture

        remove_attention_capture(unet)
    unet.load_state_dict(ema_u.state_dict())
    te.load_state_dict(ema_t.state_dict())
    unet.eval(); te.eval()
    return done


def evaluate(comps, args) -> dict:
    from dynasyn.shapes.scorer import EVAL_GUIDANCE, EVAL_STEPS, evaluate_model

    imgs, _ = render_set(args.eval_vae, EVAL_SEED0)
    with torch.no_grad():
        x = to_tensor(imgs)
        rec = torch.cat([comps.vae.decode(comps.vae.encode(x[i:i + 64]).latent_dist.mean).sample
                         for i in range(0, len(x), 64)])
    out = {"vae_psnr_db": round(psnr(rec.clamp(-1, 1), x), 2), "vae_eval_scenes": args.eval_vae,
           "sampler": {"name": "DDIM", "steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE, "eval_seed0": EVAL_SEED0}}
    out.update(evaluate_model(comps, n=args.eval_captions))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=12000, help="training scenes (seeds 0..N-1)")
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--vae-batch", type=int, default=8)
    ap.add_argument("--decoder-steps", type=int, default=600)
    ap.add_argument("--decoder-patterned", type=int, default=4000,
                    help="patterned-subject scenes added to the decoder's fine-tuning set")
    ap.add_argument("--unet-patterned", type=int, default=0,
                    help="scenes whose objects wear known two-colour patterns, added to the UNet's training set "
                         "from step --patterned-from on (the novel subjects' colour pairs are never among them)")
    ap.add_argument("--patterned-from", type=int, default=0, help="the UNet step where those scenes join")
    ap.add_argument("--unet-steps", type=int, default=2600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--decay-steps", type=int, default=0, help="the learning rate falls linearly to 0 over the last N "
                                                               "UNet steps (0: constant after warm-up)")
    ap.add_argument("--decay-end", type=int, help="the step where the cool-down reaches 0 (default: --unet-steps; "
                                                  "the manifest records it, so a run a STOP file ended reproduces)")
    ap.add_argument("--init-from", help="continue from these released weights (fp16 safetensors): UNet + text encoder "
                                        "only, the VAE as it is")
    ap.add_argument("--lateral-boost", type=float, default=0.0,
                    help="share of each UNet batch drawn from the scenes captioned 'left of' / 'right of' (0: drawn "
                         "like all others). A world seen side-on has no horizontal cue but the caption's word, and "
                         "a model trained without a boost ignores it (the same seed draws the same order for both)")
    ap.add_argument("--mirror-pairs", action="store_true",
                    help="with --lateral-boost: half of that share is the other half's scenes mirrored and captioned "
                         "with the other word ('left of' <-> 'right of'), with the same noise and timestep")
    ap.add_argument("--te-layout", type=float, default=0.0,
                    help="weight of the text encoder's lateral probe (see LateralProbe): the tokens after 'left of' "
                         "and 'right of' must differ; 0 = off")
    ap.add_argument("--te-layout-words", choices=("all", "names"), default="all",
                    help="the tokens --te-layout's probe asks to carry the side: every token after the relation word "
                         "(all), or those but 'of', 'a', 'an', 'the', 'in', 'on' (names), which then keep their states "
                         "elsewhere")
    ap.add_argument("--token-grounding", type=float, default=0.0,
                    help="weight of the token grounding loss (see TokenGrounding): each object's words attend to its "
                         "mask at the 16x16 and 8x8 cross-attention levels; 0 = off")
    ap.add_argument("--grounding-sides", type=map_sides,
                    default=(16, 8), help="the cross-attention map sides --token-grounding supervises, e.g. 16,8,4")
    ap.add_argument("--grounding-words", choices=("all", "class"), default="all",
                    help="which of each object's words --token-grounding pulls to its mask: all (colours, pattern, "
                         "class noun) or its class noun only")
    ap.add_argument("--grounding-t-min", type=int, default=0,
                    help="--token-grounding only on steps whose timestep is at least this (0: all); at high noise the "
                         "sampler fixes where objects go, at low noise the words draw their shape and detail")
    ap.add_argument("--frozen-map-sides", type=map_sides,
                    default=(), help="comma list of cross-attention map sides (16, 8, 4) whose query and key weights keep "
                                     "the starting weights: where the words attend at that level does not train")
    ap.add_argument("--reset-map-sides", type=map_sides,
                    default=(), help="comma list of cross-attention map sides whose query and key weights are set back to "
                                     "the starting weights after training (the rest of the run is unchanged)")
    ap.add_argument("--te-anchor", type=float, default=0.0,
                    help="weight of a squared error keeping the text encoder's final states near those of --init-from's "
                         "weights (see TextAnchor); 0 = off")
    ap.add_argument("--te-anchor-lateral", choices=("direction", "free"), default="direction",
                    help="with --te-layout: after 'left' / 'right' the probe's direction only is left free (direction), "
                         "or the whole state (free)")
    ap.add_argument("--te-anchor-span", choices=("caption", "all"), default="caption",
                    help="the positions --te-anchor keeps: each caption's tokens up to its end token (caption), or "
                         "the padding after it too (all), which takes most of the UNet's cross-attention")
    ap.add_argument("--te-anchor-random", type=int, default=0,
                    help="with --te-anchor-span all: this many captions of random vocabulary tokens per step are "
                         "anchored too, so words the world never shows keep their states; 0 = none")
    ap.add_argument("--layout-x0", type=float, default=0.0,
                    help="with --lateral-boost: weight of an extra loss on the lateral scenes (captioned, not dropped): "
                         "their epsilon error divided by the noise level's SNR, i.e. the error of the picture "
                         "predicted from it, where the sampler fixes the layout and the epsilon loss barely sees it; "
                         "0 = off")
    ap.add_argument("--layout-x0-cap", type=float, default=20.0,
                    help="the most that --layout-x0 weighs one scene's epsilon error (1 / SNR is 213 at t = 999)")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--min-snr", type=float, default=5.0)
    ap.add_argument("--uncond-p", type=float, default=0.1)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-captions", type=int, default=200)
    ap.add_argument("--eval-vae", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=str(ROOT / ".shapes_train"))
    ap.add_argument("--out", default=str(sm.WEIGHTS_FILE))
    ap.add_argument("--eval-only", action="store_true", help="evaluate the weights at --out, rewrite the manifest")
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.decay_steps < 0:
        ap.error("--decay-steps must be 0 or more")
    if not 0.0 <= args.lateral_boost <= 1.0:
        ap.error("--lateral-boost is a share of the batch: 0 to 1")
    if args.te_layout < 0:
        ap.error("--te-layout is a loss weight: 0 (off) or more")
    if args.te_layout_words != "all" and not args.te_layout:
        ap.error("--te-layout-words chooses the tokens of --te-layout's probe: give --te-layout too")
    if args.token_grounding < 0:
        ap.error("--token-grounding is a loss weight: 0 (off) or more")
    if not set(args.grounding_sides) <= {16, 8, 4}:
        ap.error("--grounding-sides: the Shapes World UNet's cross-attention maps are 16, 8 and 4 cells wide")
    if not set(args.frozen_map_sides) <= {16, 8, 4}:
        ap.error("--frozen-map-sides: the Shapes World UNet's cross-attention maps are 16, 8 and 4 cells wide")
    if not set(args.reset_map_sides) <= {16, 8, 4}:
        ap.error("--reset-map-sides: the Shapes World UNet's cross-attention maps are 16, 8 and 4 cells wide")
    if (args.frozen_map_sides or args.reset_map_sides) and not args.init_from:
        ap.error("--frozen-map-sides / --reset-map-sides keep the weights a run starts from: give --init-from")
    if not 0 <= args.grounding_t_min < 1000:
        ap.error("--grounding-t-min is a timestep: 0 to 999")
    if args.grounding_t_min and not args.token_grounding:
        ap.error("--grounding-t-min says where --token-grounding applies: give --token-grounding too")
    if args.grounding_words != "all" and not args.token_grounding:
        ap.error("--grounding-words chooses the words --token-grounding pulls to their masks: give --token-grounding too")
    if args.te_anchor < 0:
        ap.error("--te-anchor is a loss weight: 0 (off) or more")
    if args.te_anchor and not args.init_from:
        ap.error("--te-anchor keeps the text encoder near the weights a run starts from: give --init-from")
    if args.te_anchor_lateral != "direction" and not (args.te_anchor and args.te_layout):
        ap.error("--te-anchor-lateral says what --te-anchor leaves to --te-layout's probe: give both")
    if (args.te_anchor_span != "caption" or args.te_anchor_random) and not args.te_anchor:
        ap.error("--te-anchor-span and --te-anchor-random say what --te-anchor keeps: give --te-anchor")
    if args.te_anchor_random < 0:
        ap.error("--te-anchor-random is a number of captions per step: 0 or more")
    if args.te_anchor_random and args.te_anchor_span != "all":
        ap.error("--te-anchor-random anchors whole random captions: give --te-anchor-span all")
    if not (math.isfinite(args.layout_x0) and math.isfinite(args.layout_x0_cap)) or args.layout_x0 < 0 \
            or args.layout_x0_cap <= 0:
        ap.error("--layout-x0 is a loss weight (0 = off) and --layout-x0-cap a positive bound")
    if args.layout_x0_cap != 20.0 and not args.layout_x0:
        ap.error("--layout-x0-cap bounds --layout-x0's weights: give --layout-x0 too")
    if args.layout_x0 and not round(args.lateral_boost * args.batch):
        ap.error("--layout-x0 weighs the lateral share of each batch: give --lateral-boost")
    if args.mirror_pairs and round(args.lateral_boost * args.batch) < 2:
        ap.error("--mirror-pairs needs --lateral-boost of at least 2 scenes per batch")
    if args.decay_end is None:
        args.decay_end = args.unet_steps

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    out = Path(args.out)
    manifest_path = out.with_suffix(".json")

    if args.eval_only:
        comps = sm.load_shapes_components(out, verify=False)
        man = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        t0 = time.time()
        man.pop("sampler", None)  # the evaluation sampler is recorded inside "quality"
        man["quality"] = evaluate(comps, args)
        man["eval_time_s"] = round(time.time() - t0)
        man["sha256"] = sm.sha256_of(out)
        manifest_path.write_text(json.dumps(man, indent=2) + "\n")
        log(json.dumps(man["quality"]))
        return 0

    init = None
    if args.init_from:
        init = json.loads(Path(args.init_from).with_suffix(".json").read_text())
        if sm.sha256_of(args.init_from) != init["sha256"]:
            raise SystemExit(f"{args.init_from} does not match its manifest's sha256")
        comps = sm.load_shapes_components(args.init_from, verify=False)
        args.vae_steps = args.decoder_steps = 0
        work = work / f"from-{init['sha256'][:12]}"  # never a from-scratch run's checkpoints
        work.mkdir(parents=True, exist_ok=True)
    else:
        comps = sm.build_shapes_components(seed=args.seed)
    log(f"rendering {args.scenes} training scenes")
    imgs, caps, *grounding_set = render_set(args.scenes, TRAIN_SEED0, with_masks=bool(args.token_grounding))
    ids = comps.tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    vae_done = 0 if init is not None else train_vae(comps, imgs, args, work, steps=args.vae_steps, name="vae")
    folded = work / "vae_folded.pt"
    if init is not None:
        pass  # the released VAE is already folded
    elif folded.exists():
        comps.vae.load_state_dict(torch.load(folded, weights_only=True))
    else:
        with torch.no_grad():
            z = torch.cat([comps.vae.encode(to_tensor(imgs[i:i + 64])).latent_dist.mean for i in range(0, min(1024, len(imgs)), 64)])
        mean, std = z.mean(dim=(0, 2, 3)), z.std(dim=(0, 2, 3))
        sm.fold_latent_normalisation(comps.vae, mean, std)
        save_ckpt(folded, **comps.vae.state_dict())
    log("encoding training scenes")
    latents = encode_all(comps.vae, imgs)
    log(f"latent std {latents.std().item():.3f} (x scaling)")

    unet_latents, unet_ids, n_plain = latents, ids, None
    if args.unet_patterned:
        log(f"rendering {args.unet_patterned} scenes with known patterns (from UNet step {args.patterned_from})")
        pimgs, pcaps, *pgrounding_set = render_set(args.unet_patterned, KNOWN_PATTERN_SEED0, patterned=KNOWN_PATTERN_P,
                                                   with_masks=bool(args.token_grounding))
        pids = comps.tokenizer(pcaps, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        unet_latents, unet_ids, n_plain = torch.cat([latents, encode_all(comps.vae, pimgs)]), torch.cat([ids, pids]), len(latents)
    all_caps = caps + (pcaps if args.unet_patterned else [])
    # With --mirror-pairs, scenes with a checked object are left out: a check seen in a mirror swaps its two
    # colours' places (stripes and dots do not), so its caption would name them in the wrong order.
    lateral = np.array([i for i, c in enumerate(all_caps) if (" left of " in c or " right of " in c)
                        and not (args.mirror_pairs and " checked " in c)], dtype=np.int64)
    mirrors = None
    if args.mirror_pairs:
        log(f"encoding {len(lateral)} mirrored lateral scenes")
        all_imgs = np.concatenate([imgs, pimgs]) if args.unet_patterned else imgs
        flipped = np.ascontiguousarray(all_imgs[lateral][:, :, ::-1])
        mcaps = [mirrored_caption(all_caps[i]) for i in lateral]
        mirrors = (encode_all(comps.vae, flipped), comps.tokenizer(mcaps, padding="max_length", max_length=77,
                                                                   truncation=True, return_tensors="pt").input_ids)
    grounding_data = None
    if args.token_grounding:
        log("finding each object's words and mask for the token grounding loss")
        objs, masks = grounding_set
        pobjs, pmasks = pgrounding_set if args.unet_patterned else ([], masks[:0])
        all_masks = torch.from_numpy(np.concatenate([masks, pmasks]))  # [N, K, 64, 64] bool
        # [N, K, 16, 16]: each cell's covered share (in chunks: the float copy of all of them would be ~600 MB)
        coverage = torch.cat([F.adaptive_avg_pool2d(m.float(), max(args.grounding_sides)) for m in all_masks.split(1024)])
        all_objs = objs + pobjs
        spans = TokenGrounding.spans_of(comps.tokenizer, unet_ids, all_objs, args.grounding_words)
        grounding_data = (spans, coverage, coverage[lateral].flip(-1) if mirrors is not None else None)
    start_qk = [p.detach().clone() for p in map_projections(comps.unet, args.reset_map_sides)]
    unet_done = train_unet(comps, unet_latents, unet_ids, args, work, n_before=n_plain, lateral=lateral,
                           mirrors=mirrors, grounding_data=grounding_data)
    with torch.no_grad():  # --reset-map-sides: after training, where the words attend at those levels is as it was
        for p, p0 in zip(map_projections(comps.unet, args.reset_map_sides), start_qk):
            p.copy_(p0)
    dec_imgs, dec_latents = imgs, latents
    if args.decoder_patterned and args.decoder_steps:
        from dynasyn.shapes.identity import sample_novel_scene

        log(f"rendering {args.decoder_patterned} patterned scenes for the decoder")
        pat = np.stack([sample_novel_scene(PATTERNED_SEED0 + i)[0].image for i in range(args.decoder_patterned)])
        dec_imgs, dec_latents = np.concatenate([imgs, pat]), torch.cat([latents, encode_all(comps.vae, pat)])
    dec_params = list(comps.vae.post_quant_conv.parameters()) + list(comps.vae.decoder.parameters())
    dec_done = 0 if init is not None else train_vae(comps, dec_imgs, args, work, params=dec_params, name="decoder",
                                                    steps=args.decoder_steps, lr=3e-4, latents=dec_latents)
    train_s = time.time() - t_start
    sha = sm.save_weights(comps, out)
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB), evaluating")
    man = {
        "model": "DynASyn Shapes World", "file": out.name, "sha256": sha, "bytes": out.stat().st_size,
        "steps": {"vae": vae_done, "unet": unet_done, "decoder": dec_done},
        "batch": {"vae": args.vae_batch, "unet": args.batch}, "training_scenes": args.scenes, "seed": args.seed,
        "lr": args.lr, "ema": args.ema, "threads": args.threads,
        "training_time_s": round(train_s), "command": "python scripts/train_shapes_world.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in (("vae_steps", vae_done), ("unet_steps", unet_done),
                                                        ("decoder_steps", dec_done), ("decoder_patterned", args.decoder_patterned),
                                                        ("unet_patterned", args.unet_patterned), ("patterned_from", args.patterned_from),
                                                        ("scenes", args.scenes))),
        "date": time.strftime("%Y-%m-%d"),
    }
    man["command"] += f" --lr {args.lr} --warmup {args.warmup}" + (f" --seed {args.seed}" if args.seed else "")
    if args.lateral_boost:
        man["command"] += f" --lateral-boost {args.lateral_boost}" + (" --mirror-pairs" if args.mirror_pairs else "")
    if args.te_layout:
        man["command"] += f" --te-layout {args.te_layout}" + (f" --te-layout-words {args.te_layout_words}"
                                                              if args.te_layout_words != "all" else "")
    if args.te_anchor:
        man["command"] += f" --te-anchor {args.te_anchor}" + (f" --te-anchor-lateral {args.te_anchor_lateral}"
                                                              if args.te_layout else "")
        if args.te_anchor_span != "caption":
            man["command"] += f" --te-anchor-span {args.te_anchor_span}"
        if args.te_anchor_random:
            man["command"] += f" --te-anchor-random {args.te_anchor_random}"
    if args.layout_x0:
        man["command"] += f" --layout-x0 {args.layout_x0} --layout-x0-cap {args.layout_x0_cap}"
    if args.token_grounding:
        man["command"] += f" --token-grounding {args.token_grounding} --grounding-sides " + ",".join(map(str, args.grounding_sides))
        if args.grounding_words != "all":
            man["command"] += f" --grounding-words {args.grounding_words}"
        if args.grounding_t_min:
            man["command"] += f" --grounding-t-min {args.grounding_t_min}"
    if args.frozen_map_sides:
        man["command"] += " --frozen-map-sides " + ",".join(map(str, args.frozen_map_sides))
    if args.reset_map_sides:
        man["command"] += " --reset-map-sides " + ",".join(map(str, args.reset_map_sides))
    if args.decay_steps:
        man["command"] += f" --decay-steps {args.decay_steps} --decay-end {args.decay_end}"
    if init is not None:  # a continued run: what it continued from, and how that was made
        man["command"] += f" --init-from <the weights of sha256 {init['sha256'][:12]}…>"
        man["init_from"] = {k: init[k] for k in ("sha256", "steps", "command", "training_time_s", "date", "quality",
                                                 "init_from") if k in init}
    manifest_path.write_text(json.dumps(man, indent=2) + "\n")
    man["quality"] = evaluate(comps, args)
    man["eval_time_s"] = round(time.time() - t_start - train_s)
    manifest_path.write_text(json.dumps(man, indent=2) + "\n")
    log(json.dumps(man["quality"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
