"""Tiny models built from configs, saved with ``save_pretrained`` so code under test loads them through
the same ``from_pretrained`` path as a hub id (no weights can be downloaded here)."""

from __future__ import annotations

import json
import string
from pathlib import Path


def _write_char_vocab(folder: Path) -> tuple[Path, Path, int]:
    """A character-level CLIP BPE vocabulary: every lowercase word tokenizes, no merges needed."""
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in string.ascii_lowercase + string.digits + "-'":
            vocab[char + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file, len(vocab)


def save_tiny_clipseg(folder: Path, image_size: int = 64, seed: int = 0) -> Path:
    import torch
    from transformers import (
        CLIPSegConfig,
        CLIPSegForImageSegmentation,
        CLIPSegProcessor,
        CLIPTokenizer,
        ViTImageProcessor,
    )

    folder.mkdir(parents=True, exist_ok=True)
    scratch = folder / "tokenizer-source"
    scratch.mkdir(exist_ok=True)
    vocab_file, merges_file, vocab_size = _write_char_vocab(scratch)
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file))
    image_processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    config = CLIPSegConfig(
        text_config={
            "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 32,
            "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1, "pad_token_id": vocab_size - 1,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": 16,
        },
        projection_dim=16, reduce_dim=16, extract_layers=[0, 1], decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    torch.manual_seed(seed)
    CLIPSegForImageSegmentation(config).save_pretrained(folder)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
