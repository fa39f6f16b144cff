"""CLIP's text encoder with subject embeddings among its token embeddings (BLIP-Diffusion's context encoder).

The 16 subject embeddings replace nothing: they are inserted among the prompt's token embeddings before
positions are added, so the sequence grows by 16. Where they go is the caller's choice: training puts them
just before the end-of-text token of ``"{caption}, the {category} is"``; inference, as LAVIS and diffusers,
at ``ctx_begin_pos`` (2: after the start token and the ``a`` of ``"a {category} {prompt}"``).
"""

from __future__ import annotations

import torch
from transformers import CLIPTextModel
from transformers.conversion_mapping import PrefixChange, register_checkpoint_conversion_mapping
from transformers.masking_utils import create_causal_mask


class ContextCLIPTextModel(CLIPTextModel):
    """CLIP's text encoder taking token embeddings in which subject embeddings have been inserted."""

    def token_embeddings(self, input_ids: torch.Tensor, ctx_embeddings: torch.Tensor | None = None,
                         positions: list[int] | None = None) -> torch.Tensor:
        """Token embeddings (B, T, H); with ``ctx_embeddings`` (B, Q, H), row ``i``'s are inserted before
        its token ``positions[i]`` (the sequence grows to T + Q)."""
        embeds = self.embeddings.token_embedding(input_ids)
        if ctx_embeddings is None:
            return embeds
        if positions is None or len(positions) != len(embeds):
            raise ValueError("one insertion position per row is needed with ctx_embeddings")
        ctx_embeddings = ctx_embeddings.to(embeds.dtype)
        return torch.stack([torch.cat([embeds[i, :at], ctx_embeddings[i], embeds[i, at:]])
                            for i, at in enumerate(positions)])

    def forward(self, inputs_embeds: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[override]
        positions = self.embeddings.position_ids[:, : inputs_embeds.shape[1]]
        hidden = inputs_embeds + self.embeddings.position_embedding(positions)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        return self.final_layer_norm(hidden)


# The released checkpoint nests the text encoder's weights under ``text_model.`` as transformers 4 did;
# transformers 5 maps that prefix for its own CLIPTextModel only, by class name.
register_checkpoint_conversion_mapping("ContextCLIPTextModel", [PrefixChange(prefix_to_remove="text_model")],
                                       overwrite=True)
