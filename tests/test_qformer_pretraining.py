"""Stage 1 (BLIP-2's Q-Former pre-training) on the tiny model: each loss against LAVIS's ``Blip2Qformer``
computation written out here (its separate image pass, its decoding on the cached query keys and values,
one pair at a time without padding), the attention masks, over-fitting, the weights that stage 2 loads, the
frozen image encoder, and in-batch negatives over several ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from subjectpairs.training.model_folders import load_component
from subjectpairs.training.presets import model_configs
from subjectpairs.training.qformer import NUM_QUERY_TOKENS, SubjectQFormer
from subjectpairs.training.qformer_pretraining import (
    QFormerPretraining,
    QFormerPretrainingConfig,
    RankGather,
    hard_negatives,
    process_group_gather,
    tokenize_captions,
)
from subjectpairs.training.tiny_tokenizers import tiny_bert_tokenizer

CAPTIONS = ["a dog on the grass", "a red car in the street", "two cups of coffee on a table",
            "a bird in a tree"]
TEXT_TOKENS = 16  # the tiny captions' length; LAVIS pads to 32
SMOOTHING = 0.1
SEED = 7


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tokenizer = tiny_bert_tokenizer(tmp_path_factory.mktemp("bert"))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    return tokenizer


def build(tokenizer, config: QFormerPretrainingConfig = QFormerPretrainingConfig()) -> QFormerPretraining:
    torch.manual_seed(0)
    qformer = SubjectQFormer(model_configs("tiny", 64, len(tokenizer))["qformer"])
    return QFormerPretraining(qformer, tokenizer, config)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """Weights a few steps into over-fitting the pairs: similarities that differ from pair to pair, so that
    the losses and their gradients are sensitive to what is compared (at initialisation they are not)."""
    model = build(tokenizer).eval()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    draws = torch.Generator().manual_seed(SEED)
    for _ in range(20):
        optimizer.zero_grad()
        model(*pairs(tokenizer), generator=draws)["loss"].backward()
        optimizer.step()
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def build_trained(tokenizer, state) -> QFormerPretraining:
    model = build(tokenizer).eval()
    model.load_state_dict(state)
    return model


def pairs(tokenizer):
    generator = torch.Generator().manual_seed(1)
    # a colour per image under noise: images that a random image encoder tells apart
    colours = torch.randn(4, 3, 1, 1, generator=generator)
    pixels = colours + 0.3 * torch.randn(4, 3, 32, 32, generator=generator)
    input_ids, attention_mask = tokenize_captions(tokenizer, CAPTIONS, TEXT_TOKENS)
    return pixels, input_ids, attention_mask


# -- LAVIS's computation, written out -----------------------------------------------------------------------
def smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: 0.9 of the target's negative log-probability plus 0.1 of the mean over all classes."""
    log_probs = logits.log_softmax(dim=-1)
    picked = log_probs[torch.arange(len(targets)), targets]
    return -((1 - SMOOTHING) * picked + SMOOTHING * log_probs.mean(dim=-1))


def query_only_pass(model, image_embeds):
    """LAVIS's ITC image pass: the queries alone, over the image."""
    qformer = model.qformer
    queries = qformer.embeddings.LayerNorm(qformer.query_tokens.expand(image_embeds.shape[0], -1, -1))
    return qformer.encoder(queries, encoder_hidden_states=image_embeds,
                           query_length=NUM_QUERY_TOKENS).last_hidden_state


def caption_alone(model, caption):
    """LAVIS's ITC text pass of one unpadded caption (1, L)."""
    qformer = model.qformer
    return qformer.encoder(qformer.embeddings(caption, qformer.query_tokens[:, :0])).last_hidden_state


def matching_logits(model, image_embeds, caption):
    """LAVIS's ITM pass of one pair, the caption unpadded: queries and caption see each other."""
    qformer = model.qformer
    hidden = qformer.embeddings(caption, qformer.query_tokens)
    out = qformer.encoder(hidden, encoder_hidden_states=image_embeds,
                          query_length=NUM_QUERY_TOKENS).last_hidden_state
    return model.heads.itm_head(out[:, :NUM_QUERY_TOKENS]).mean(dim=1)[0]


def draw_negatives(similarity, generator):
    weights = similarity.clone()
    weights.fill_diagonal_(-10000.0)
    return torch.multinomial(weights.softmax(dim=1), 1, generator=generator)[:, 0]


