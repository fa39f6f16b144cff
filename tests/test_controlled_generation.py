"""Structure control with a ControlNet, subject interpolation and subject-driven style transfer, on the tiny
model (paper 3.3 and A.7; LAVIS ``_predict_noise``, ``forward_ctx_embeddings`` with ratios, the stylization
notebook). The tiny models are random: these tests check the mechanisms, not the paper's quality."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from diffusers import ControlNetModel
from PIL import Image
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.errors import InputError
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.control_images import canny_edges, control_map, resize_to_resolution
from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline, grid_weights

STEPS = 3
CAT = Image.fromarray(skimage.data.chelsea())
ASTRONAUT = Image.fromarray(skimage.data.astronaut())
COFFEE = Image.fromarray(skimage.data.coffee())
ROCKET = Image.fromarray(skimage.data.rocket())


@pytest.fixture(scope="module")
def model() -> BlipDiffusion:
    return BlipDiffusion.from_config("tiny", seed=0)


@pytest.fixture(scope="module")
def zero_controlnet(model) -> ControlNetModel:
    """As ControlNet training starts: a copy of the UNet's encoder with zero-initialised output convolutions."""
    return ControlNetModel.from_unet(model.unet)


@pytest.fixture(scope="module")
def trained_controlnet(model) -> ControlNetModel:
    """A ControlNet whose outputs and conditioning embedding are no longer zero, as after training."""
    controlnet = ControlNetModel.from_unet(model.unet)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
        conv_out = controlnet.controlnet_cond_embedding.conv_out  # what the control map enters through
        conv_out.weight.copy_(torch.randn(conv_out.weight.shape, generator=generator) * 3.0)
    return controlnet


def generate(pipeline: BlipDiffusionPipeline, **options) -> np.ndarray:
    settings = {"num_inference_steps": STEPS, "generator": torch.Generator().manual_seed(0), "output_type": "np"}
    subject = options.pop("subject", CAT)
    category = options.pop("category", "cat")
    return pipeline("on a table", subject, category, **{**settings, **options})


def test_a_zero_initialised_controlnet_leaves_the_image_exactly_as_without_it(model, zero_controlnet):
    plain = generate(BlipDiffusionPipeline(model))
    controlled = generate(BlipDiffusionPipeline(model, controlnet=zero_controlnet), control_image=canny_edges(COFFEE))
    assert np.array_equal(plain, controlled)


def test_a_trained_controlnet_steers_the_image_by_its_control_map(model, trained_controlnet):
    plain = generate(BlipDiffusionPipeline(model))
    pipeline = BlipDiffusionPipeline(model, controlnet=trained_controlnet)
    coffee = generate(pipeline, control_image=canny_edges(COFFEE))
    rocket = generate(pipeline, control_image=canny_edges(ROCKET))
    blank = generate(pipeline, control_image=Image.new("RGB", (64, 64), "white"))
    assert np.abs(coffee - plain).max() > 0.02
    # the map itself, not only the ControlNet's presence (the tiny random UNet responds weakly; float noise
    # between two runs of one map is below 1e-5)
    assert np.abs(coffee - blank).max() > 1e-3
    assert np.abs(coffee - rocket).max() > 1e-4
    # scale 0 takes the residuals out again
    assert np.array_equal(generate(pipeline, control_image=canny_edges(COFFEE), controlnet_conditioning_scale=0.0),
                          plain)


