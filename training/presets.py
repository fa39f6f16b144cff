"""Model sizes: the released BLIP-Diffusion's (SD-1.5, CLIP ViT-L/14, BERT-base Q-Former) and a tiny one.

``tiny`` serves tests, the demo and benchmarks of the code paths; a random ``blip-diffusion`` costs the same
per step as the released weights, for throughput benchmarks.
"""

from __future__ import annotations

from typing import Literal

from transformers import Blip2Config, CLIPTextConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .qformer import NUM_QUERY_TOKENS

ModelKind = Literal["tiny", "blip-diffusion"]
# The subject image's normalisation (CLIP's), as the released image processor has it.
CLIP_MEAN, CLIP_STD = tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD)
# The released scheduler config (Stable Diffusion 1.5's PNDM); training samples noise with DDPM on it.
SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                "clip_sample": False}


def model_configs(kind: ModelKind, clip_vocab: int, bert_vocab: int) -> dict:
    """The parts' configs: ``text`` and ``qformer`` (transformers configs), ``unet`` and ``vae`` (diffusers
    keyword arguments). The vocabulary sizes are the tiny preset's, whose tokenizers are built locally."""
    if kind == "blip-diffusion":  # SD-1.5 + CLIP ViT-L/14 (23 layers) + BERT-base Q-Former, as released
        text, vision, qformer_width = 768, 1024, 768
        return {
            "text": CLIPTextConfig(vocab_size=49408, hidden_size=text, intermediate_size=3072, num_hidden_layers=12,
                                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
            "qformer": Blip2Config(
                vision_config={"hidden_size": vision, "intermediate_size": 4096, "num_hidden_layers": 23,
                               "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                               "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "qkv_bias": True},
                qformer_config={"vocab_size": 30523, "hidden_size": qformer_width, "num_hidden_layers": 12,
                                "num_attention_heads": 12, "intermediate_size": 3072, "cross_attention_frequency": 1,
                                "encoder_hidden_size": vision},
                num_query_tokens=NUM_QUERY_TOKENS),
            "unet": {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                     "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                     "cross_attention_dim": text, "attention_head_dim": 8},
            "vae": {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "sample_size": 512,
                    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4},
        }
    width = 32
    return {
        "text": CLIPTextConfig(vocab_size=clip_vocab, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
                               bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1),
        "qformer": Blip2Config(
            vision_config={"hidden_size": width, "intermediate_size": 64, "num_hidden_layers": 2,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu",
                           "layer_norm_eps": 1e-5, "qkv_bias": True},
            qformer_config={"vocab_size": bert_vocab, "hidden_size": width, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "intermediate_size": 64, "cross_attention_frequency": 1,
                            "encoder_hidden_size": width, "max_position_embeddings": 64},
            num_query_tokens=NUM_QUERY_TOKENS),
        "unet": {"sample_size": 8, "block_out_channels": (32, 64), "layers_per_block": 1, "norm_num_groups": 8,
                 "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": width,
                 "attention_head_dim": 4},
        "vae": {"block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64,
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4},
    }