def lavis_caption_logits(model, image_embeds, decoder_ids):
    """LAVIS's ITG pass of one unpadded caption (1, L): in each layer the caption attends to the keys and
    values that the layer computed for the queries in the image pass (``past_key_values``) and causally to
    itself; then BERT's LM head with the word embeddings as output weights."""
    qformer = model.qformer
    query_states = []
    hooks = [layer.register_forward_pre_hook(lambda module, args: query_states.append(args[0]))
             for layer in qformer.encoder.layer]
    try:
        query_only_pass(model, image_embeds)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = qformer.embeddings(decoder_ids, qformer.query_tokens[:, :0])
    length = decoder_ids.shape[1]
    allowed = torch.cat([torch.ones(length, NUM_QUERY_TOKENS, dtype=torch.bool),
                         torch.ones(length, length, dtype=torch.bool).tril()], dim=1)
    for layer, queries in zip(qformer.encoder.layer, query_states):
        attention = layer.attention.attention

        def heads(states):
            return states.view(1, states.shape[1], attention.num_attention_heads, -1).transpose(1, 2)

        context = torch.cat([queries, hidden], dim=1)
        keys = heads(attention.key(context)).transpose(-1, -2)
        scores = heads(attention.query(hidden)) @ keys * attention.scaling
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        attended = (weights @ heads(attention.value(context))).transpose(1, 2).reshape(1, length, -1)
        attended = layer.attention.output(attended, hidden)
        hidden = layer.output(layer.intermediate(attended), attended)
    head = model.heads.lm_head
    return F.linear(head.transform(hidden), qformer.embeddings.word_embeddings.weight, head.bias)


def test_each_loss_is_lavis_computation(tokenizer, trained):
    model = build_trained(tokenizer, trained)  # eval mode: no dropout, the passes below see the same numbers
    pixels, input_ids, attention_mask = pairs(tokenizer)
    out = model(pixels, input_ids, attention_mask, generator=torch.Generator().manual_seed(SEED))
    bos = tokenizer.convert_tokens_to_ids("[DEC]")
    with torch.no_grad():
        image_embeds = model.qformer.visual_encoder(pixels)  # ln_vision(ViT(image)), as stage 2 has it
        captions = [input_ids[row, : int(attention_mask[row].sum())][None] for row in range(len(CAPTIONS))]
        targets = torch.arange(len(CAPTIONS))

        image_feats = F.normalize(model.heads.vision_proj(query_only_pass(model, image_embeds)), dim=-1)
        text_cls = torch.cat([caption_alone(model, caption)[:, 0] for caption in captions])
        text_feat = F.normalize(model.heads.text_proj(text_cls), dim=-1)
        sim_i2t = torch.einsum("iqd,td->itq", image_feats, text_feat).amax(dim=-1) / model.heads.temp
        sim_t2i = sim_i2t.T  # on one rank, a caption's similarity to an image is the image's to the caption
        itc = (smoothed_cross_entropy(sim_i2t, targets).mean()
               + smoothed_cross_entropy(sim_t2i, targets).mean()) / 2

        draws = torch.Generator().manual_seed(SEED)
        negative_images, negative_texts = draw_negatives(sim_t2i, draws), draw_negatives(sim_i2t, draws)
        matches = ([(row, row, 1) for row in targets.tolist()]
                   + [(int(negative_images[row]), row, 0) for row in targets.tolist()]
                   + [(row, int(negative_texts[row]), 0) for row in targets.tolist()])
        logits = torch.stack([matching_logits(model, image_embeds[image:image + 1], captions[text])
                              for image, text, _ in matches])
        labels = torch.tensor([label for *_, label in matches])
        itm = -logits.log_softmax(dim=-1)[torch.arange(len(matches)), labels].mean()

        token_losses = []
        for row, caption in enumerate(captions):
            decoder_ids = caption.clone()
            decoder_ids[0, 0] = bos
            logits = lavis_caption_logits(model, image_embeds[row:row + 1], decoder_ids)[0, :-1]
            token_losses.append(smoothed_cross_entropy(logits, decoder_ids[0, 1:]))
        lm = torch.cat(token_losses).mean()  # over every token of every caption, [SEP] included, no padding

    for name, expected in (("loss_itc", itc), ("loss_itm", itm), ("loss_lm", lm), ("loss", itc + itm + lm)):
        torch.testing.assert_close(out[name], expected, rtol=0, atol=1e-5, msg=name)


