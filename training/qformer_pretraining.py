"""Stage 1 of BLIP-Diffusion: BLIP-2's representation learning of the Q-Former, as LAVIS's ``Blip2Qformer``.

The Q-Former (:class:`~subjectpairs.training.qformer.SubjectQFormer`, whose weights stage 2 loads unchanged)
learns three objectives on image-caption pairs, summed:

- image-text contrast (ITC): the 16 query outputs of the image, projected and normalised, against the
  caption's ``[CLS]`` output, projected and normalised; an image-caption similarity is the largest over the
  queries; in-batch negatives over every rank, a learned temperature, label smoothing 0.1;
- image-text matching (ITM): a two-way classifier on the query outputs (averaged) of a joint pass in which
  queries and caption see each other, on the positive pairs and on hard negatives drawn from the
  contrastive similarities;
- image-grounded caption generation (ITG): the caption, ``[DEC]`` first, decoded causally while seeing
  every query output, through BERT's LM head tied to the word embeddings, label smoothing 0.1.

LAVIS runs the queries alone over the image (the ITC image pass, keeping each layer's keys and values) and
later decodes the caption against those cached keys and values. transformers' Q-Former layers keep no
cache, so here one pass runs over the queries and the caption together with LAVIS's mask of that decoding:
the queries see each other and the image but no caption token, each caption token sees every query and the
caption up to itself. The queries' states in that pass are those of LAVIS's image pass, and the caption's
are those of its cached decoding, dropout draws and gradient paths included; its query outputs serve ITC.
The stage-1-only weights (projections, matching head, temperature, LM head) live in
:class:`QFormerPretrainingHeads`, outside the stage-2 Q-Former; the projection layer of stage 2 is not
used here and stays frozen. The image encoder is frozen; its last LayerNorm (LAVIS's ``ln_vision``,
``visual_encoder.post_layernorm`` here) is trained, as LAVIS trains ``ln_vision``.

Under data parallelism the negatives come from every rank (:class:`RankGather`); the hard negatives are
drawn from a CPU generator that the caller may seed. Similarities and losses are computed in float32, also
under bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import distributed, nn
from transformers.models.bert.modeling_bert import BertPredictionHeadTransform

from subjectpairs.errors import InputError

from .model_folders import (
    DECODER_BOS_TOKEN,
    load_component,
    load_qformer_tokenizer,
    qformer_subfolder,
    save_qformer_folder,
)
from .qformer import SubjectQFormer
from .trainable_weights import TrainableWeights

# LAVIS's similarity for a pair itself when drawing its hard negatives: (almost) never drawn, yet a batch of
# one pair still draws (itself) instead of failing on all-zero weights.
OWN_PAIR_SIMILARITY = -10000.0
# Beside the Q-Former's weights in a stage-1 folder: the heads that only stage 1 uses. Stage 2 and diffusers
# read the folder's model.safetensors only and leave this file alone.
PRETRAINING_HEADS_FILE = "pretraining_heads.safetensors"


@dataclass(frozen=True)
class QFormerPretrainingConfig:
    """LAVIS's stage-1 settings (``Blip2Qformer``'s defaults; ``max_txt_len`` 32 and ``embed_dim`` 256 are
    not overridden by its configs)."""

    embed_dim: int = 256  # width of the contrastive features
    max_txt_len: int = 32  # caption tokens, [CLS] and [SEP] included, padded to this length
    label_smoothing: float = 0.1  # of the contrastive and the captioning losses (not of matching)
    initial_temperature: float = 0.07
    # Blip2Qformer does not clamp its temperature (BLIP and ALBEF clamp theirs to (0.001, 0.5) before each
    # step); a range here clamps it in place at the start of each forward, as they do.
    temperature_range: tuple[float, float] | None = None
    itc_weight: float = 1.0
    itm_weight: float = 1.0
    lm_weight: float = 1.0


@dataclass(frozen=True)
class RankGather:
    """This rank's place among the data-parallel ranks, for in-batch negatives over the whole batch.

    ``concat`` returns every rank's copy of a tensor concatenated along dim 0 in rank order, as LAVIS's
    ``concat_all_gather``; it is called under ``torch.no_grad``. LAVIS gathers the image embeddings for the
    matching loss with gradient (``all_gather_with_grad``) only for ``ln_vision``, the one trained weight
    between the frozen encoder and them: here the frozen encoder's tokens are gathered and the drawn
    negatives go through ``ln_vision`` after the gather, which under DDP's gradient averaging gives the
    same gradient without a collective in the backward pass. Every rank must hold the same number of pairs
    (targets are offset by ``rank`` times the local batch)."""

    rank: int
    concat: Callable[[torch.Tensor], torch.Tensor]


def _concat_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(distributed.get_world_size())]
    distributed.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def process_group_gather() -> RankGather:
    """The gather over torch.distributed's default process group (initialised, as under Ray Train)."""
    return RankGather(rank=distributed.get_rank(), concat=_concat_over_ranks)


