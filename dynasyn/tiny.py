"""Tiny random-weight Stable Diffusion models, built locally with no download.

They have SD's structure (cross-attention UNet, CLIP text encoder, KL VAE, SD noise schedule) at
a size that trains in milliseconds per step on a CPU. Tests and the built-in demo model use them;
they run the same code paths as real checkpoints but their pictures are noise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .models import SDComponents, family_from_text_encoder_config, make_noise_scheduler

# Words the tiny tokenizer knows as whole tokens; anything else falls back to characters.
TINY_WORDS = (
    "a an the photo of and with on in at by to is are from near under over beside behind into onto toy panda bowl dog cat "
    "bear bird chicken creature rabbit sheep stone ball cup box plant jumping running sitting sleeping playing eating "
    "chasing holding looking hugging standing walking flying swimming dancing beach park forest table kitchen room "
    "garden street snow grass water red green blue white black small big cute fluffy wooden"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable-unicode table (256 symbols)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(parts) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def write_tiny_tokenizer_files(folder: str | Path, words=TINY_WORDS) -> Path:
    """Write ``vocab.json`` + ``merges.txt`` of a small CLIP BPE (byte fallback + whole ``words``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for w in words:
        # Apply the merges known so far exactly as BPE will, then add merges that finish the word;
        # new merges rank after all earlier ones, so tokenizing the word later gives one token.
        parts = _bpe(list(w[:-1]) + [w[-1] + "</w>"], ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(tok, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def tiny_tokenizer(family: str = "sd15"):
    """A CLIPTokenizer over the tiny vocabulary (SD 1.x pads with EOS, SD 2.x with id 0, as the real ones)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer_files(d)
        # Positional vocab/merges: transformers 5 silently ignores vocab_file=/merges_file=.
        kw = dict(pad_token="!") if family == "sd2" else dict(pad_token="<|endoftext|>")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=77,
                             bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", **kw)


def tiny_components(seed: int = 0, prediction_type: str = "epsilon", family: str = "sd15",
                    hidden_size: int = 32, tokenizer=None) -> SDComponents:
    """Random tiny SD: UNet 32->64 channels with cross-attention at both levels, 2-layer CLIP, 2-level VAE.

    64 px images map to 32x32 latents (VAE factor 2); the cross-attention layers sit at 32x32 and
    16x16 latent resolution, so attention capture sees the same 16x16 maps as SD at 512 px.
    ``tokenizer`` (e.g. CLIP's real one) replaces the tiny vocabulary; the embedding table follows it.
    """
    tok = tokenizer if tokenizer is not None else tiny_tokenizer(family)
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        return _build_tiny(tok, prediction_type, family, hidden_size)


def _build_tiny(tok, prediction_type, family, hidden_size) -> SDComponents:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden_size, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=64, norm_num_groups=32)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=77, projection_dim=hidden_size,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return SDComponents(unet.eval(), te.eval(), tok, vae.eval(), make_noise_scheduler(prediction_type),
                        family=family or family_from_text_encoder_config(te.config))
