"""A tiny random-weight OWL-ViT saved as a transformers folder, loaded like google/owlvit-base-patch32."""

from __future__ import annotations

from pathlib import Path

import torch

from dynasyn.tiny import write_tiny_tokenizer_files


def write_tiny_owlvit(folder: Path) -> Path:
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    folder = Path(folder)
    tok_dir = write_tiny_tokenizer_files(folder.parent / f"{folder.name}_tokenizer")
    tok = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=16,
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="!")
    torch.manual_seed(0)
    cfg = OwlViTConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=16),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          image_size=64, patch_size=16),
                       projection_dim=32)
    OwlViTForObjectDetection(cfg).save_pretrained(folder)
    size = {"height": 64, "width": 64}
    OwlViTProcessor(image_processor=OwlViTImageProcessor(size=size, crop_size=size), tokenizer=tok).save_pretrained(folder)
    return folder