def test_the_controlnet_sees_both_guidance_branches_at_every_step(model, trained_controlnet, monkeypatch):
    calls = []
    original = trained_controlnet.forward

    def recording(sample, timestep, encoder_hidden_states, controlnet_cond, **options):
        calls.append((sample.shape[0], encoder_hidden_states.shape[0], controlnet_cond.shape[0]))
        return original(sample, timestep, encoder_hidden_states, controlnet_cond, **options)

    monkeypatch.setattr(trained_controlnet, "forward", recording)
    pipeline = BlipDiffusionPipeline(model, controlnet=trained_controlnet)
    pipeline(["on a table"] * 2, CAT, "cat", num_inference_steps=STEPS, control_image=canny_edges(COFFEE),
             generator=torch.Generator().manual_seed(0))
    assert len(calls) == len(pipeline.scheduler.timesteps)
    assert set(calls) == {(4, 4, 4)}  # 2 images x (unconditional + conditional)
    calls.clear()
    pipeline("on a table", CAT, "cat", num_inference_steps=STEPS, control_image=canny_edges(COFFEE),
             guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert set(calls) == {(1, 1, 1)}


def test_a_control_image_and_a_controlnet_go_together(model, zero_controlnet):
    with pytest.raises(InputError, match="a control image goes with a ControlNet"):
        generate(BlipDiffusionPipeline(model), control_image=canny_edges(COFFEE))
    with pytest.raises(InputError, match="a control image goes with a ControlNet"):
        generate(BlipDiffusionPipeline(model, controlnet=zero_controlnet))


def test_canny_edges_are_made_as_lavis_makes_them():
    photo = skimage.data.coffee()  # 400 x 600
    edges = np.asarray(canny_edges(Image.fromarray(photo)))
    # the short side to 512, both sides rounded to multiples of 64, enlarged with Lanczos; Canny 30 / 70
    assert edges.shape == (512, 768, 3)
    expected = cv2.Canny(cv2.resize(photo, (768, 512), interpolation=cv2.INTER_LANCZOS4), 30, 70)
    assert np.array_equal(edges[..., 0], expected) and np.array_equal(edges[..., 0], edges[..., 2])
    assert set(np.unique(edges)) == {0, 255}
    shrunk = resize_to_resolution(np.zeros((1200, 900, 3), np.uint8), 512)
    assert shrunk.shape == (704, 512, 3)  # 682.7 rounds to 704
    # other thresholds find fewer edges
    assert np.count_nonzero(np.asarray(canny_edges(Image.fromarray(photo), 100, 200))) < np.count_nonzero(edges)


def test_a_ready_map_is_used_as_it_is_and_transparency_goes_over_white():
    depth = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8))
    assert np.array_equal(np.asarray(control_map(depth, "none"))[..., 1], np.asarray(depth))
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert np.asarray(control_map(clear, "none")).min() == 255
    with pytest.raises(InputError, match="control kind 'depth'"):
        control_map(depth, "depth")


def test_interpolation_weights_one_and_zero_give_exactly_each_subjects_own_image(model):
    pipeline = BlipDiffusionPipeline(model)
    cat_alone = generate(pipeline)
    astronaut_alone = generate(pipeline, subject=ASTRONAUT, category="person")
    subjects, categories = [CAT, ASTRONAUT], ["cat", "person"]
    first = pipeline.mixed_subject_embedding(subjects, categories, [1.0, 0.0])
    second = pipeline.mixed_subject_embedding(subjects, categories, [0.0, 1.0])
    assert np.array_equal(generate(pipeline, subject=None, subject_embeddings=first), cat_alone)
    assert np.array_equal(generate(pipeline, subject=None, category="person", subject_embeddings=second),
                          astronaut_alone)
    halfway = pipeline.mixed_subject_embedding(subjects, categories, [0.5, 0.5])
    expected = (pipeline.subject_embeddings([CAT], ["cat"]) + pipeline.subject_embeddings([ASTRONAUT], ["person"])) / 2
    assert torch.allclose(halfway, expected, atol=1e-6)
    assert not np.array_equal(generate(pipeline, subject=None, subject_embeddings=halfway), cat_alone)


@pytest.mark.parametrize("weights, words", [([0.5, 0.6], "summing to 1"), ([1.2, -0.2], "non-negative"),
                                            ([1.0], "1 subject weights for 2")])
def test_interpolation_weights_that_are_no_shares_are_refused(model, weights, words):
    with pytest.raises(InputError, match=words):
        BlipDiffusionPipeline(model).mixed_subject_embedding([CAT, ASTRONAUT], ["cat", "person"], weights)


def test_the_grid_weights_are_bilinear_with_the_subjects_at_the_corners():
    cells = grid_weights(3)
    assert cells[0] == [1, 0, 0, 0] and cells[2] == [0, 1, 0, 0] and cells[6] == [0, 0, 1, 0]
    assert cells[8] == [0, 0, 0, 1] and cells[4] == [0.25, 0.25, 0.25, 0.25]
    assert cells[1] == [0.5, 0.5, 0, 0]
    assert all(abs(sum(cell) - 1) < 1e-12 for cell in grid_weights(5))


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model, trained_controlnet) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("controlled")
    model.save_pretrained(root / "model")
    trained_controlnet.save_pretrained(root / "controlnet")
    for name, image in (("cat", CAT), ("astronaut", ASTRONAUT), ("coffee", COFFEE), ("rocket", ROCKET)):
        image.save(root / f"{name}.png")
    return {"root": root, "model": root / "model", "controlnet": root / "controlnet"}


