"""Stage 1's starting weights: a Q-Former built from CLIP and BERT (tiny ones, saved and loaded back through
``from_pretrained``) computes what they compute; LAVIS's checkpoint layout converts to the same passes as
LAVIS's own modules."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from subjectpairs.errors import InputError
from subjectpairs.training.config import PretrainQFormerConfig
from subjectpairs.training.qformer_init import qformer_from_clip_and_bert, qformer_from_lavis
from subjectpairs.training.qformer_pretraining import QFormerPretraining, tokenize_captions
from subjectpairs.training.qformer_pretraining_job import check_sources, starting_model
from subjectpairs.training.tiny_tokenizers import tiny_bert_tokenizer

CAPTIONS = ["a dog on the grass", "a red car"]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    """A whole CLIP model (text tower too), as ``openai/clip-vit-large-patch14`` is."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 99, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A BERT with its masked-LM head and tokenizer, as ``bert-base-uncased``; its token-type embeddings
    are zero so that its passes compare with the Q-Former's, which has none (as LAVIS's)."""
    folder = tmp_path_factory.mktemp("bert")
    tokenizer = tiny_bert_tokenizer(folder / "vocab")
    torch.manual_seed(1)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.zero_()
        model.cls.predictions.bias.normal_()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def from_clip_and_bert(clip_folder, bert_folder):
    torch.manual_seed(2)
    return qformer_from_clip_and_bert(str(clip_folder), str(bert_folder))


def pixels(size: int = 32, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(3))


def test_image_encoder_is_clips_vision_tower_without_its_last_layer(clip_folder, from_clip_and_bert):
    qformer, _, _ = from_clip_and_bert
    clip = CLIPVisionModel.from_pretrained(clip_folder).eval()
    images = pixels()
    with torch.no_grad():
        expected = clip(pixel_values=images, output_hidden_states=True).hidden_states[-2]
        tokens = qformer.visual_encoder.tokens(images)
    assert qformer.config.vision_config.num_hidden_layers == clip.config.num_hidden_layers - 1 == 2
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-4)
    # ln_vision is new: it normalises without scaling, and is not CLIP's post-LayerNorm
    ln_vision = qformer.visual_encoder.post_layernorm
    assert torch.equal(ln_vision.weight, torch.ones(32)) and torch.equal(ln_vision.bias, torch.zeros(32))


def test_text_pass_and_lm_head_are_berts(bert_folder, from_clip_and_bert):
    qformer, heads, tokenizer = from_clip_and_bert
    bert = BertForMaskedLM.from_pretrained(bert_folder).eval()
    model = QFormerPretraining(qformer, tokenizer, heads=heads).eval()
    ids, mask = tokenize_captions(tokenizer, CAPTIONS)
    with torch.no_grad():
        hidden = model.text_pass(ids, mask)
        expected = BertModel.from_pretrained(bert_folder).eval()(input_ids=ids, attention_mask=mask)
        logits = model.caption_logits(hidden)
        expected_logits = bert(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(hidden[keep], expected.last_hidden_state[keep], atol=1e-5, rtol=1e-4)
    vocab = bert.config.vocab_size
    assert logits.shape[-1] == vocab + 1 == len(tokenizer)  # [DEC] added
    torch.testing.assert_close(logits[..., :vocab][keep], expected_logits[keep], atol=1e-4, rtol=1e-4)


def test_queries_and_cross_attention_are_new_and_query_layers_copy_berts(bert_folder, from_clip_and_bert):
    qformer, heads, tokenizer = from_clip_and_bert
    bert = BertModel.from_pretrained(bert_folder).state_dict()
    config = qformer.config
    assert config.num_query_tokens == qformer.query_tokens.shape[1] == 16
    assert config.qformer_config.cross_attention_frequency == 1
    assert config.qformer_config.encoder_hidden_size == config.vision_config.hidden_size
    ours = qformer.state_dict()
    for layer in range(2):
        prefix = f"encoder.layer.{layer}."
        assert f"{prefix}crossattention.attention.key.weight" in ours
        for name in ("intermediate.dense.weight", "output.dense.weight", "output.LayerNorm.bias"):
            query_name = name.replace("intermediate", "intermediate_query").replace("output", "output_query")
            assert torch.equal(ours[prefix + query_name], bert[prefix + name])
    assert tokenizer.convert_tokens_to_ids("[DEC]") == len(tokenizer) - 1
    assert heads.vision_proj.out_features == 256
    # the queries are drawn at random (not BLIP-Diffusion's zeros), so they differ from one another
    assert qformer.query_tokens.std() > 0.005


def test_a_vision_only_clip_keeps_its_activation(tmp_path, bert_folder):
    """Not every CLIP uses OpenAI's QuickGELU (open_clip's LAION conversions use GELU)."""
    torch.manual_seed(6)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=32, patch_size=8, hidden_act="gelu"))
    clip.save_pretrained(tmp_path / "clip")
    qformer, _, _ = qformer_from_clip_and_bert(str(tmp_path / "clip"), str(bert_folder))
    assert qformer.config.vision_config.hidden_act == "gelu"
    with torch.no_grad():
        expected = clip.eval()(pixel_values=pixels(), output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(qformer.visual_encoder.tokens(pixels()), expected, atol=1e-5, rtol=1e-4)


def test_clip_and_bert_are_checked_with_the_flag_named(tmp_path, clip_folder, bert_folder):
    with pytest.raises(InputError, match="--clip"):
        qformer_from_clip_and_bert(str(bert_folder), str(bert_folder))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="--bert"):
        qformer_from_clip_and_bert(str(clip_folder), str(tmp_path))


def test_the_job_starts_from_clip_and_bert_seeded(tmp_path, clip_folder, bert_folder):
    config = PretrainQFormerConfig(shards=["unused"], out=str(tmp_path / "run"), clip=str(clip_folder),
                                   bert=str(bert_folder), seed=7)
    first, second = (starting_model(config, str(tmp_path)) for _ in range(2))
    assert torch.equal(first.qformer.query_tokens, second.qformer.query_tokens)
    assert torch.equal(first.heads.itm_head.weight, second.heads.itm_head.weight)
    other = starting_model(config.model_copy(update={"seed": 8}), str(tmp_path))
    assert not torch.equal(first.qformer.query_tokens, other.qformer.query_tokens)


# -- LAVIS ----------------------------------------------------------------------------------------------

class LavisResidualBlock(nn.Module):
    """LAVIS's ``clip_vit.ResidualAttentionBlock``: torch's MultiheadAttention, sequence first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(*(self.ln_1(x),) * 3, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LavisVisionTransformer(nn.Module):
    """LAVIS's ``clip_vit.VisionTransformer`` (no final LayerNorm)."""

    def __init__(self, width=128, layers=2, heads=2, patch=8, image=32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[LavisResidualBlock(width, heads) for _ in range(layers)])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        return self.transformer.resblocks(x.transpose(0, 1)).transpose(0, 1)


QFORMER_WIDTH, LAVIS_QUERIES = 64, 32


def lavis_state(vision: LavisVisionTransformer | None, vocab: int, layers: int = 2) -> dict[str, torch.Tensor]:
    """A ``Blip2Qformer`` state dict as LAVIS saves it (``cross_attention_freq`` 2), random."""
    generator = torch.Generator().manual_seed(4)
    width, vision_width = QFORMER_WIDTH, 128

    def rand(*shape):
        return torch.randn(*shape, generator=generator) * 0.05

    state = {"query_tokens": rand(1, LAVIS_QUERIES, width), "ln_vision.weight": 1 + rand(vision_width),
             "ln_vision.bias": rand(vision_width), "temp": torch.tensor(0.05)}
    if vision is not None:
        state.update({f"visual_encoder.{name}": tensor for name, tensor in vision.state_dict().items()})
    bert = "Qformer.bert."
    state.update({f"{bert}embeddings.word_embeddings.weight": rand(vocab, width),
                  f"{bert}embeddings.position_embeddings.weight": rand(64, width),
                  f"{bert}embeddings.LayerNorm.weight": 1 + rand(width),
                  f"{bert}embeddings.LayerNorm.bias": rand(width),
                  f"{bert}embeddings.position_ids": torch.arange(64)[None]})

    def linear(prefix, out_features, in_features):
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = rand(out_features, in_features), rand(out_features)

    def layer_norm(prefix):
        state[f"{prefix}.weight"], state[f"{prefix}.bias"] = 1 + rand(width), rand(width)

    for index in range(layers):
        layer = f"{bert}encoder.layer.{index}."
        blocks = {"attention": width} | ({"crossattention": vision_width} if index % 2 == 0 else {})
        for block, source_width in blocks.items():
            linear(f"{layer}{block}.self.query", width, width)
            linear(f"{layer}{block}.self.key", width, source_width)
            linear(f"{layer}{block}.self.value", width, source_width)
            linear(f"{layer}{block}.output.dense", width, width)
            layer_norm(f"{layer}{block}.output.LayerNorm")
        for suffix in ("", "_query"):
            linear(f"{layer}intermediate{suffix}.dense", 2 * width, width)
            linear(f"{layer}output{suffix}.dense", width, 2 * width)
            layer_norm(f"{layer}output{suffix}.LayerNorm")
    linear("Qformer.cls.predictions.transform.dense", width, width)
    layer_norm("Qformer.cls.predictions.transform.LayerNorm")
    state["Qformer.cls.predictions.bias"] = rand(vocab)
    state["Qformer.cls.predictions.decoder.weight"] = state[f"{bert}embeddings.word_embeddings.weight"]
    state["Qformer.cls.predictions.decoder.bias"] = state["Qformer.cls.predictions.bias"]
    linear("vision_proj", 24, width)
    linear("text_proj", 24, width)
    linear("itm_head", 2, width)
    return state


@pytest.fixture(scope="module")
def lavis_tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lavis-tokenizer")
    tiny_bert_tokenizer(folder).save_pretrained(folder)
    return folder


def vocab_with_dec(folder: Path) -> int:
    return len(tiny_bert_tokenizer(folder / "probe")) + 1


def test_lavis_checkpoint_converts_to_the_same_passes(tmp_path, lavis_tokenizer_folder):
    torch.manual_seed(5)
    vision = LavisVisionTransformer().eval()
    state = lavis_state(vision, vocab_with_dec(tmp_path))
    checkpoint = tmp_path / "blip2_pretrain_vitL.pth"
    torch.save({"model": state}, checkpoint)

    qformer, heads, tokenizer = qformer_from_lavis(checkpoint, tokenizer=str(lavis_tokenizer_folder))

    images = pixels()
    with torch.no_grad():
        expected = F.layer_norm(vision(images), (128,), state["ln_vision.weight"], state["ln_vision.bias"])
        converted = qformer.visual_encoder(images)
    torch.testing.assert_close(converted, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(qformer.query_tokens, state["query_tokens"][:, :16])
    config = qformer.config.qformer_config
    assert (config.cross_attention_frequency, config.num_hidden_layers, config.hidden_size) == (2, 2, QFORMER_WIDTH)
    ours = qformer.state_dict()
    assert "encoder.layer.1.crossattention.attention.key.weight" not in ours
    assert torch.equal(ours["encoder.layer.0.crossattention.attention.key.weight"],
                       state["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(ours["encoder.layer.1.output_query.dense.bias"],
                       state["Qformer.bert.encoder.layer.1.output_query.dense.bias"])
    assert torch.equal(heads.itm_head.weight, state["itm_head.weight"])
    assert torch.equal(heads.lm_head.bias, state["Qformer.cls.predictions.bias"])
    assert heads.temp.item() == pytest.approx(0.05) and heads.vision_proj.out_features == 24
    # and it trains: one stage-1 forward on the converted weights
    model = QFormerPretraining(qformer, tokenizer, heads=heads)
    ids, mask = tokenize_captions(tokenizer, CAPTIONS)
    losses = model(images, ids, mask)
    assert all(torch.isfinite(value) for value in losses.values())


def trained_only_checkpoint(folder: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A LAVIS checkpoint as its runner saves one: no frozen image encoder, the rest for the tiny CLIP's
    width."""
    state = lavis_state(None, vocab_with_dec(folder))
    state["ln_vision.weight"], state["ln_vision.bias"] = torch.ones(32), torch.zeros(32)
    for name in [n for n in state if ".crossattention.self.key." in n or ".crossattention.self.value." in n]:
        if name.endswith("weight"):
            state[name] = state[name][:, :32]
    checkpoint = folder / "trained-only.pth"
    torch.save({"model": state}, checkpoint)
    return checkpoint, state


def test_lavis_checkpoint_without_image_encoder_takes_it_from_clip(tmp_path, clip_folder, lavis_tokenizer_folder):
    checkpoint, _ = trained_only_checkpoint(tmp_path)
    with pytest.raises(InputError, match="--clip"):
        qformer_from_lavis(checkpoint, tokenizer=str(lavis_tokenizer_folder))
    qformer, _, _ = qformer_from_lavis(checkpoint, clip=str(clip_folder), tokenizer=str(lavis_tokenizer_folder))
    clip = CLIPVisionModel.from_pretrained(clip_folder).eval()
    with torch.no_grad():
        expected = clip(pixel_values=pixels(), output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(qformer.visual_encoder.tokens(pixels()), expected, atol=1e-5, rtol=1e-4)


def test_the_job_converts_a_lavis_init_with_its_clip(tmp_path, clip_folder, lavis_tokenizer_folder):
    checkpoint, state = trained_only_checkpoint(tmp_path)
    config = PretrainQFormerConfig(shards=["unused"], out=str(tmp_path / "run"), init=str(checkpoint),
                                   clip=str(clip_folder), qformer_tokenizer=str(lavis_tokenizer_folder),
                                   embed_dim=24)
    check_sources(config)
    model = starting_model(config, str(tmp_path))
    assert torch.equal(model.qformer.query_tokens, state["query_tokens"][:, :16])
    assert torch.equal(model.heads.text_proj.weight, state["text_proj.weight"])
    with pytest.raises(InputError, match="--clip"):
        check_sources(config.model_copy(update={"clip": str(tmp_path / "no-clip")}))
    # its heads are 24 wide: a run that says otherwise is refused, not silently changed
    with pytest.raises(InputError, match="embed_dim=24"):
        starting_model(config.model_copy(update={"embed_dim": 256}), str(tmp_path))


def test_bad_lavis_checkpoints_are_one_line_errors(tmp_path, lavis_tokenizer_folder):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(InputError, match="not a LAVIS checkpoint"):
        qformer_from_lavis(garbage, tokenizer=str(lavis_tokenizer_folder))
    other = tmp_path / "other.pth"
    torch.save({"model": {"weight": torch.zeros(2)}}, other)
    with pytest.raises(InputError, match="not a LAVIS BLIP-2 checkpoint"):
        qformer_from_lavis(other, tokenizer=str(lavis_tokenizer_folder))
    state = lavis_state(LavisVisionTransformer(), vocab_with_dec(tmp_path) + 5)
    wrong_vocab = tmp_path / "wrong-vocab.pth"
    torch.save({"model": state}, wrong_vocab)
    with pytest.raises(InputError, match="word embeddings"):
        qformer_from_lavis(wrong_vocab, tokenizer=str(lavis_tokenizer_folder))
    del state["Qformer.bert.encoder.layer.1.output.dense.weight"]
    words = "Qformer.bert.embeddings.word_embeddings.weight"
    state[words] = state[words][:-5]
    truncated = tmp_path / "truncated.pth"
    torch.save({"model": state}, truncated)
    with pytest.raises(InputError, match="output.dense.weight"):
        qformer_from_lavis(truncated, tokenizer=str(lavis_tokenizer_folder))


def test_config_pairs_clip_with_bert_or_a_lavis_init():
    base = {"shards": ["s"], "out": "o"}
    PretrainQFormerConfig(**base, clip="c", bert="b")
    PretrainQFormerConfig(**base, clip="c", init="blip2.pth")
    for bad in ({"clip": "c"}, {"bert": "b"}, {"clip": "c", "init": "folder"}, {"init": "x.pth", "bert": "b"}):
        with pytest.raises(ValueError):
            PretrainQFormerConfig(**base, **bad)