def tokenize_captions(tokenizer, captions: Sequence[str],
                      max_txt_len: int = QFormerPretrainingConfig.max_txt_len) -> tuple[torch.Tensor, ...]:
    """Input ids and attention mask as LAVIS tokenizes captions: padded to ``max_txt_len`` (so that ranks can
    gather them) and truncated on the right."""
    tokens = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_txt_len,
                       return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


class CaptionHead(nn.Module):
    """BERT's LM prediction head (LAVIS's ``Qformer.cls.predictions``): transform, then the word embeddings
    as output weights (tied, as ``BertLMHeadModel`` from bert-base-uncased ties them) plus a bias."""

    def __init__(self, qformer_config) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(qformer_config)
        self.bias = nn.Parameter(torch.zeros(qformer_config.vocab_size))
        # BERT's initialisation; LAVIS starts this head from bert-base-uncased's trained one
        nn.init.normal_(self.transform.dense.weight, std=qformer_config.initializer_range)
        nn.init.zeros_(self.transform.dense.bias)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), word_embeddings, self.bias)


class QFormerPretrainingHeads(nn.Module):
    """The weights that only stage 1 trains and uses: LAVIS's ``vision_proj``, ``text_proj``, ``itm_head``
    (PyTorch's default initialisation, as there), ``temp`` and the LM head."""

    def __init__(self, qformer_config, embed_dim: int, initial_temperature: float) -> None:
        super().__init__()
        width = qformer_config.hidden_size
        self.vision_proj = nn.Linear(width, embed_dim)
        self.text_proj = nn.Linear(width, embed_dim)
        self.itm_head = nn.Linear(width, 2)
        self.temp = nn.Parameter(torch.tensor(float(initial_temperature)))
        self.lm_head = CaptionHead(qformer_config)


