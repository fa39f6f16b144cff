"""BLIP-Diffusion's multimodal Q-Former, in the weight layout of the released ``Salesforce/blipdiffusion``.

A frozen CLIP ViT-L/14 image encoder (23 layers, in BLIP-2 layout), 16 learned queries that self-attend
together with the subject-text tokens and cross-attend to the image in every layer, and a projection
(LayerNorm, Linear 768->3072, QuickGELU as released, Linear back, residual) to the text encoder's width.
diffusers' own module (``Blip2QFormerModel`` of its deprecated BLIP-Diffusion) does not run under
transformers 5; this one reuses transformers' BLIP-2 layers and only adds what BLIP-Diffusion changes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2Config
from transformers.activations import QuickGELUActivation
from transformers.models.blip_2.modeling_blip_2 import (
    Blip2Encoder,
    Blip2PreTrainedModel,
    Blip2QFormerEncoder,
)

NUM_QUERY_TOKENS = 16


class SubjectTextEmbeddings(nn.Module):
    """Queries followed by the subject-text tokens (with positions), layer-normed: the Q-Former's input."""

    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, query_embeds: torch.Tensor) -> torch.Tensor:
        text = self.word_embeddings(input_ids) + self.position_embeddings(self.position_ids[:, : input_ids.shape[1]])
        queries = query_embeds.expand(input_ids.shape[0], -1, -1).to(text.dtype)
        return self.dropout(self.LayerNorm(torch.cat([queries, text], dim=1)))


class ProjLayer(nn.Module):
    """Residual MLP from the Q-Former's outputs to subject embeddings (names as in the released weights)."""

    def __init__(self, width: int, eps: float = 1e-12, dropout: float = 0.1) -> None:
        super().__init__()
        self.LayerNorm = nn.LayerNorm(width, eps=eps)
        self.dense1 = nn.Linear(width, width * 4)
        self.act_fn = QuickGELUActivation()
        self.dense2 = nn.Linear(width * 4, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.dense2(self.act_fn(self.dense1(self.LayerNorm(x)))))


class ImageEmbeddings(nn.Module):
    """CLIP's patch embedding (no bias, unlike transformers' BLIP-2 one), class token and positions."""

    def __init__(self, config) -> None:
        super().__init__()
        width, patch = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(1, 1, width))
        self.patch_embedding = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Parameter(torch.randn(1, (config.image_size // patch) ** 2 + 1, width))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype), patches], dim=1)
        return tokens + self.position_embedding.to(patches.dtype)


class ImageEncoder(nn.Module):
    """CLIP ViT in BLIP-2 layout (fused qkv), with CLIP's pre-LayerNorm; frozen during training."""

    def __init__(self, config) -> None:
        super().__init__()
        self.embeddings = ImageEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Blip2Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The ViT's tokens before its last LayerNorm (which BLIP-2's stage 1 trains as ``ln_vision``)."""
        hidden = self.pre_layernorm(self.embeddings(pixel_values))
        return self.encoder(inputs_embeds=hidden).last_hidden_state

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.post_layernorm(self.tokens(pixel_values))


class SubjectQFormer(Blip2PreTrainedModel):
    """The multimodal Q-Former: subject image + subject text -> ``num_query_tokens`` subject embeddings."""

    config_class = Blip2Config
    main_input_name = "pixel_values"
    _no_split_modules = ["Blip2QFormerLayer", "Blip2EncoderLayer"]

    def __init__(self, config: Blip2Config) -> None:
        # Released configs predate this flag; without it the text tokens get no feed-forward layers.
        config.qformer_config.use_qformer_text_input = True
        config.qformer_config._attn_implementation = "sdpa"
        config.vision_config._attn_implementation = "sdpa"
        super().__init__(config)
        width = config.qformer_config.hidden_size
        self.embeddings = SubjectTextEmbeddings(config.qformer_config)
        self.visual_encoder = ImageEncoder(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, width))
        self.proj_layer = ProjLayer(width)
        self.encoder = Blip2QFormerEncoder(config.qformer_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, SubjectTextEmbeddings):
            # Non-persistent buffers are not in checkpoints; from_pretrained materializes them here.
            with torch.no_grad():
                module.position_ids.copy_(torch.arange(module.position_ids.shape[1])[None])
        elif isinstance(module, ImageEmbeddings):
            std = self.config.vision_config.initializer_range
            nn.init.trunc_normal_(module.class_embedding, std=std)
            nn.init.trunc_normal_(module.position_embedding, std=std)
        elif module is self:
            # Identical zero queries would stay identical under training; BLIP-2 starts them random.
            nn.init.normal_(self.query_tokens, std=self.config.qformer_config.initializer_range)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            image = self.visual_encoder(pixel_values)
        hidden = self.embeddings(input_ids, self.query_tokens)
        queries = self.query_tokens.shape[1]
        keep = torch.cat([attention_mask.new_ones(attention_mask.shape[0], queries), attention_mask], dim=1).bool()
        hidden = self.encoder(hidden, attention_mask=keep[:, None, None, :], encoder_hidden_states=image,
                              query_length=queries).last_hidden_state
        return self.proj_layer(hidden[:, :queries])
