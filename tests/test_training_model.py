"""The BLIP-Diffusion model: released weight layout, freezing, subject-embedding insertion, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from subjectpairs.training.model import NUM_QUERY_TOKENS, BlipDiffusion, training_prompt


@pytest.fixture(scope="module")
def tiny_model() -> BlipDiffusion:
    return BlipDiffusion.from_config("tiny", seed=0)


def test_released_qformer_and_text_encoder_weights_load_by_name(tiny_model, tmp_path):
    """Weights saved by the released implementation's modules (diffusers' BLIP-Diffusion Q-Former and
    context text encoder, whose names the hub checkpoint uses) load into ours with nothing missing."""
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_blip2 import Blip2QFormerModel
    from diffusers.pipelines.deprecated.blip_diffusion.modeling_ctx_clip import ContextCLIPTextModel as Released

    release = tmp_path / "release"
    tiny_model.save_pretrained(release)
    config = copy.deepcopy(tiny_model.qformer.config)
    config.tokenizer = str(release / "qformer")
    torch.manual_seed(1)
    qformer = Blip2QFormerModel(config)
    save_file({k: v.contiguous() for k, v in qformer.state_dict().items()}, release / "qformer" / "model.safetensors")
    text = Released(tiny_model.text_encoder.config)
    save_file({k: v.contiguous() for k, v in text.state_dict().items()}, release / "text_encoder" / "model.safetensors")

    loaded = BlipDiffusion.from_pretrained(release)
    ours = loaded.qformer.state_dict()
    for name, tensor in qformer.state_dict().items():
        if name != "embeddings.position_ids":
            assert torch.equal(ours[name], tensor), name
    assert set(ours) == set(qformer.state_dict()) - {"embeddings.position_ids"}
    theirs = {k.removeprefix("text_model."): v for k, v in text.state_dict().items()}
    for name, tensor in loaded.text_encoder.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


def test_save_and_load_keep_every_weight(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    for part in ("qformer", "text_encoder", "unet", "vae"):
        assert list((folder / part).glob("*.safetensors")), part
    loaded = BlipDiffusion.from_pretrained(folder)
    before, after = tiny_model.state_dict(), loaded.state_dict()
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.tokenizer("a dog").input_ids == tiny_model.tokenizer("a dog").input_ids


def test_frozen_parts_get_no_gradient_and_trainable_parts_do(tiny_model):
    torch.manual_seed(0)
    tiny_model.zero_grad(set_to_none=True)
    tiny_model.train()
    loss = tiny_model(torch.randn(2, 3, 32, 32), ["a dog on grass", "a cup"], ["Dog", "Cup"],
                      target=torch.rand(2, 3, 64, 64) * 2 - 1)
    loss.backward()
    assert not tiny_model.vae.training and not tiny_model.qformer.visual_encoder.training
    assert all(p.grad is None for p in tiny_model.vae.parameters())
    assert all(p.grad is None for p in tiny_model.qformer.visual_encoder.parameters())
    for part in (tiny_model.qformer.encoder, tiny_model.qformer.proj_layer, tiny_model.text_encoder, tiny_model.unet):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    names = set(tiny_model.trainable_state_dict())
    assert not any(n.startswith(("vae.", "qformer.visual_encoder.")) for n in names)
    assert any(n.startswith("qformer.query_tokens") for n in names)


def test_subject_embeddings_sit_just_before_end_of_text(tiny_model):
    tokenizer = tiny_model.tokenizer
    ids = tokenizer([training_prompt("a dog on the grass", "Dog")], padding="max_length", max_length=61,
                    return_tensors="pt").input_ids
    eot = int((ids[0] == tokenizer.eos_token_id).int().argmax())
    ctx = torch.randn(1, NUM_QUERY_TOKENS, tiny_model.text_encoder.config.hidden_size)
    embeds = tiny_model.text_encoder.token_embeddings(ids, ctx, tokenizer.eos_token_id)
    plain = tiny_model.text_encoder.token_embeddings(ids)
    assert embeds.shape[1] == 61 + NUM_QUERY_TOKENS == 77
    assert torch.equal(embeds[0, :eot], plain[0, :eot])
    assert torch.equal(embeds[0, eot:eot + NUM_QUERY_TOKENS], ctx[0])
    assert torch.equal(embeds[0, eot + NUM_QUERY_TOKENS], plain[0, eot])  # the end-of-text token follows


def test_dropped_rows_see_the_caption_alone(tiny_model):
    """With the subject dropped, a row's conditioning is the caption alone, whatever the subject."""
    ctx = torch.randn(2, NUM_QUERY_TOKENS, tiny_model.text_encoder.config.hidden_size)
    keep = torch.tensor([True, False])
    with torch.no_grad():
        mixed = tiny_model.text_conditioning(["a dog, the dog is"] * 2, ctx, keep, plain_texts=["a dog"] * 2)
        alone = tiny_model.text_conditioning(["a dog"], None, torch.tensor([False]))
        other = tiny_model.text_conditioning(["a dog, the dog is"], torch.randn_like(ctx[:1]), torch.tensor([True]))
    assert mixed.shape == (2, 77, tiny_model.text_encoder.config.hidden_size)
    assert torch.allclose(mixed[1], alone[0], atol=1e-6)
    assert not torch.allclose(mixed[0], other[0], atol=1e-4)


def test_generate_is_seeded(tiny_model):
    subject = Image.new("RGB", (40, 30), (200, 30, 30))
    first = tiny_model.generate(subject, "dog", "a dog on the beach", steps=3, seed=5)
    again = tiny_model.generate(subject, "dog", "a dog on the beach", steps=3, seed=5)
    other = tiny_model.generate(subject, "dog", "a dog on the beach", steps=3, seed=6)
    assert first.size == (tiny_model.target_size, tiny_model.target_size)
    assert first.tobytes() == again.tobytes() != other.tobytes()


def test_start_from_stable_diffusion_and_a_qformer(tiny_model, tmp_path):
    """SD-1.5's layout (text encoder weights under ``text_model.`` as on the hub) plus a Q-Former folder."""
    from safetensors.torch import load_file

    from subjectpairs.training.config import TrainConfig

    sd = tmp_path / "sd15"
    for part in ("text_encoder", "unet", "vae", "tokenizer"):
        getattr(tiny_model, part).save_pretrained(sd / part)
    text_weights = sd / "text_encoder" / "model.safetensors"
    save_file({f"text_model.{k}": v for k, v in load_file(text_weights).items()}, text_weights)
    import diffusers

    diffusers.PNDMScheduler.from_config(tiny_model.scheduler_config).save_pretrained(sd / "scheduler")
    qformer = tmp_path / "qformer"
    tiny_model.qformer.save_pretrained(qformer)
    tiny_model.qformer_tokenizer.save_pretrained(qformer)

    combined = BlipDiffusion.from_parts(sd, qformer)
    before, after = tiny_model.state_dict(), combined.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(ValueError, match="go together"):
        TrainConfig(shards=["s"], out="o", stable_diffusion=str(sd))
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(shards=["s"], out="o", init="x", stable_diffusion=str(sd), qformer=str(qformer))