class QFormerPretraining(TrainableWeights):
    """The stage-1 model: ``qformer`` (the Q-Former that stage 2 loads) and ``heads``.

    ``tokenizer`` is the Q-Former's BERT tokenizer with ``[DEC]`` added (its beginning-of-sequence token in
    LAVIS). :meth:`save_pretrained` writes a Q-Former folder in the released layout, the tokenizer and the
    heads (``PRETRAINING_HEADS_FILE``) beside it: ``train --qformer`` takes it, and so does
    :meth:`from_pretrained`, which continues stage 1 from it."""

    def __init__(self, qformer: SubjectQFormer, tokenizer,
                 config: QFormerPretrainingConfig = QFormerPretrainingConfig(),
                 heads: QFormerPretrainingHeads | None = None) -> None:
        super().__init__()
        vocab_size = qformer.config.qformer_config.vocab_size
        decoder_bos_id = tokenizer.convert_tokens_to_ids(DECODER_BOS_TOKEN)
        if decoder_bos_id in (None, tokenizer.unk_token_id) or decoder_bos_id >= vocab_size:
            raise ValueError(f"the Q-Former tokenizer has no {DECODER_BOS_TOKEN} token within the Q-Former's "
                             f"{vocab_size} embeddings (add it: tokenizer.add_special_tokens"
                             f"({{'bos_token': '{DECODER_BOS_TOKEN}'}}))")
        self.qformer = qformer
        self.heads = heads or QFormerPretrainingHeads(qformer.config.qformer_config, config.embed_dim,
                                                      config.initial_temperature)
        self.config = replace(config, embed_dim=self.heads.vision_proj.out_features)
        self.tokenizer = tokenizer
        self.decoder_bos_id = decoder_bos_id
        self.pad_id = tokenizer.pad_token_id
        self.num_queries = qformer.query_tokens.shape[1]
        self.freeze()

    @classmethod
    def from_pretrained(cls, source: str, qformer_tokenizer: str | None = None,
                        config: QFormerPretrainingConfig = QFormerPretrainingConfig()) -> "QFormerPretraining":
        """A Q-Former folder (or a BLIP-Diffusion folder, whose ``qformer/`` is used), with the stage-1 heads
        saved beside it, or new ones (from torch's global random stream) where it has none. The tokenizer is
        found as :func:`~.model_folders.load_qformer_tokenizer` says."""
        subfolder = qformer_subfolder(source)
        qformer = load_component(SubjectQFormer, source, subfolder)
        tokenizer = load_qformer_tokenizer(source, qformer_tokenizer)
        heads_file = Path(source, subfolder, PRETRAINING_HEADS_FILE)
        heads = None
        if heads_file.is_file():
            try:
                weights = load_file(heads_file)
                heads = QFormerPretrainingHeads(qformer.config.qformer_config, weights["vision_proj.weight"].shape[0],
                                                config.initial_temperature)
                heads.load_state_dict(weights)
            except Exception as exc:  # safetensors raises its own error types for a damaged file
                raise InputError(f"{heads_file}: not stage-1 heads that fit the Q-Former "
                                 f"({str(exc).splitlines()[0]})") from exc
        try:
            return cls(qformer, tokenizer, config, heads)
        except ValueError as exc:  # a tokenizer that does not fit the Q-Former's embeddings
            raise InputError(f"{source}: {exc}") from exc

    def save_pretrained(self, folder: str | Path) -> Path:
        folder = save_qformer_folder(self.qformer, self.tokenizer, Path(folder))
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.heads.state_dict().items()},
                  folder / PRETRAINING_HEADS_FILE)
        return folder

    def freeze(self) -> None:
        """The image encoder is frozen (LAVIS ``freeze_vit``) but for its last LayerNorm, LAVIS's trained
        ``ln_vision``; stage 2's projection layer takes no part in stage 1."""
        vision = self.qformer.visual_encoder
        for part in (vision.embeddings, vision.pre_layernorm, vision.encoder, self.qformer.proj_layer):
            part.requires_grad_(False)
        vision.eval()

    def train(self, mode: bool = True) -> "QFormerPretraining":
        super().train(mode)
        self.qformer.visual_encoder.eval()  # the frozen encoder always runs as at inference
        return self

    # -- the passes ------------------------------------------------------------------------------------
    @torch.no_grad()
    def frozen_image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's tokens, before ``ln_vision``."""
        return self.qformer.visual_encoder.tokens(pixel_values)

    def ln_vision(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """LAVIS's ``ln_vision`` (trained): the image embeddings that the queries attend to."""
        return self.qformer.visual_encoder.post_layernorm(image_tokens)

    def text_pass(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The caption alone, bidirectional over its tokens (LAVIS's ITC text pass): (B, T, width)."""
        no_queries = self.qformer.query_tokens[:, :0]
        hidden = self.qformer.embeddings(input_ids, no_queries)
        keep = attention_mask.bool()[:, None, None, :]
        return self.qformer.encoder(hidden, attention_mask=keep).last_hidden_state

    def image_and_caption_pass(self, image_embeds: torch.Tensor, decoder_input_ids: torch.Tensor,
                               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The queries over the image and the caption decoded on them, in one pass (see the module's
        docstring): (query outputs (B, queries, width), caption outputs (B, T, width))."""
        queries = self.num_queries
        hidden = self.qformer.embeddings(decoder_input_ids, self.qformer.query_tokens)
        mask = query_prefix_causal_mask(attention_mask, queries)
        out = self.qformer.encoder(hidden, attention_mask=mask, encoder_hidden_states=image_embeds,
                                   query_length=queries).last_hidden_state
        return out[:, :queries], out[:, queries:]

    def matching_logits(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
        """Queries and caption seeing each other, the queries the image: ``itm_head`` on the query outputs,
        averaged over the queries: (B, 2), index 1 "matches"."""
        queries = self.num_queries
        hidden = self.qformer.embeddings(input_ids, self.qformer.query_tokens)
        keep = torch.cat([attention_mask.new_ones(attention_mask.shape[0], queries), attention_mask], dim=1)
        out = self.qformer.encoder(hidden, attention_mask=keep.bool()[:, None, None, :],
                                   encoder_hidden_states=image_embeds, query_length=queries).last_hidden_state
        return self.heads.itm_head(out[:, :queries]).mean(dim=1)

    def caption_logits(self, caption_hidden: torch.Tensor) -> torch.Tensor:
        return self.heads.lm_head(caption_hidden, self.qformer.embeddings.word_embeddings.weight)

    # -- the objectives ----------------------------------------------------------------------------------
    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                gather: RankGather | None = None,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """The three losses and their weighted sum (``loss``), as float32 scalars.

        ``input_ids`` and ``attention_mask`` as :func:`tokenize_captions` makes them. ``gather``: the other
        ranks' pairs as negatives (None: this batch only). ``generator``: a CPU generator for the hard
        negatives, drawn on the CPU so that a seeded generator draws the same on any device (None: torch's
        global CPU generator); the texts' negative images are drawn first, then the images' negative texts."""
        config = self.config
        if config.temperature_range is not None:
            with torch.no_grad():
                self.heads.temp.clamp_(*config.temperature_range)
        image_tokens = self.frozen_image_tokens(pixel_values)
        image_embeds = self.ln_vision(image_tokens)
        decoder_input_ids = input_ids.clone()
        decoder_input_ids[:, 0] = self.decoder_bos_id  # [DEC] replaces [CLS]
        query_hidden, caption_hidden = self.image_and_caption_pass(image_embeds, decoder_input_ids,
                                                                   attention_mask)
        text_hidden = self.text_pass(input_ids, attention_mask)

        # features and similarities in float32: the temperature scales them by about 14
        image_feats = F.normalize(self.heads.vision_proj(query_hidden).float(), dim=-1)
        text_feat = F.normalize(self.heads.text_proj(text_hidden[:, 0]).float(), dim=-1)
        loss_itc, sim_i2t, sim_t2i = self.contrastive_loss(image_feats, text_feat, gather)
        loss_itm = self.matching_loss(image_tokens, image_embeds, input_ids, attention_mask, sim_i2t, sim_t2i,
                                      gather, generator)
        loss_lm = self.captioning_loss(caption_hidden, decoder_input_ids)
        loss = config.itc_weight * loss_itc + config.itm_weight * loss_itm + config.lm_weight * loss_lm
        return {"loss": loss, "loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm}

    def contrastive_loss(self, image_feats: torch.Tensor, text_feat: torch.Tensor, gather: RankGather | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ITC from normalised query features (B, queries, D) and caption features (B, D): the loss and the
        image-to-text and text-to-image similarities over the gathered batch (B, B x ranks), temperature
        applied. The gathered side carries no gradient, as LAVIS's ``concat_all_gather`` (even on one
        rank)."""
        image_feats_all, text_feat_all = _all_ranks(image_feats, gather), _all_ranks(text_feat, gather)
        temp = self.heads.temp.float()
        with torch.autocast(image_feats.device.type, enabled=False):  # float32 under bf16 autocast too
            sim_i2t = torch.einsum("bqd,nd->bnq", image_feats, text_feat_all).amax(dim=-1) / temp
            sim_t2i = torch.einsum("bd,nqd->bnq", text_feat, image_feats_all).amax(dim=-1) / temp
        targets = _rank_offset(image_feats.shape[0], gather) + torch.arange(image_feats.shape[0],
                                                                             device=image_feats.device)
        smoothing = self.config.label_smoothing
        loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=smoothing)
                + F.cross_entropy(sim_t2i, targets, label_smoothing=smoothing)) / 2
        return loss, sim_i2t, sim_t2i

    def matching_loss(self, image_tokens: torch.Tensor, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, sim_i2t: torch.Tensor, sim_t2i: torch.Tensor,
                      gather: RankGather | None, generator: torch.Generator | None) -> torch.Tensor:
        """ITM over the B positive pairs, each caption with a hard negative image and each image with a hard
        negative caption, drawn from the (gathered) batch in proportion to their softmaxed similarity.
        ``image_tokens``: the frozen encoder's, ``image_embeds``: after ``ln_vision``."""
        batch = input_ids.shape[0]
        offset = _rank_offset(batch, gather)
        negative_images = hard_negatives(sim_t2i, offset, generator)
        negative_texts = hard_negatives(sim_i2t, offset, generator)
        image_tokens_all = _all_ranks(image_tokens, gather)
        input_ids_all, attention_mask_all = _all_ranks(input_ids, gather), _all_ranks(attention_mask, gather)
        logits = self.matching_logits(
            torch.cat([image_embeds, self.ln_vision(image_tokens_all[negative_images]), image_embeds]),
            torch.cat([input_ids, input_ids, input_ids_all[negative_texts]]),
            torch.cat([attention_mask, attention_mask, attention_mask_all[negative_texts]]))
        labels = torch.cat([torch.ones(batch, dtype=torch.long, device=logits.device),
                            torch.zeros(2 * batch, dtype=torch.long, device=logits.device)])
        return F.cross_entropy(logits.float(), labels)

    def captioning_loss(self, caption_hidden: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """ITG: each caption output predicts the next token; padding is no target."""
        logits = self.caption_logits(caption_hidden[:, :-1])
        labels = decoder_input_ids[:, 1:].masked_fill(decoder_input_ids[:, 1:] == self.pad_id, -100)
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                               label_smoothing=self.config.label_smoothing)


def query_prefix_causal_mask(attention_mask: torch.Tensor, queries: int) -> torch.Tensor:
    """Who sees whom in the image-and-caption pass, (B, 1, queries + T, queries + T), True where allowed:
    the queries see the queries; a caption token sees every query and the caption's non-padding tokens up
    to itself (LAVIS's ``get_extended_attention_mask`` with the query prefix)."""
    batch, length = attention_mask.shape
    device = attention_mask.device
    allowed = torch.zeros(batch, queries + length, queries + length, dtype=torch.bool, device=device)
    allowed[:, :, :queries] = True
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed[:, queries:, queries:] = causal & attention_mask.bool()[:, None, :]
    return allowed[:, None]


@torch.no_grad()
def hard_negatives(similarity: torch.Tensor, offset: int, generator: torch.Generator | None) -> torch.Tensor:
    """One index into the gathered batch per row of ``similarity`` (B, B x ranks), drawn with probability
    softmax(similarity), the row's own pair (column ``offset`` + row) excluded; drawn on the CPU."""
    weights = similarity.detach().float().cpu().clone()
    rows = torch.arange(weights.shape[0])
    weights[rows, offset + rows] = OWN_PAIR_SIMILARITY
    drawn = torch.multinomial(weights.softmax(dim=1), 1, generator=generator).squeeze(1)
    return drawn.to(similarity.device)


def _all_ranks(tensor: torch.Tensor, gather: RankGather | None) -> torch.Tensor:
    """Every rank's ``tensor``, without gradient (on one rank too, as LAVIS, which always gathers)."""
    with torch.no_grad():
        return tensor.detach() if gather is None else gather.concat(tensor.detach())


def _rank_offset(batch: int, gather: RankGather | None) -> int:
    return 0 if gather is None else gather.rank * batch
