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


def write_tiny_grounding_dino(folder: Path) -> Path:
    """A tiny random Grounding DINO (Swin backbone, BERT text tower) with its processor."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    folder = Path(folder)
    vocab = folder.parent / f"{folder.name}_vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "red", "panda", "blue", "bowl", "ball", "box"]
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(words) + "\n")
    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
                          out_features=["stage1", "stage2"])
    text = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    cfg = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
                              encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=2, decoder_attention_heads=2,
                              num_queries=10, num_feature_levels=2, max_text_len=32, use_timm_backbone=False,
                              encoder_n_points=2, decoder_n_points=2)
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(cfg).save_pretrained(folder)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}),
                           tokenizer=BertTokenizer(str(vocab))).save_pretrained(folder)
    return folder