def run(*arguments: str):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def test_style_transfer_on_the_command_line_is_a_style_subject_on_a_scenes_canny_edges(folders):
    """LAVIS's stylization: the style subject's embedding (a cat here), the target category and prompt, and the
    ControlNet following the Canny edges of another scene."""
    root = folders["root"]
    result = run("generate", "--model", folders["model"], "--subject-image", root / "cat.png", "--category", "cat",
                 "--target-category", "cup", "--prompt", "on a marble table", "--controlnet", folders["controlnet"],
                 "--control-image", root / "coffee.png", "--steps", STEPS, "--out", root / "styled.png")
    assert result.exit_code == 0, result.output
    pipeline = BlipDiffusionPipeline.from_pretrained(folders["model"], controlnet=folders["controlnet"])
    (expected,) = pipeline("on a marble table", Image.open(root / "cat.png"), "cat", "cup", num_inference_steps=STEPS,
                           generator=torch.Generator().manual_seed(0), control_image=canny_edges(COFFEE))
    styled = np.asarray(Image.open(root / "styled.png"))
    assert np.array_equal(styled, np.asarray(expected))
    (uncontrolled,) = BlipDiffusionPipeline.from_pretrained(folders["model"])(
        "on a marble table", Image.open(root / "cat.png"), "cat", "cup", num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0))
    assert not np.array_equal(styled, np.asarray(uncontrolled))


def test_interpolation_on_the_command_line_mixes_the_subjects_by_their_weights(folders):
    root = folders["root"]
    common = ["generate", "--model", folders["model"], "--prompt", "on a table", "--steps", STEPS]
    both = ["--subject-image", root / "cat.png", "--subject-image", root / "astronaut.png",
            "--category", "cat", "--category", "person"]
    assert run(*common, *both, "--subject-weights", "1,0", "--out", root / "weighted.png").exit_code == 0
    assert run(*common, "--subject-image", root / "cat.png", "--category", "cat",
               "--out", root / "alone.png").exit_code == 0
    assert np.array_equal(np.asarray(Image.open(root / "weighted.png")), np.asarray(Image.open(root / "alone.png")))
    result = run(*common, *both, "--subject-weights", "0.5,0.6", "--out", root / "bad.png")
    assert result.exit_code == 2 and "summing to 1" in result.output and not (root / "bad.png").exists()
    result = run(*common, *both[:4], "--category", "cat", "--category", "person", "--category", "cup",
                 "--out", root / "bad.png")
    assert result.exit_code == 2 and "3 --category for 2 --subject-image" in result.output


def test_the_interpolation_grid_has_the_four_subjects_at_its_corners(folders):
    root = folders["root"]
    names = ("cat", "astronaut", "coffee", "rocket")
    categories = ("cat", "person", "cup", "rocket")
    arguments = ["interpolate", "--model", folders["model"], "--prompt", "on a table", "--steps", STEPS,
                 "--grid-size", 3, "--out", root / "grid.png"]
    for name, category in zip(names, categories):
        arguments += ["--subject-image", root / f"{name}.png", "--category", category]
    result = run(*arguments)
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(root / "grid.png"))
    assert grid.shape == (192, 192, 3)
    pipeline = BlipDiffusionPipeline.from_pretrained(folders["model"])
    # the top-right corner is the astronaut alone, drawn as the first category names the prompt
    (corner,) = pipeline("on a table", None, "cat", num_inference_steps=STEPS,
                         generator=torch.Generator().manual_seed(0),
                         subject_embeddings=pipeline.subject_embeddings([Image.open(root / "astronaut.png")],
                                                                        ["person"]))
    assert np.array_equal(grid[:64, 128:], np.asarray(corner))
    assert not np.array_equal(grid[64:128, 64:128], grid[:64, :64])  # the centre is a mix


@pytest.mark.parametrize("extra, words", [
    (["--controlnet", "CONTROLNET"], "--controlnet and --control-image go together"),
    (["--controlnet", "nowhere/at/all", "--control-image", "COFFEE"], "--controlnet nowhere/at/all: no such folder"),
    (["--controlnet", "CONTROLNET", "--control-image", "COFFEE", "--control-kind", "depth"], "--control-kind depth"),
    (["--controlnet", "CONTROLNET", "--control-image", "COFFEE", "--canny-thresholds", "30"], "two numbers"),
], ids=["controlnet-alone", "controlnet-not-there", "unknown-kind", "one-threshold"])
def test_bad_control_flags_are_one_line_before_the_model_loads(folders, extra, words):
    root = folders["root"]
    extra = [str(folders["controlnet"]) if item == "CONTROLNET" else str(root / "coffee.png") if item == "COFFEE"
             else item for item in extra]
    result = run("generate", "--model", folders["model"], "--subject-image", root / "cat.png", "--category", "cat",
                 "--prompt", "x", "--out", root / "never.png", *extra)
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not (root / "never.png").exists()
