"""Subject-driven editing with prompt-to-prompt (training/pipeline_blip_diffusion_edit.py and
training/attention_control.py) on the tiny model: each mechanism is checked by what would change without it.

The tiny model's random cross-attention is nearly uniform (every position attends about equally to every
token), so LAVIS's threshold of 0.3 on the normalised map keeps the whole image; the local blend is checked with
a threshold in the middle of the map's values instead. Its random VAE decoder, from an 8 x 8 latent and with
self-attention in its middle block, spreads every latent over the whole image, so the blend's promise (the
source outside the mask) is checked on the latents that the decoder gets.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from typer.testing import CliRunner

from subjectpairs.cli.edit import edit_command
from subjectpairs.errors import InputError
from subjectpairs.training import inference_defaults
from subjectpairs.training.attention_control import SUBJECT_SLOT, AttentionRefine, AttentionStore, refinement_mapper
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.model_folders import save_subject_embedding
from subjectpairs.training.pipeline_blip_diffusion_edit import (
    PLACEHOLDER,
    BlipDiffusionEditPipeline,
    EditResult,
    build_edit_prompts,
    inversion_pixels,
)

SUBJECT = Image.fromarray(skimage.data.astronaut())
PHOTO = Image.fromarray(skimage.data.chelsea())
SIZE = 64
STEPS = 4


@pytest.fixture(scope="module")
def tiny_model() -> BlipDiffusion:
    return BlipDiffusion.from_config("tiny", seed=0)


@pytest.fixture(scope="module")
def pipeline(tiny_model) -> BlipDiffusionEditPipeline:
    return BlipDiffusionEditPipeline(tiny_model)


@pytest.fixture(scope="module")
def export(tiny_model, tmp_path_factory):
    return tiny_model.save_pretrained(tmp_path_factory.mktemp("edit") / "model")


def edit(pipeline: BlipDiffusionEditPipeline, **options) -> EditResult:
    settings = {"num_inference_steps": STEPS, "num_inversion_steps": STEPS, "height": SIZE, "width": SIZE,
                "generator": torch.Generator().manual_seed(0), **options}
    return pipeline(SUBJECT, "dog", "a cat sitting on the grass", "cat", **settings)


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float32)


def record_decoded_latents(model: BlipDiffusion, monkeypatch) -> list[torch.Tensor]:
    """The latents each edit hands the VAE decoder: (source, edited), unscaled."""
    decoded: list[torch.Tensor] = []
    decode = model.vae.decode

    def recording(latents, *args, **kwargs):
        decoded.append(latents.detach().clone() * model.latent_scale)
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(model.vae, "decode", recording)
    return decoded


# -- prompts and token alignment ---------------------------------------------------------------------------------

def test_the_prompts_are_lavis_with_the_sentence_written_out():
    prompts = build_edit_prompts("  a cat  sitting on the grass ", "Cat", "dog", slots=3)
    assert prompts.source == "a cat sitting on the grass"
    assert prompts.target == f"a {PLACEHOLDER} {PLACEHOLDER} {PLACEHOLDER} dog sitting on the grass"
    assert prompts.source[slice(*prompts.edit_span)] == "cat"
    assert prompts.target[slice(*prompts.subject_span)] == "sks sks sks dog"
    # LAVIS's own sentence, "a {src_subject} {prompt}", is a sentence like any other
    assert build_edit_prompts("a cat sit on a chair, oil painting", "cat", "dog").target == (
        "a " + " ".join([PLACEHOLDER] * 16) + " dog sit on a chair, oil painting")
    # a word next to punctuation is still the word
    assert build_edit_prompts("a photo of a cat, on the grass", "cat", "dog", 1).target == (
        "a photo of a sks dog, on the grass")


@pytest.mark.parametrize(("sentence", "word", "message"), [
    ("a cat sitting on the grass", "kitten",
     "edit word 'kitten' is not a word of the source prompt 'a cat sitting on the grass'"),
    ("a cat sitting on the grass", "ca", "edit word 'ca' is not a word of the source prompt"),
    ("a cat sitting on the grass", "", "edit word '': one word of the source prompt is needed"),
    ("a cat sitting on the grass", "cat sitting", "edit word 'cat sitting': one word"),
    ("a cat next to a cat", "cat", "edit word 'cat' occurs 2 times in the source prompt"),
])
def test_an_edit_word_that_is_not_one_word_of_the_source_prompt_is_refused(sentence, word, message):
    with pytest.raises(InputError, match=message):
        build_edit_prompts(sentence, word, "dog")


@pytest.mark.parametrize(("sentence", "word", "message"), [
    ("a cat sitting on the grass", "dog", "edit word 'dog' is not a word of the source prompt"),
    # the target keeps 77 - 16 tokens beside the subject embeddings, and its 16 placeholders come first
    (" ".join(["a photo"] * 20) + " of a cat", "cat", "the source prompt is too long to edit"),
])
def test_the_pipeline_refuses_an_edit_it_cannot_make_before_the_models_run(pipeline, monkeypatch, sentence, word,
                                                                           message):
    for part in ("unet", "qformer"):
        monkeypatch.setattr(getattr(pipeline.model, part), "forward", lambda *args, **kwargs: pytest.fail("ran"))
    with pytest.raises(InputError, match=message) as error:
        pipeline(SUBJECT, "dog", sentence, word, num_inference_steps=1, height=SIZE, width=SIZE)
    assert "\n" not in str(error.value)


def test_the_mapper_aligns_the_tokens_the_text_encoder_reads():
    """Shared words take the source's attention, the subject's slots, placeholders and new word their own;
    padding maps to itself (LAVIS's get_refinement_mapper, on the sequence with the subject embeddings in)."""
    bos, eos, a, cat, dog, sks, on, grass = 100, 101, 1, 2, 3, 4, 5, 6
    source = [bos, a, cat, on, grass, eos]
    target = [bos, a, SUBJECT_SLOT, SUBJECT_SLOT, sks, sks, dog, on, grass, eos]
    mapper, alphas = refinement_mapper(source, target, 12)
    assert mapper.tolist() == [0, 1, -1, -1, -1, -1, -1, 3, 4, 5, 10, 11]
    assert alphas.tolist() == [1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    # the same word in both keeps the source's attention
    mapper, alphas = refinement_mapper(source, [bos, a, SUBJECT_SLOT, sks, cat, on, grass, eos], 8)
    assert mapper.tolist() == [0, 1, -1, -1, 2, 3, 4, 5] and alphas.tolist() == [1, 1, 0, 0, 1, 1, 1, 1]


def test_attention_refine_replaces_within_lavis_windows():
    """50 steps: cross-attention from the source while step < int(0.8 * 51) = 40, self-attention while
    step < int(0.4 * 50) = 20 and only in layers of at most 16 x 16 positions; the unconditional rows and the
    source never change."""
    mapper, alphas = torch.tensor([0, 1, -1, 2]), torch.tensor([1.0, 1.0, 0.0, 1.0])
    controller = AttentionRefine(mapper, alphas, 50, 0.8, 0.4, AttentionStore((4, 4)), local_blend=None)
    assert (controller.cross_replace_end, controller.self_replace_end) == (40, 20)
    # rows: unconditional source and target, source, target; then heads, positions, tokens
    cross = torch.rand(4, 2, 16, 4).softmax(-1)
    coarse, fine = torch.rand(4, 2, 16, 16), torch.rand(4, 2, 17**2, 17**2)
    for step in (0, 19, 20, 39, 40):
        controller.step = step
        replaced = controller(cross.clone(), True, "down")
        assert torch.equal(replaced[:3], cross[:3])
        if step < 40:
            assert torch.equal(replaced[3][..., [0, 1, 3]], cross[2][..., [0, 1, 2]])
            assert torch.equal(replaced[3][..., 2], cross[3][..., 2])  # a token of the target's own
        else:
            assert torch.equal(replaced, cross)
        assert torch.equal(controller(coarse.clone(), False, "up")[3], coarse[2] if step < 20 else coarse[3])
        assert torch.equal(controller(fine.clone(), False, "up"), fine)


# -- the edit -------------------------------------------------------------------------------------------------------

def test_the_local_blend_keeps_the_source_outside_the_edit_words_mask(pipeline, monkeypatch):
    decoded = record_decoded_latents(pipeline.model, monkeypatch)
    unblended = edit(pipeline, lb_threshold=0.0)
    assert (unblended.mask == 1).all()
    # a threshold between the median of the map as LocalBlend normalises it and the next value above (the
    # max-pool repeats values; a threshold away from all of them leaves no tie to rounding): half the image
    pooled = F.max_pool2d(torch.from_numpy(unblended.attention)[None, None], 3, stride=1, padding=1)
    values = (pooled / pooled.max()).flatten().numpy()
    median = float(np.median(values))
    threshold = (median + float(values[values > median].min())) / 2
    blended = edit(pipeline, lb_threshold=threshold)

    # the source branch is never touched, so its attention, and the mask made from it, are the same in both
    np.testing.assert_allclose(blended.attention, unblended.attention, rtol=1e-5)
    expected = F.interpolate((pooled / pooled.max() > threshold).float(), size=(SIZE, SIZE))[0, 0].numpy()
    np.testing.assert_array_equal(blended.mask, expected)
    assert 0.25 < blended.mask.mean() < 0.75

    factor = pipeline.model.vae_scale_factor
    inside = torch.from_numpy(blended.mask[::factor, ::factor] > 0.5)
    (source, edited), (unblended_source, unblended_edited) = decoded[1], decoded[0]
    assert torch.equal(source, unblended_source)
    assert (edited - source)[:, ~inside].abs().max() == 0  # outside the mask: the source's latents exactly
    assert (edited - source)[:, inside].abs().mean() > 0.05
    assert (unblended_edited - unblended_source)[:, ~inside].abs().mean() > 0.05  # what the blend took back
    # in the images, through the decoder's spread: less change outside with the blend than without
    change, unblended_change = (np.abs(grey(r.image) - grey(r.source)).mean(-1) for r in (blended, unblended))
    outside = blended.mask < 0.5
    assert change[outside].mean() < 0.85 * unblended_change[outside].mean()
    assert change[outside].mean() < change[~outside].mean()


@pytest.mark.parametrize("replacement", ["cross_replace_steps", "self_replace_steps"])
def test_attention_replacement_shapes_the_edit_for_its_share_of_the_steps(pipeline, replacement):
    """With the source's attention for half the steps, the edited image is another than with it for none and
    than with it for all (by 0.3 to 0.6 grey levels on average on the tiny model; runs that replaced alike would
    repeat each other exactly); the source image is the same in all three."""
    options = {"cross_replace_steps": 0.0, "self_replace_steps": 0.0, "lb_threshold": 0.0}
    processors = {name: type(processor) for name, processor in pipeline.model.unet.attn_processors.items()}
    own, half, whole = (edit(pipeline, **{**options, replacement: share}) for share in (0.0, 0.5, 1.0))
    # the model's own processors are back: a model shared with generation is left as it was
    assert {name: type(processor) for name, processor in pipeline.model.unet.attn_processors.items()} == processors
    assert all(np.array_equal(grey(result.source), grey(own.source)) for result in (half, whole))
    assert np.abs(grey(half.image) - grey(own.image)).mean() > 0.1
    assert np.abs(grey(whole.image) - grey(half.image)).mean() > 0.1


def test_the_mask_and_the_attention_map_keep_the_latents_aspect(pipeline):
    result = edit(pipeline, num_inference_steps=2, height=SIZE, width=2 * SIZE, lb_threshold=0.9)
    assert result.image.size == result.source.size == (2 * SIZE, SIZE)
    assert result.attention.shape == (SIZE // 8, 2 * SIZE // 8)  # the tiny UNet attends at the latent's size
    assert result.mask.shape == (SIZE, 2 * SIZE) and set(np.unique(result.mask)) <= {0.0, 1.0}
    assert result.attention_image().size == result.mask_image().size == (2 * SIZE, SIZE)


def test_the_defaults_are_lavis():
    assert (inference_defaults.CROSS_REPLACE_STEPS, inference_defaults.SELF_REPLACE_STEPS,
            inference_defaults.LB_THRESHOLD, inference_defaults.GUIDANCE_SCALE) == (0.8, 0.4, 0.3, 7.5)


@pytest.fixture(scope="module")
def smooth_pipeline() -> BlipDiffusionEditPipeline:
    """A tiny model on which DDIM inversion is as well conditioned as on the released one: latents of unit
    variance (the VAE's scaling factor set for them, as SD's 0.18215 is for its VAE; the random VAE's latents
    have a standard deviation of 0.06 at 0.18215) and a noise prediction that changes little with the latents
    (the UNet's output layer scaled by 0.1; at full scale a change of 0.1 in the latents changes the random
    UNet's prediction by 0.2, and inversion, which predicts each step's noise from the previous step's
    latents, cannot retrace anything)."""
    model = BlipDiffusion.from_config("tiny", seed=0)
    with torch.no_grad():
        latents = model.vae.encode(inversion_pixels(PHOTO, SIZE, SIZE)).latent_dist.mode()
        model.vae.register_to_config(scaling_factor=1 / float(latents.std()))
        model.unet.conv_out.weight.mul_(0.1)
        model.unet.conv_out.bias.mul_(0.1)
    return BlipDiffusionEditPipeline(model)


def test_ddim_inversion_of_a_photo_retraces_it(smooth_pipeline):
    """The source image of a photo's edit is its DDIM reconstruction: inverted and denoised in as many steps,
    it comes back to the VAE's reconstruction of the photo within 8 grey levels on average (measured: 4; a
    source generated from noise is 40 away, one denoised in other steps than it was inverted in 26 to 31)."""
    model = smooth_pipeline.model
    with torch.no_grad():
        pixels = inversion_pixels(PHOTO, SIZE, SIZE)
        reconstructed = model.vae.decode(model.vae.encode(pixels).latent_dist.mode()).sample
    reconstructed = grey(smooth_pipeline.generation.image_processor.postprocess(reconstructed, output_type="pil")[0])

    def distance(result: EditResult) -> float:
        return float(np.abs(grey(result.source) - reconstructed).mean())

    retraced = edit(smooth_pipeline, image=PHOTO, guidance_scale=1.0)
    assert distance(retraced) < 8
    assert distance(edit(smooth_pipeline, image=PHOTO, guidance_scale=1.0, num_inversion_steps=2 * STEPS)) > 16
    assert distance(edit(smooth_pipeline, guidance_scale=1.0)) > 16
    # the source is denoised without guidance whatever the edit's, as it was inverted (LAVIS's use_inversion)
    guided = edit(smooth_pipeline, image=PHOTO, guidance_scale=7.5)
    assert np.abs(grey(guided.source) - grey(retraced.source)).max() <= 1
    assert np.abs(grey(guided.image) - grey(guided.source)).mean() > 1


def test_a_photo_is_scaled_to_cover_and_centre_cropped():
    photo = Image.new("RGB", (300, 100), (0, 0, 0))
    photo.paste((255, 255, 255), (100, 0, 200, 100))  # a white middle third
    pixels = inversion_pixels(photo, 32, 16)
    assert pixels.shape == (1, 3, 32, 16) and pixels.min() >= -1 and pixels.max() <= 1
    assert (pixels[..., 2:-2] > 0.99).all()  # 16 of 96 columns after scaling to a height of 32: the middle


# -- the command line ------------------------------------------------------------------------------------------------

def invoke(*arguments: str):
    app = typer.Typer()
    app.command()(edit_command)
    return CliRunner().invoke(app, list(arguments))


def test_the_edit_command_writes_the_edit_the_source_the_mask_and_the_attention(export, tmp_path):
    subject, photo = tmp_path / "subject.png", tmp_path / "photo.jpg"
    SUBJECT.save(subject)
    PHOTO.save(photo)
    out = tmp_path / "edits" / "dog.jpg"
    result = invoke("--model", str(export), "--subject-image", str(subject), "--category", "dog",
                    "--source-prompt", "a cat sitting on the grass", "--edit-word", "cat", "--image", str(photo),
                    "--out", str(out), "--steps", "3", "--inversion-steps", "3", "--height", "64", "--width", "128",
                    "--threshold", "0.9", "--seed", "1")
    assert result.exit_code == 0, result.output
    written = {path.name: Image.open(path) for path in sorted((tmp_path / "edits").iterdir())}
    assert sorted(written) == ["dog-attention.png", "dog-mask.png", "dog-source.png", "dog.jpg"]
    assert all(image.size == (128, 64) for image in written.values())  # the 8 x 16 latent's aspect
    assert written["dog.jpg"].mode == written["dog-source.png"].mode == "RGB"
    mask, attention = np.asarray(written["dog-mask.png"]), np.asarray(written["dog-attention.png"])
    assert written["dog-mask.png"].mode == written["dog-attention.png"].mode == "L"
    assert set(np.unique(mask)) <= {0, 255}
    assert attention.max() == 255 and attention.min() < 255


def test_a_finetuned_folder_edits_from_its_cached_embedding(tiny_model, tmp_path):
    folder = tiny_model.save_pretrained(tmp_path / "tuned")
    save_subject_embedding(folder, torch.randn(1, 16, tiny_model.text_encoder.config.hidden_size), "dog")
    out = tmp_path / "edit.png"
    result = invoke("--model", str(folder), "--source-prompt", "a cat on the grass", "--edit-word", "cat",
                    "--out", str(out), "--steps", "2", "--height", "64", "--width", "64")
    assert result.exit_code == 0, result.output
    assert {path.name for path in tmp_path.glob("edit*.png")} == {
        "edit.png", "edit-source.png", "edit-mask.png", "edit-attention.png"}


@pytest.mark.parametrize(("options", "message", "loads"), [
    (["--out", "{tmp}/edit.txt"], "--out {tmp}/edit.txt: not an image file name", False),
    (["--out", "{tmp}/subject.png"], "would overwrite the --subject-image file", False),
    (["--edit-word", "kitten"], "edit word 'kitten' is not a word of the source prompt", False),
    (["--subject-image", "{tmp}/broken.png"], "--subject-image {tmp}/broken.png: cannot read the image", False),
    (["--image", "{tmp}/broken.png"], "--image {tmp}/broken.png: cannot read the image", False),
    (["--threshold", "1.5"], "local blend threshold 1.5", False),
    (["--inversion-steps", "0"], "0 inversion steps", False),
    (["--width", "50"], "width 50: must be a positive multiple of 8", True),
])
def test_bad_edit_options_are_one_line_errors(export, tmp_path, monkeypatch, options, message, loads):
    subject = tmp_path / "subject.png"
    SUBJECT.save(subject)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    if not loads:  # refused before the model loads
        monkeypatch.setattr(BlipDiffusionEditPipeline, "from_pretrained",
                            classmethod(lambda *args, **kwargs: pytest.fail("the model was loaded")))
    given = {"--model": str(export), "--subject-image": str(subject), "--category": "dog",
             "--source-prompt": "a cat on the grass", "--edit-word": "cat", "--out": str(tmp_path / "out.png"),
             "--steps": "1"}
    given.update({flag: value.replace("{tmp}", str(tmp_path)) for flag, value in zip(options[::2], options[1::2])})
    result = invoke(*[part for pair in given.items() for part in pair])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 or loads, result.output  # loading the model prints transformers' progress bars
    assert lines[-1].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in lines[-1]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken.png", "subject.png"]