def test_masks_of_the_passes(tokenizer):
    model = build(tokenizer).eval()
    pixels, input_ids, attention_mask = pairs(tokenizer)
    changed = input_ids.clone()
    changed[:, 3] = tokenizer.convert_tokens_to_ids("cup")  # a word inside every caption
    assert not torch.equal(changed, input_ids) and bool(attention_mask[:, 4].all())
    with torch.no_grad():
        image_embeds = model.qformer.visual_encoder(pixels)
        queries, caption = model.image_and_caption_pass(image_embeds, input_ids, attention_mask)
        queries_changed, caption_changed = model.image_and_caption_pass(image_embeds, changed, attention_mask)
        other_images = image_embeds.roll(1, dims=0)
        _, caption_other_image = model.image_and_caption_pass(other_images, input_ids, attention_mask)
        logits, logits_changed = model.caption_logits(caption), model.caption_logits(caption_changed)
        logits_other_image = model.caption_logits(caption_other_image)
        text_cls, text_cls_changed = (model.text_pass(ids, attention_mask)[:, 0]
                                      for ids in (input_ids, changed))
        matching, matching_changed = (model.matching_logits(image_embeds, ids, attention_mask)
                                      for ids in (input_ids, changed))

    # ITC's image side: the queries see no caption token
    assert torch.equal(queries_changed, queries)
    # ITG: a token changes its own and later positions only, the image every position
    assert torch.equal(logits_changed[:, :3], logits[:, :3])
    assert not torch.allclose(logits_changed[:, 3], logits[:, 3])
    assert not torch.allclose(logits_other_image[:, 0], logits[:, 0])
    # ITC's caption side and ITM see the whole caption; ITM's queries see it too
    assert not torch.allclose(text_cls_changed, text_cls)
    assert not torch.allclose(matching_changed, matching)


