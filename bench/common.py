"""Shared pieces of the benchmarks: the real SD 2.1-base architecture with random weights, a scene.

Random weights cost what trained ones do (same shapes, same kernels), and nothing is downloaded.
The tokenizer is the tiny BPE padded to CLIP's 49,408 entries so the token table (and its
optimizer state) has its real size.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dynasyn.dataset import AugmentedPair  # noqa: E402
from dynasyn.models import SDComponents, make_noise_scheduler  # noqa: E402
from dynasyn.tiny import write_tiny_tokenizer_files  # noqa: E402

CLIP_VOCAB = 49408


def clip_sized_tokenizer(family: str = "sd2"):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as d:
        write_tiny_tokenizer_files(d)
        vocab = json.loads((Path(d) / "vocab.json").read_text(encoding="utf-8"))
        for k in range(CLIP_VOCAB - len(vocab)):  # unreachable filler entries: only the table size matters
            vocab[f"filler{k}</w>"] = len(vocab)
        (Path(d) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        pad = dict(pad_token="!") if family == "sd2" else dict(pad_token="<|endoftext|>")
        return CLIPTokenizer(str(Path(d) / "vocab.json"), str(Path(d) / "merges.txt"), model_max_length=77,
                             bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", **pad)


def sd21_base_components(seed: int = 0) -> SDComponents:
    """stabilityai/stable-diffusion-2-1-base's architecture (UNet 865M, OpenCLIP-H text tower 23 layers, KL VAE)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True)
    tok = clip_sized_tokenizer("sd2")
    te = CLIPTextModel(CLIPTextConfig(vocab_size=CLIP_VOCAB, hidden_size=1024, intermediate_size=4096,
                                      num_attention_heads=16, num_hidden_layers=23, hidden_act="gelu", projection_dim=512,
                                      max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=512)
    return SDComponents(unet.eval(), te.eval(), tok, vae.eval(), make_noise_scheduler("epsilon"), family="sd2")


def scene(size: int = 512, seed: int = 0):
    """A picture with two coloured subjects and their masks (what the trainer sees; content is irrelevant to cost)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(size, size, 3, generator=g)
    a = torch.zeros(size, size)
    a[size // 10: size // 2, size // 10: size // 2] = 1
    b = torch.zeros(size, size)
    b[size // 2: size - size // 16, size // 2 - size // 16: size - size // 16] = 1
    return image, [a, b], ["panda", "bowl"]


def augmented_pair(size: int = 512) -> AugmentedPair:
    image, masks, _ = scene(size, seed=1)
    return AugmentedPair(image, "a panda jumping into a bowl", [0, 1], torch.stack(masks))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median(xs) -> float:
    return statistics.median(xs)


def machine() -> str:
    import os

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
