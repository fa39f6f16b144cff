"""Prompt-to-prompt attention control for subject-driven editing (BLIP-Diffusion paper, A.7), as the authors
(LAVIS ``blip_diffusion_models/ptp_utils.py``, after Google's prompt-to-prompt) do it, on diffusers' attention
processor API.

The UNet denoises two prompts side by side: the source (the sentence as it is) and the target (the edit word
replaced by the subject). :class:`P2PAttnProcessor` computes attention itself, like diffusers'
``AttnProcessor``, and hands every layer's attention probabilities to an :class:`AttentionRefine`, which

- records the source's cross-attention maps (:class:`AttentionStore`);
- gives the target, for the first ``cross_replace_steps`` of the steps, the source's cross-attention of the
  tokens the two prompts share (a token alignment, :func:`refinement_mapper`), and keeps the target's own for
  its new tokens (the subject embeddings, the placeholders, the new category);
- gives the target the source's self-attention in the coarse layers for the first ``self_replace_steps``;
- after each step, :class:`LocalBlend` takes the target's latents outside the edit word's cross-attention mask
  from the source, so that only the subject changes.

LAVIS computes its token positions on the prompt text, in which 16 placeholder words stand for the 16
subject embeddings; the text encoder then reads both (the embeddings are inserted, not swapped in), so LAVIS's
positions after the placeholders are 16 tokens off. Here they are computed on the token sequence that the text
encoder reads, subject embeddings included, which is what LAVIS's own comment on its mapper describes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from transformers import PreTrainedTokenizerBase

# Where the subject embeddings sit in a target token sequence: a value that no token id equals, so the
# alignment treats them as new tokens.
SUBJECT_SLOT = -1
# prompt-to-prompt replaces self-attention only in layers with at most this many positions (16 x 16, SD's
# 512-pixel coarse layers): there self-attention holds the layout; finer layers keep the target's detail.
SELF_REPLACE_MAX_POSITIONS = 16**2
# LocalBlend dilates the word's map with a max-pool of this size before thresholding it (LAVIS's k = 1).
BLEND_POOL = 3
# The UNet parts whose cross-attention makes the local blend's mask and the word's attention map; the
# middle block is coarser than any and left out, as LAVIS's down_cross[2:4] + up_cross[:3] leave it.
BLEND_PLACES = ("down", "up")


def place_in_unet(name: str) -> str | None:
    """``down``, ``mid`` or ``up`` for an attention processor's name in the UNet, None elsewhere."""
    for prefix, place in (("down_blocks.", "down"), ("mid_block.", "mid"), ("up_blocks.", "up")):
        if name.startswith(prefix):
            return place
    return None


def word_token_indices(tokenizer: PreTrainedTokenizerBase, text: str, span: tuple[int, int]) -> list[int]:
    """Positions, in ``text``'s whole encoding (start token first, not cut), of the tokens that cover the
    characters ``text[span[0]:span[1]]`` (a word or words)."""
    start, end = span
    encoding = tokenizer(text, return_offsets_mapping=True)
    return [index for index, (first, last) in enumerate(encoding.offset_mapping)
            if last > first and first < end and last > start]


def _global_align(source: list[int], target: list[int]) -> list[int]:
    """For each target token, the source token it is aligned to, or -1 for a target token of its own:
    Needleman-Wunsch with prompt-to-prompt's scores (match 1, mismatch -1, gap 0) and its tie-breaking (a
    target-only token first, then a source-only token, then a pair)."""
    rows, cols = len(source) + 1, len(target) + 1
    score = [[0] * cols for _ in range(rows)]
    move = [[0] * cols for _ in range(rows)]  # 1: target-only, 2: source-only, 3: pair
    for j in range(1, cols):
        move[0][j] = 1
    for i in range(1, rows):
        move[i][0] = 2
    for i in range(1, rows):
        for j in range(1, cols):
            pair = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(score[i][j - 1], score[i - 1][j], pair)
            move[i][j] = 1 if score[i][j] == score[i][j - 1] else 2 if score[i][j] == score[i - 1][j] else 3
    aligned = [-1] * len(target)
    i, j = len(source), len(target)
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            aligned[j] = i
        elif move[i][j] == 1:
            j -= 1
        else:
            i -= 1
    return aligned