def test_overfitting_four_pairs_lowers_the_losses(tokenizer):
    model = build(tokenizer).train()
    pixels, input_ids, attention_mask = pairs(tokenizer)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    torch.manual_seed(SEED)  # dropout
    draws = torch.Generator().manual_seed(SEED)
    history = []
    for _ in range(60):
        out = model(pixels, input_ids, attention_mask, generator=draws)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        history.append({name: value.item() for name, value in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.7 * first["loss"], (first, last)
    assert all(last[name] < first[name] for name in ("loss_itc", "loss_itm", "loss_lm")), (first, last)


def test_stage_two_loads_the_shared_weights_and_not_the_heads(tokenizer, tmp_path):
    model = build(tokenizer).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(*pairs(tokenizer))["loss"].backward()
    optimizer.step()  # trained weights, not the initial ones, must come back
    folder = tmp_path / "qformer"
    model.qformer.save_pretrained(folder)

    loaded = load_component(SubjectQFormer, str(folder), "")  # refuses missing, unexpected or misfit weights
    saved = set(load_file(folder / "model.safetensors"))
    assert saved == set(model.qformer.state_dict()) == set(loaded.state_dict())
    stage_one_only = ("heads", "vision_proj", "text_proj", "itm_head", "temp", "lm_head", "cls")
    assert not any(name.startswith(stage_one_only) for name in saved)
    for name, tensor in model.qformer.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    heads = {f"heads.{name}" for name in model.heads.state_dict()}
    assert {"heads.vision_proj.weight", "heads.text_proj.weight", "heads.itm_head.weight", "heads.temp",
            "heads.lm_head.transform.dense.weight", "heads.lm_head.bias"} <= heads
    assert set(model.state_dict()) == {f"qformer.{name}" for name in model.qformer.state_dict()} | heads


def test_the_image_encoder_is_frozen_and_everything_else_learns(tokenizer):
    model = build(tokenizer).train()
    vision = model.qformer.visual_encoder
    assert not vision.training
    frozen = {name for name, _ in vision.named_parameters() if not name.startswith("post_layernorm.")}
    before = {name: p.detach().clone() for name, p in vision.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # even handed every weight
    for _ in range(2):
        optimizer.zero_grad()
        model(*pairs(tokenizer), generator=torch.Generator().manual_seed(SEED))["loss"].backward()
        optimizer.step()
    after = dict(vision.named_parameters())
    for name in frozen:
        assert not after[name].requires_grad and after[name].grad is None, name
        assert torch.equal(after[name], before[name]), name
    # LAVIS's ln_vision, the encoder's last LayerNorm here, is trained
    assert after["post_layernorm.weight"].grad is not None
    assert not torch.equal(after["post_layernorm.weight"], before["post_layernorm.weight"])
    # every other weight but stage 2's projection gets a gradient (DDP needs no unused parameters)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {name for name, p in model.named_parameters() if p.grad is not None}
    untouched = {f"qformer.visual_encoder.{name}" for name in frozen}
    assert trainable == {name for name, _ in model.named_parameters()
                         if not name.startswith("qformer.proj_layer.") and name not in untouched}


def test_temperature_is_clamped_only_when_asked(tokenizer):
    batch = pairs(tokenizer)
    lavis = build(tokenizer)
    clamped = build(tokenizer, QFormerPretrainingConfig(temperature_range=(0.001, 0.5)))
    for model in (lavis, clamped):
        with torch.no_grad():
            model.heads.temp.fill_(0.9)
        model.eval()(*batch, generator=torch.Generator().manual_seed(SEED))
    assert lavis.heads.temp.item() == pytest.approx(0.9) and clamped.heads.temp.item() == pytest.approx(0.5)


def test_bf16_autocast_matches_float32(tokenizer, trained):
    model = build_trained(tokenizer, trained)
    batch = pairs(tokenizer)
    full = model(*batch, generator=torch.Generator().manual_seed(SEED))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(*batch, generator=torch.Generator().manual_seed(SEED))
    for name in ("loss_itc", "loss_itm", "loss_lm"):
        assert half[name].dtype == torch.float32
        assert abs(half[name].item() - full[name].item()) < 0.01, name


def test_a_tokenizer_without_dec_is_refused(tmp_path):
    plain = tiny_bert_tokenizer(tmp_path / "bert")
    qformer = SubjectQFormer(model_configs("tiny", 64, len(plain) + 1)["qformer"])
    with pytest.raises(ValueError, match=r"\[DEC\]"):
        QFormerPretraining(qformer, plain)


# -- several ranks ---------------------------------------------------------------------------------------
class RecordedRanks:
    """Data-parallel ranks simulated in one process. Each rank's forward first runs alone, recording what it
    hands to the gather (computed before anything gathered is used); then a rank's gather returns, call by
    call, every rank's recorded tensor in rank order with its own in its place."""

    def __init__(self, model, batches) -> None:
        self.recorded = []
        for batch in batches:
            self.recorded.append([])
            model(*batch, gather=RankGather(0, self._record))

    def _record(self, tensor):
        self.recorded[-1].append(tensor.detach())  # as all_gather hands back other ranks' tensors
        return tensor

    def gather(self, rank: int) -> RankGather:
        calls = iter(range(len(self.recorded[rank])))

        def concat(tensor):
            call = next(calls)
            return torch.cat([tensor if other == rank else tensors[call]
                              for other, tensors in enumerate(self.recorded)])

        return RankGather(rank, concat)


def test_two_ranks_contrast_against_the_whole_batch(tokenizer, trained):
    """ITC over two ranks of two pairs each (loss and gradient averaged, as DDP averages them) is that of
    one process with all four pairs: targets offset by the rank, negatives from both ranks, no gradient
    through what was gathered (LAVIS's concat_all_gather)."""
    model = build_trained(tokenizer, trained)
    batch = pairs(tokenizer)
    halves = [tuple(part[2 * rank: 2 * rank + 2] for part in batch) for rank in range(2)]
    ranks = RecordedRanks(model, halves)
    losses, grads = [], []
    for rank, half in enumerate(halves):
        model.zero_grad()
        out = model(*half, gather=ranks.gather(rank), generator=torch.Generator().manual_seed(rank))
        out["loss_itc"].backward()
        losses.append(out["loss_itc"].detach())
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    model.zero_grad()
    whole = model(*batch)
    whole["loss_itc"].backward()
    torch.testing.assert_close(sum(losses) / 2, whole["loss_itc"].detach(), rtol=0, atol=1e-6)
    expected = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(grads[0]) == set(grads[1]) == set(expected)
    for name, grad in expected.items():
        averaged = (grads[0][name] + grads[1][name]) / 2
        torch.testing.assert_close(averaged, grad, rtol=1e-4, atol=1e-6, msg=name)


def test_hard_negatives_come_from_every_rank_but_never_the_pair_itself():
    generator = torch.Generator().manual_seed(SEED)
    # rank 1 of two ranks of two pairs: its own pairs are columns 2 and 3 of the gathered batch
    favoured = torch.zeros(2, 4)
    favoured[:, 2:] = 50.0
    assert hard_negatives(favoured, 2, generator).tolist() == [3, 2]
    draws = torch.stack([hard_negatives(torch.zeros(2, 4), 2, generator) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {0, 1, 3} and set(draws[:, 1].tolist()) == {0, 1, 2}


def test_the_process_group_gather_on_one_rank_is_the_single_process(tokenizer, trained, tmp_path):
    model = build_trained(tokenizer, trained)
    batch = pairs(tokenizer)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                                         world_size=1)
    try:
        grouped = model(*batch, gather=process_group_gather(), generator=torch.Generator().manual_seed(SEED))
    finally:
        torch.distributed.destroy_process_group()
    alone = model(*batch, generator=torch.Generator().manual_seed(SEED))
    for name, value in alone.items():
        assert torch.equal(grouped[name], value), name
