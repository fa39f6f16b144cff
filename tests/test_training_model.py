"""The BLIP-Diffusion model: released weight layout, freezing, subject-embedding insertion, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.loss import training_prompt
from subjectpairs.training.qformer import NUM_QUERY_TOKENS


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
    embeds = tiny_model.text_encoder.token_embeddings(ids, ctx, [eot])
    plain = tiny_model.text_encoder.token_embeddings(ids)
    assert embeds.shape[1] == 61 + NUM_QUERY_TOKENS == 77
    assert torch.equal(embeds[0, :eot], plain[0, :eot])
    assert torch.equal(embeds[0, eot:eot + NUM_QUERY_TOKENS], ctx[0])
    assert torch.equal(embeds[0, eot + NUM_QUERY_TOKENS], plain[0, eot])  # the end-of-text token follows


def text_encoder_inputs(model: BlipDiffusion, run) -> torch.Tensor:
    """The token embeddings (subject embeddings inserted) that ``run()`` hands the text encoder."""
    seen = []
    hook = model.text_encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        with torch.no_grad():
            run()
    finally:
        hook.remove()
    (inputs,) = seen
    return inputs


def token_embeddings(model: BlipDiffusion, text: str, length: int) -> torch.Tensor:
    ids = model.tokenizer([text], padding="max_length", truncation=True, max_length=length,
                          return_tensors="pt").input_ids
    return model.text_encoder.token_embeddings(ids)[0]


def test_dropped_rows_keep_the_template_text_without_subject_embeddings(tiny_model):
    """As the authors drop the subject: a dropped row's text is the same template, within the same 61-token
    budget as a subject row, padded to 77 instead of taking the 16 embeddings."""
    short = training_prompt("a dog on the grass", "Dog")
    long = training_prompt("a dog " + "sitting on the grass " * 20, "Dog")
    prompts = [short, short, long, long]
    ctx = torch.randn(4, NUM_QUERY_TOKENS, tiny_model.text_encoder.config.hidden_size)
    keep = torch.tensor([True, False, True, False])
    inputs = text_encoder_inputs(tiny_model, lambda: tiny_model.text_conditioning(prompts, ctx, keep))

    tokenizer = tiny_model.tokenizer
    pad = tiny_model.text_encoder.token_embeddings(torch.tensor([[tokenizer.pad_token_id]]))[0, 0]
    for subject, dropped in ((0, 1), (2, 3)):
        ids = tokenizer([prompts[subject]], padding="max_length", truncation=True, max_length=61,
                        return_tensors="pt").input_ids
        eot = int((ids[0] == tokenizer.eos_token_id).int().argmax())
        with_ctx = tiny_model.text_encoder.token_embeddings(ids, ctx[subject:subject + 1], [eot])
        assert torch.equal(inputs[subject], with_ctx[0])  # subject rows: 61 text tokens and 16 embeddings
        assert torch.equal(inputs[dropped, :61], tiny_model.text_encoder.token_embeddings(ids)[0])
        assert torch.equal(inputs[dropped, 61:], pad.expand(NUM_QUERY_TOKENS, -1))
        assert not torch.isclose(inputs[dropped], ctx[dropped, :1]).all(dim=1).any()
    assert int((ids[0] == tokenizer.eos_token_id).int().argmax()) == 60  # the long prompt was cut at 61 tokens
    assert torch.equal(inputs[1], token_embeddings(tiny_model, short, 77))
    assert not torch.equal(inputs[1], token_embeddings(tiny_model, "a dog on the grass", 77))


def test_training_drops_the_subject_embeddings_not_the_template(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model, "drop_subject_prob", 1.0)
    captions, categories = ["a dog on grass", "a red cup"], ["Dog", "Cup"]
    torch.manual_seed(0)
    inputs = text_encoder_inputs(tiny_model, lambda: tiny_model(
        torch.randn(2, 3, 32, 32), captions, categories, target=torch.rand(2, 3, 64, 64) * 2 - 1))
    for row, (caption, category) in enumerate(zip(captions, categories)):
        assert torch.equal(inputs[row], token_embeddings(tiny_model, training_prompt(caption, category), 77))


def test_without_subject_embeddings_a_prompt_keeps_77_tokens(tiny_model):
    """The unconditional branch of generation: the negative prompt alone, as diffusers' pipeline has it."""
    negative = "a blurry photo of " + "a dog on the grass " * 20
    inputs = text_encoder_inputs(tiny_model, lambda: tiny_model.text_conditioning([negative], None))
    assert torch.equal(inputs[0], token_embeddings(tiny_model, negative, 77))



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
