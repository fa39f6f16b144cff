"""Model folders: the exported layout is the released one and loads into diffusers' classes; loading finds
the Q-Former tokenizer as diffusers does and stops on a degenerate tokenizer or weights that do not fit."""

from __future__ import annotations

import json
import shutil

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from subjectpairs.errors import InputError
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.loss import training_prompt
from subjectpairs.training.qformer import NUM_QUERY_TOKENS
from subjectpairs.training.tiny_tokenizers import COMMON_WORDS, write_bert_wordpiece


@pytest.fixture(scope="module")
def tiny_model() -> BlipDiffusion:
    return BlipDiffusion.from_config("tiny", seed=0)


@pytest.fixture
def export(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "export")


@pytest.fixture
def offline(monkeypatch):
    """The hub unreachable at once (as on these machines, without waiting for the network to time out)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def drop_qformer_tokenizer(folder) -> None:
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / "qformer" / name).unlink()
    config = json.loads((folder / "qformer" / "config.json").read_text())
    del config["tokenizer"]
    (folder / "qformer" / "config.json").write_text(json.dumps(config))


def test_export_has_the_released_layout(tiny_model, export):
    from transformers import BertTokenizer, CLIPTokenizer

    assert json.loads((export / "model_index.json").read_text()) | {"_diffusers_version": None} == {
        "_class_name": "BlipDiffusionPipeline", "_diffusers_version": None,
        "qformer": ["blip_diffusion", "Blip2QFormerModel"], "text_encoder": ["blip_diffusion", "ContextCLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "PNDMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "image_processor": ["blip_diffusion", "BlipImageProcessor"], "ctx_begin_pos": 2,
        "mean": list(tiny_model.image_mean), "std": list(tiny_model.image_std)}
    assert sorted(p.name for p in (export / "tokenizer").iterdir()) == [
        "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert {"vocab.txt", "special_tokens_map.json", "tokenizer_config.json"} <= {
        p.name for p in (export / "qformer").iterdir()}
    assert not list(export.glob("*/tokenizer.json"))  # the vocabulary files alone make the tokenizers
    assert json.loads((export / "qformer" / "config.json").read_text())["tokenizer"] == "qformer"
    text = "a photo of a dog, the cup is Zebra-like"
    assert CLIPTokenizer.from_pretrained(export / "tokenizer")(text).input_ids == tiny_model.tokenizer(text).input_ids
    bert = BertTokenizer.from_pretrained(export / "qformer")
    assert bert(text).input_ids == tiny_model.qformer_tokenizer(text).input_ids
    assert bert.bos_token == "[DEC]"
    assert list(load_file(export / "text_encoder" / "model.safetensors")) and all(
        name.startswith("text_model.") for name in load_file(export / "text_encoder" / "model.safetensors"))


def test_exported_text_encoder_loads_into_diffusers_and_computes_the_same(tiny_model, export):
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel

    theirs, info = ContextCLIPTextModel.from_pretrained(export, subfolder="text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokenizer = tiny_model.tokenizer
    ids = tokenizer([training_prompt("a dog on the grass", "dog")], padding="max_length", max_length=61,
                    return_tensors="pt").input_ids
    ctx = torch.randn(1, NUM_QUERY_TOKENS, tiny_model.text_encoder.config.hidden_size)
    at = int((ids[0] == tokenizer.eos_token_id).int().argmax())
    with torch.no_grad():
        ours = tiny_model.text_encoder(tiny_model.text_encoder.token_embeddings(ids, ctx, [at]))
        # diffusers' forward hands its causal mask to CLIPEncoder as ``causal_attention_mask``, which
        # transformers 5 ignores; its own modules are run here with that mask as the attention mask
        released_model = theirs.eval().text_model
        hidden = released_model.embeddings(ctx_embeddings=ctx, ctx_begin_pos=[at], input_ids=ids)
        causal = released_model._build_causal_attention_mask(1, hidden.shape[1], hidden.dtype)
        released = released_model.final_layer_norm(
            released_model.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state)
    assert torch.allclose(ours, released, atol=1e-5)


def test_export_loads_back_whole_after_a_move_and_saves_again_alike(tiny_model, export, tmp_path):
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(export, moved)
    shutil.rmtree(export)
    loaded = BlipDiffusion.from_pretrained(moved)
    # a loaded model saves its text encoder under the same names as one built from a config
    again = loaded.save_pretrained(tmp_path / "again")
    assert set(load_file(again / "text_encoder" / "model.safetensors")) == set(
        load_file(moved / "text_encoder" / "model.safetensors"))
    before, after = tiny_model.state_dict(), loaded.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    text = "a dog and a cup"
    assert loaded.qformer_tokenizer(text).input_ids == tiny_model.qformer_tokenizer(text).input_ids
    assert loaded.tokenizer(text).input_ids == tiny_model.tokenizer(text).input_ids


def test_the_tokenizer_named_in_the_qformer_config_is_used_and_an_override_wins(export, tmp_path):
    named = tmp_path / "named-bert"
    write_bert_wordpiece(named, [*COMMON_WORDS, "zebra"])
    config = json.loads((export / "qformer" / "config.json").read_text())
    (export / "qformer" / "config.json").write_text(json.dumps({**config, "tokenizer": str(named)}))
    assert BlipDiffusion.from_pretrained(export).qformer_tokenizer.tokenize("zebra") == ["zebra"]

    override = tmp_path / "override-bert"
    write_bert_wordpiece(override, [*COMMON_WORDS, "giraffe"])
    tokenizer = BlipDiffusion.from_pretrained(export, qformer_tokenizer=str(override)).qformer_tokenizer
    assert tokenizer.tokenize("giraffe") == ["giraffe"] and tokenizer.tokenize("zebra") != ["zebra"]
    assert tokenizer.bos_token == "[DEC]"


def test_a_degenerate_qformer_tokenizer_is_an_error_naming_what_to_pass(export, tmp_path, offline):
    empty = tmp_path / "no-vocab"
    empty.mkdir()
    with pytest.raises(InputError, match=r"no-vocab \(qformer_tokenizer\).*cannot tokenize 'dog'.*"
                                         r"--set qformer_tokenizer=FOLDER"):
        BlipDiffusion.from_pretrained(export, qformer_tokenizer=str(empty))

    config = json.loads((export / "qformer" / "config.json").read_text())
    (export / "qformer" / "config.json").write_text(json.dumps({**config, "tokenizer": str(empty)}))
    with pytest.raises(InputError, match=r'"tokenizer" in .*qformer/config.json.*5 tokens.*qformer_tokenizer='):
        BlipDiffusion.from_pretrained(export)

    # nothing named, nothing saved: diffusers' default, which offline is the 5-token tokenizer
    drop_qformer_tokenizer(export)
    with pytest.raises(InputError, match=r"bert-base-uncased \(none named or saved.*cannot tokenize"):
        BlipDiffusion.from_pretrained(export)


def test_a_missing_clip_vocabulary_is_an_error(export):
    for name in ("vocab.json", "merges.txt"):
        (export / "tokenizer" / name).unlink()
    with pytest.raises(InputError, match=r"tokenizer/ \(the CLIP tokenizer\).*cannot tokenize"):
        BlipDiffusion.from_pretrained(export)


@pytest.mark.parametrize("part, change, named", [
    ("text_encoder", "drop", "missing final_layer_norm.weight"),
    ("unet", "add", "unexpected extra.weight"),
    ("qformer", "resize", "mismatched query_tokens"),
])
def test_weights_that_do_not_fit_stop_the_load_naming_them(export, part, change, named):
    file = next((export / part).glob("*.safetensors"))
    weights = load_file(file)
    if change == "drop":
        del weights["text_model.final_layer_norm.weight"]
    elif change == "add":
        weights["extra.weight"] = torch.zeros(2)
    else:
        weights["query_tokens"] = torch.zeros(1, 3, weights["query_tokens"].shape[-1])
    save_file(weights, file, metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"{part}: .*{named.split()[0]}.*{named.split()[1]}"):
        BlipDiffusion.from_pretrained(export)