def refinement_mapper(source_ids: list[int], target_ids: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt-to-prompt's refinement mapper (LAVIS ``get_refinement_mapper``) of two unpadded token sequences:
    ``mapper`` (length,), the source position whose cross-attention each target position takes, and
    ``alphas`` (length,), 1 where it takes it, 0 for the target's own tokens. Positions past the target's
    tokens (padding) take the source's same position."""
    if len(target_ids) > length:
        raise ValueError(f"{len(target_ids)} target tokens for {length} positions")
    aligned = torch.tensor(_global_align(source_ids, target_ids), dtype=torch.long)
    mapper = torch.arange(length)
    mapper[: len(aligned)] = aligned
    alphas = torch.ones(length)
    alphas[: len(aligned)] = aligned.ne(-1).float()
    return mapper, alphas


class AttentionStore:
    """The source prompt's cross-attention maps, averaged over heads and summed over the layers of each UNet
    part and resolution and over the steps so far. The target's maps and self-attention are not kept: nothing
    reads them (LAVIS stores them and reads only the source's cross-attention)."""

    def __init__(self, latent_size: tuple[int, int]) -> None:
        self.latent_size = latent_size
        self.sums: dict[tuple[str, int], torch.Tensor] = {}  # (place, positions) -> (positions, tokens)
        self.counts: dict[tuple[str, int], int] = {}

    def record(self, probs: torch.Tensor, place: str) -> None:
        """One layer's cross-attention probabilities of the source (heads, positions, tokens)."""
        key = (place, probs.shape[1])
        maps = probs.float().mean(dim=0)
        self.sums[key] = self.sums[key] + maps if key in self.sums else maps
        self.counts[key] = self.counts.get(key, 0) + 1

    def _map_size(self, positions: int) -> tuple[int, int]:
        """(rows, columns) of a layer's positions: the latent's size divided by the layer's downsampling."""
        height, width = self.latent_size
        for halvings in range(int(math.log2(max(height, width))) + 1):
            size = (math.ceil(height / 2**halvings), math.ceil(width / 2**halvings))
            if size[0] * size[1] == positions:
                return size
        raise ValueError(f"{positions} attention positions do not tile a {height}x{width} latent")

    def blend_maps(self) -> tuple[torch.Tensor, int]:
        """The maps (rows, columns, tokens) of the coarsest resolution that the down and up blocks
        attend at (16 x 16 for SD at 512 pixels, the resolution LAVIS's LocalBlend reads), summed over their
        layers and the steps, and how many layer calls the sum holds."""
        recorded = [positions for place, positions in self.sums if place in BLEND_PLACES]
        if not recorded:
            raise RuntimeError("no cross-attention has been recorded")
        positions = min(recorded)
        keys = [(place, positions) for place in BLEND_PLACES if (place, positions) in self.sums]
        maps = sum(self.sums[key] for key in keys)
        rows, columns = self._map_size(positions)
        return maps.reshape(rows, columns, maps.shape[-1]), sum(self.counts[key] for key in keys)

    def word_map(self, token_indices: list[int]) -> torch.Tensor:
        """A word's cross-attention map (rows, columns): its tokens' attention summed, averaged over heads, the
        blend resolution's layers and the steps (prompt-to-prompt's ``aggregate_attention``)."""
        maps, calls = self.blend_maps()
        return maps[:, :, token_indices].sum(dim=-1) / calls


class LocalBlend:
    """LAVIS's LocalBlend: the source's edit word's cross-attention map, max-pooled, resized to the latent's
    size and divided by its maximum, is the mask (above ``threshold``) inside which the target's latents are
    kept; outside it they are the source's. The mask comes from the source alone: LAVIS passes one word for
    two prompts and its ``zip`` leaves the target's weights at zero."""

    def __init__(self, token_indices: list[int], threshold: float) -> None:
        self.token_indices = token_indices
        self.threshold = threshold
        self.mask: torch.Tensor | None = None  # the last step's, (latent rows, latent columns)

    def __call__(self, latents: torch.Tensor, store: AttentionStore) -> torch.Tensor:
        maps, _ = store.blend_maps()
        word = maps[:, :, self.token_indices].sum(dim=-1)[None, None]
        mask = F.max_pool2d(word, BLEND_POOL, stride=1, padding=BLEND_POOL // 2)
        mask = F.interpolate(mask, size=latents.shape[2:])
        mask = mask / mask.amax(dim=(2, 3), keepdim=True)
        mask = mask.gt(self.threshold).to(latents.dtype)
        self.mask = mask[0, 0]
        source = latents[:1]
        return torch.cat([source, source + mask * (latents[1:] - source)])


class AttentionRefine:
    """LAVIS's AttentionRefine on (source, target): the target takes the source's cross-attention through
    ``mapper``/``alphas`` while the step is below ``int(cross_replace_steps * (num_steps + 1))``, and the
    source's self-attention in layers of at most :data:`SELF_REPLACE_MAX_POSITIONS` positions while it is
    below ``int(self_replace_steps * num_steps)`` (LAVIS's windows: its cross-attention weights have a row per
    step and one more, for PNDM's extra first step).

    The processors call it with every layer's probabilities (batch, heads, positions, tokens); the last two
    rows of the batch are the conditional source and target (the unconditional rows, first under
    classifier-free guidance, are left alone, as LAVIS leaves them). The pipeline calls :meth:`step_callback`
    after each scheduler step."""

    def __init__(self, mapper: torch.Tensor, alphas: torch.Tensor, num_steps: int, cross_replace_steps: float,
                 self_replace_steps: float, store: AttentionStore, local_blend: LocalBlend | None) -> None:
        self.mapper, self.alphas = mapper, alphas
        self.cross_replace_end = int(cross_replace_steps * (num_steps + 1))
        self.self_replace_end = int(self_replace_steps * num_steps)
        self.store = store
        self.local_blend = local_blend
        self.step = 0

    def __call__(self, probs: torch.Tensor, is_cross: bool, place: str) -> torch.Tensor:
        source, target = probs[-2], probs[-1]
        if is_cross:
            self.store.record(source, place)
            if self.step >= self.cross_replace_end:
                return probs
            alphas = self.alphas.to(probs.device, probs.dtype)
            target = source[:, :, self.mapper.to(probs.device)] * alphas + target * (1 - alphas)
        elif self.step < self.self_replace_end and probs.shape[2] <= SELF_REPLACE_MAX_POSITIONS:
            target = source
        else:
            return probs
        return torch.cat([probs[:-1], target[None]])

    def step_callback(self, latents: torch.Tensor) -> torch.Tensor:
        """After a scheduler step on (source, target) latents: the local blend, then the next step."""
        if self.local_blend is not None:
            latents = self.local_blend(latents, self.store)
        self.step += 1
        return latents


class P2PAttnProcessor:
    """diffusers' ``AttnProcessor`` computation, with the attention probabilities handed to the controller
    between the softmax and the product with the values (cross- and self-attention both)."""

    def __init__(self, controller: AttentionRefine, place: str) -> None:
        self.controller = controller
        self.place = place

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = (encoder_hidden_states if is_cross else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        value = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(attn.head_to_batch_dim(query), key, attention_mask)
        # head_to_batch_dim lays the heads out batch-major: row b * heads + h
        probs = self.controller(probs.view(batch_size, attn.heads, *probs.shape[1:]), is_cross, self.place)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1), value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(unet: UNet2DConditionModel, controller: AttentionRefine) -> Iterator[None]:
    """The UNet's attention layers run through :class:`P2PAttnProcessor` inside the block; its own processors
    are put back after it, so that a model shared with other pipelines is left as it was."""
    original = unet.attn_processors
    processors = {}
    for name, processor in original.items():
        place = place_in_unet(name)
        processors[name] = P2PAttnProcessor(controller, place) if place else processor
    unet.set_attn_processor(processors)
    try:
        yield
    finally:
        unet.set_attn_processor(original)
