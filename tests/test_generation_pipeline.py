"""The generation pipeline's conventions (the authors' and diffusers'), each checked on the tiny model; the image
itself is compared with diffusers' in tests/test_diffusers_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler
from PIL import Image
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.errors import InputError
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline, build_prompt
from subjectpairs.training.qformer import NUM_QUERY_TOKENS
from subjectpairs.training.schedulers import build_scheduler

SUBJECT = Image.new("RGB", (40, 30), (200, 30, 30))


@pytest.fixture(scope="module")
def tiny_model() -> BlipDiffusion:
    return BlipDiffusion.from_config("tiny", seed=0)


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("generation") / "model")


@pytest.fixture
def pipeline(tiny_model) -> BlipDiffusionPipeline:
    return BlipDiffusionPipeline(tiny_model)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_prompt_is_the_authors_repeated_prompt():
    assert build_prompt(" on the beach ", "cat") == ", ".join(["a cat on the beach"] * 20)
    assert build_prompt("on the beach", "cat", prompt_strength=0.5) == ", ".join(["a cat on the beach"] * 10)
    assert build_prompt("on the beach", "cat", prompt_strength=1.0, prompt_reps=1) == "a cat on the beach"
    with pytest.raises(InputError, match="leaves no prompt"):
        build_prompt("on the beach", "cat", prompt_strength=0.01)


class Recorder:
    """What the pipeline hands the Q-Former, the text encoder and the UNet."""

    def __init__(self, model: BlipDiffusion, monkeypatch) -> None:
        self.categories: list[list[str]] = []
        self.text_inputs: list[torch.Tensor] = []
        self.unet_batches: list[torch.Tensor] = []
        self.embeddings: list[torch.Tensor] = []
        original = model.subject_embeddings

        def subject_embeddings(pixels, categories):
            self.categories.append(list(categories))
            self.embeddings.append(original(pixels, categories))
            return self.embeddings[-1]

        monkeypatch.setattr(model, "subject_embeddings", subject_embeddings)
        self.hooks = [
            model.text_encoder.register_forward_pre_hook(lambda m, args: self.text_inputs.append(args[0].detach())),
            model.unet.register_forward_pre_hook(lambda m, args: self.unet_batches.append(args[0].detach())),
        ]

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()


@pytest.fixture
def recorder(tiny_model, monkeypatch):
    recording = Recorder(tiny_model, monkeypatch)
    yield recording
    recording.close()


def _token_embeddings(model: BlipDiffusion, text: str, length: int) -> torch.Tensor:
    ids = model.tokenizer([text], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return model.text_encoder.token_embeddings(ids.input_ids)[0]


def test_subject_embeddings_go_at_ctx_begin_pos_of_the_target_prompt(pipeline, tiny_model, recorder, monkeypatch):
    monkeypatch.setattr(tiny_model, "ctx_begin_pos", 3)
    pipeline("on the beach", SUBJECT, "dog", "cat", num_inference_steps=1, generator=generator(), neg_prompt="blurry")
    assert recorder.categories == [["dog"]]  # the Q-Former sees the source category
    conditional, unconditional = recorder.text_inputs  # the prompt is encoded first
    tokens = _token_embeddings(tiny_model, build_prompt("on the beach", "cat"), 77 - NUM_QUERY_TOKENS)
    with torch.no_grad():
        assert torch.equal(conditional[0, :3], tokens[:3])
        assert torch.equal(conditional[0, 3:3 + NUM_QUERY_TOKENS], recorder.embeddings[0][0])
        assert torch.equal(conditional[0, 3 + NUM_QUERY_TOKENS:], tokens[3:])
        assert torch.equal(unconditional[0], _token_embeddings(tiny_model, "blurry", 77))
    assert conditional.shape[1] == unconditional.shape[1] == 77


def test_guidance_runs_two_branches_above_one_and_one_at_or_below(pipeline, recorder):
    pipeline("on the beach", SUBJECT, "dog", num_inference_steps=2, guidance_scale=7.5, generator=generator())
    steps = len(pipeline.scheduler.timesteps)  # PNDM's first step runs twice
    assert [batch.shape[0] for batch in recorder.unet_batches] == [2] * steps
    assert len(recorder.text_inputs) == 2
    recorder.unet_batches.clear(), recorder.text_inputs.clear()
    pipeline("on the beach", SUBJECT, "dog", num_inference_steps=2, guidance_scale=1.0, generator=generator())
    assert [batch.shape[0] for batch in recorder.unet_batches] == [1] * steps
    assert len(recorder.text_inputs) == 1  # no unconditional branch is encoded


def test_initial_latents_are_drawn_as_diffusers_draws_them(pipeline, tiny_model, recorder):
    pipeline("on the beach", SUBJECT, "dog", num_inference_steps=1, guidance_scale=1.0, generator=generator(7))
    side = tiny_model.target_size // tiny_model.vae_scale_factor
    expected = torch.randn((1, 4, side, side), generator=generator(7)) * pipeline.scheduler.init_noise_sigma
    assert torch.equal(recorder.unet_batches[0], expected)


def test_generation_is_seeded_and_batches_like_single_calls(pipeline):
    first = pipeline("on the beach", SUBJECT, "dog", num_inference_steps=3, generator=generator(5), output_type="np")
    again = pipeline("on the beach", SUBJECT, "dog", num_inference_steps=3, generator=generator(5), output_type="np")
    other = pipeline("on the beach", SUBJECT, "dog", num_inference_steps=3, generator=generator(6), output_type="np")
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    # one generator for a batch: its first image is the single call's, the second another draw
    pair = pipeline(["on the beach"] * 2, SUBJECT, "dog", num_inference_steps=3, generator=generator(5),
                    output_type="np")
    assert pair.shape[0] == 2
    np.testing.assert_allclose(pair[0], first[0], atol=1e-5)
    assert not np.allclose(pair[1], pair[0])
    # a generator per image gives each image its own seed's
    per_image = pipeline(["on the beach"] * 2, SUBJECT, "dog", num_inference_steps=3,
                         generator=[generator(6), generator(5)], output_type="np")
    np.testing.assert_allclose(per_image[0], other[0], atol=1e-5)
    np.testing.assert_allclose(per_image[1], first[0], atol=1e-5)


def test_height_and_width(pipeline):
    (image,) = pipeline("on the beach", SUBJECT, "dog", num_inference_steps=1, height=48, width=80,
                        generator=generator())
    assert image.size == (80, 48)
    with pytest.raises(InputError, match="width 50: must be a positive multiple of 8"):
        pipeline("on the beach", SUBJECT, "dog", num_inference_steps=1, width=50)


def test_schedulers_by_name_keep_the_folders_noise_schedule(tiny_model):
    assert isinstance(build_scheduler(tiny_model.scheduler_config), PNDMScheduler)
    for name in ("ddim", "DDIM", "DDIMScheduler"):
        ddim = build_scheduler(tiny_model.scheduler_config, name)
        assert isinstance(ddim, DDIMScheduler)
        assert ddim.config.beta_schedule == "scaled_linear" and ddim.config.steps_offset == 1
    with pytest.raises(InputError, match="not one of diffusers' schedulers.*DDIM"):
        build_scheduler(tiny_model.scheduler_config, "warp-drive")


def test_an_export_keeps_ctx_begin_pos(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_model, "ctx_begin_pos", 4)
    folder = tiny_model.save_pretrained(tmp_path / "model")
    assert BlipDiffusion.from_pretrained(folder).ctx_begin_pos == 4


def test_the_generate_command_takes_the_inference_options(export, tmp_path):
    subject = tmp_path / "subject.png"
    SUBJECT.save(subject)
    out = tmp_path / "images" / "cat.png"
    result = CliRunner().invoke(app, [
        "generate", "--model", str(export), "--subject-image", str(subject), "--category", "dog",
        "--target-category", "cat", "--prompt", "on the beach", "--out", str(out), "--steps", "2",
        "--num-images", "2", "--scheduler", "ddim", "--guidance", "1", "--height", "32", "--width", "48",
        "--prompt-strength", "0.5", "--negative-prompt", "blurry", "--seed", "3"])
    assert result.exit_code == 0, result.output
    written = [tmp_path / "images" / "cat-0.png", tmp_path / "images" / "cat-1.png"]
    assert sorted((tmp_path / "images").iterdir()) == written
    assert [Image.open(path).size for path in written] == [(48, 32)] * 2
    pipeline = BlipDiffusionPipeline.from_pretrained(export, scheduler="ddim")
    expected = pipeline(["on the beach"] * 2, SUBJECT, "dog", "cat", num_inference_steps=2, guidance_scale=1.0,
                        height=32, width=48, prompt_strength=0.5, generator=generator(3))
    for path, image in zip(written, expected):
        assert np.abs(np.asarray(Image.open(path), np.int16) - np.asarray(image, np.int16)).max() <= 1


@pytest.mark.parametrize(("options", "message"), [
    (["--scheduler", "warp-drive"], "--scheduler warp-drive: not one of diffusers' schedulers"),
    (["--prompt-strength", "0"], "leaves no prompt"),
    (["--out", "{tmp}/cat.txt"], "not an image file name"),
    (["--out", "{tmp}/subject.png"], "would overwrite the subject image"),
    (["--width", "50"], "width 50: must be a positive multiple of 8"),
])
def test_bad_generate_options_are_one_line_errors(export, tmp_path, options, message):
    subject = tmp_path / "subject.png"
    SUBJECT.save(subject)
    subject_bytes = subject.read_bytes()
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    base = {"--model": str(export), "--subject-image": str(subject), "--category": "dog", "--prompt": "on the beach",
            "--out": str(tmp_path / "out.png"), "--steps": "1"}
    for flag, value in zip(options[::2], options[1::2]):
        base[flag] = value
    result = CliRunner().invoke(app, ["generate", *[part for pair in base.items() for part in pair]])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert subject.read_bytes() == subject_bytes
    assert not (tmp_path / "out.png").exists()
