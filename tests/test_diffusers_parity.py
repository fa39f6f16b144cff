"""The project's BLIP-Diffusion against diffusers' own (0.39.0 under transformers 4.53.3, the last versions it
runs under): a tiny random model built and run by diffusers' classes (tools/diffusers_reference.py) is
committed with its outputs, and the project's model must load it whole and reproduce them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import ControlNetModel
from safetensors.torch import load_file

from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.config import FinetuneConfig
from subjectpairs.training.control_images import canny_edges
from subjectpairs.training.finetune import finetune_into
from subjectpairs.training.model_folders import SUBJECT_EMBEDDING_FILE
from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "tests" / "data" / "diffusers-tiny-blipdiffusion"
SCRIPT = ROOT / "tools" / "diffusers_reference.py"
PARITY_VENV_READY = ROOT / ".parity-venv" / ".installed"  # written by the script once its install completed
TOLERANCE = 1e-5
GREY_LEVELS = 1  # per pixel and channel, of 255


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    with np.load(FOLDER / "reference.npz") as stored:
        return {name: stored[name] for name in stored.files}


@pytest.fixture(scope="module")
def model() -> BlipDiffusion:
    return BlipDiffusion.from_pretrained(FOLDER).eval()


def _saved_weights(part: str) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in sorted((FOLDER / part).glob("*.safetensors")):
        weights.update(load_file(file))
    assert weights, part
    return weights


def test_the_diffusers_folder_loads_with_every_weight(model):
    """Every tensor that diffusers saved is in the project's model, unchanged, and the model has nothing else
    (nothing left at a random initial value)."""
    parts = {"qformer": model.qformer, "text_encoder": model.text_encoder, "unet": model.unet, "vae": model.vae}
    for part, module in parts.items():
        saved = _saved_weights(part)
        if part == "text_encoder":  # transformers 4 nested CLIP's text encoder under text_model.
            saved = {name.removeprefix("text_model."): tensor for name, tensor in saved.items()}
        ours = module.state_dict()
        # diffusers' Q-Former and text encoder save their position-id buffers; ours compute them
        for name in [name for name in saved if name.endswith("position_ids") and name not in ours]:
            position_ids = saved.pop(name)
            assert torch.equal(position_ids.flatten(), torch.arange(position_ids.numel())), f"{part}: {name}"
        assert sorted(set(saved) - set(ours)) == [], f"{part}: saved weights the model does not take"
        assert sorted(set(ours) - set(saved)) == [], f"{part}: weights the folder does not give"
        changed = [name for name, tensor in saved.items() if not torch.equal(ours[name], tensor)]
        assert changed == [], f"{part}: loaded weights differ from the saved ones"


def test_tokenizers_give_diffusers_ids(model, reference):
    ids = model.tokenizer([str(reference["built_prompt"])], padding="max_length", truncation=True,
                          max_length=reference["prompt_ids"].shape[1], return_tensors="pt").input_ids
    assert ids.tolist() == reference["prompt_ids"].tolist()
    assert "[DEC]" in model.qformer_tokenizer.get_vocab()
    assert len(model.qformer_tokenizer) == model.qformer.config.qformer_config.vocab_size


def test_subject_image_preprocessing_matches_diffusers(model, reference):
    pixels = model.subject_pixels(Image.fromarray(reference["reference_image"]))
    np.testing.assert_allclose(pixels.numpy(), reference["pixel_values"], rtol=0, atol=TOLERANCE)


def test_qformer_subject_embeddings_match_diffusers(model, reference):
    with torch.no_grad():
        embeddings = model.subject_embeddings(torch.from_numpy(reference["pixel_values"]), [str(reference["category"])])
    np.testing.assert_allclose(embeddings.numpy(), reference["subject_embeddings"], rtol=0, atol=TOLERANCE)


def test_text_encoder_states_match_diffusers(model, reference):
    """diffusers' states for the inference prompt with the subject embeddings at ``ctx_begin_pos``."""
    at = int(reference["ctx_begin_pos"])
    with torch.no_grad():
        tokens = model.text_encoder.token_embeddings(torch.from_numpy(reference["prompt_ids"]))
        inserted = torch.cat([tokens[:, :at], torch.from_numpy(reference["subject_embeddings"]), tokens[:, at:]], dim=1)
        states = model.text_encoder(inserted)
    np.testing.assert_allclose(states.numpy(), reference["text_states"], rtol=0, atol=TOLERANCE)


def generate_reference(folder: Path | BlipDiffusionPipeline, reference: dict, **options) -> np.ndarray:
    """The project's pipeline on the reference subject, category, prompt and seed, as uint8 (H, W, 3)."""
    pipeline = folder if isinstance(folder, BlipDiffusionPipeline) else BlipDiffusionPipeline.from_pretrained(folder)
    settings = {"guidance_scale": float(reference["guidance"]), "num_inference_steps": int(reference["steps"]),
                "generator": torch.Generator().manual_seed(int(reference["seed"])), **options}
    (image,) = pipeline(str(reference["prompt"]), Image.fromarray(reference["reference_image"]),
                        str(reference["category"]), str(reference["category"]), **settings)
    return np.asarray(image, dtype=np.int16)


def test_generate_reproduces_the_diffusers_image(model, reference):
    """Same weights, subject, prompt and seed: diffusers' image, to a grey level (diffusers rounds
    (x / 2 + 0.5) * 255 as the project does, but the floats on the way may differ in the last place)."""
    expected = reference["generated_uint8"].astype(np.int16)
    assert expected.std() > 10  # a real image, on which a wrong prompt or position shows
    ours = generate_reference(BlipDiffusionPipeline(model), reference)
    assert ours.shape == expected.shape
    assert int(np.abs(ours - expected).max()) <= GREY_LEVELS


@pytest.mark.parametrize("change", ["position", "prompt", "seed"])
def test_the_image_comparison_sees_each_inference_detail(model, reference, monkeypatch, change):
    """Each convention that the parity rests on, changed alone, moves the image past the tolerance, so the
    comparison above would catch it."""
    pipeline = BlipDiffusionPipeline(model)
    options = {}
    if change == "position":
        monkeypatch.setattr(model, "ctx_begin_pos", int(reference["ctx_begin_pos"]) + 1)
    elif change == "prompt":
        options["prompt_reps"] = 1
    else:
        options["generator"] = torch.Generator().manual_seed(int(reference["seed"]) + 1)
    changed = generate_reference(pipeline, reference, **options)
    assert int(np.abs(changed - reference["generated_uint8"].astype(np.int16)).max()) > GREY_LEVELS


def test_the_generate_command_on_the_diffusers_folder_gives_the_diffusers_image(reference, tmp_path):
    subject = tmp_path / "subject.png"
    Image.fromarray(reference["reference_image"]).save(subject)
    out = tmp_path / "generated.png"
    result = CliRunner().invoke(app, [
        "generate", "--model", str(FOLDER), "--subject-image", str(subject), "--category", str(reference["category"]),
        "--prompt", str(reference["prompt"]), "--out", str(out), "--steps", str(int(reference["steps"])),
        "--guidance", str(float(reference["guidance"])), "--seed", str(int(reference["seed"]))])
    assert result.exit_code == 0, result.output
    ours = np.asarray(Image.open(out), dtype=np.int16)
    assert int(np.abs(ours - reference["generated_uint8"].astype(np.int16)).max()) <= GREY_LEVELS


def _check_export(folder: Path, *options: str) -> subprocess.CompletedProcess:
    if not PARITY_VENV_READY.exists():
        pytest.skip(f"no {PARITY_VENV_READY.parent.name}/: create it with "
                    f"`python3 {SCRIPT.relative_to(ROOT)} --venv-only`")
    return subprocess.run([sys.executable, str(SCRIPT), "--check-export", str(folder), *options],
                          capture_output=True, text=True, timeout=300)


def test_an_export_loads_into_diffusers_classes(tmp_path):
    """The project's export, loaded component by component with diffusers' classes (in .parity-venv, where
    they run), has no missing or unexpected weight and its tokenizers load."""
    folder = BlipDiffusion.from_config("tiny", seed=0).save_pretrained(tmp_path / "export")
    checked = _check_export(folder)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_fine_tuned_folder_loads_into_diffusers_classes_and_generates_there_as_here(model, reference, tmp_path):
    """``subjectpairs finetune``'s folder is an export with a changed UNet and the cached embedding beside it:
    diffusers' classes load every component of it, and its pipeline (which knows no cached embedding and
    embeds the subject photo) gives the image the project's pipeline gives from the same photo."""
    out = tmp_path / "fine-tuned"
    photo = Image.fromarray(reference["reference_image"])
    tune = FinetuneConfig(model=str(FOLDER), subject_dir=str(tmp_path), category=str(reference["category"]),
                          out=str(out), steps=2, lr=1e-3)
    finetune_into(BlipDiffusion.from_pretrained(FOLDER), [photo, photo.transpose(Image.FLIP_LEFT_RIGHT)], tune, [])
    assert (out / SUBJECT_EMBEDDING_FILE).is_file()
    theirs_file = tmp_path / "theirs.npy"
    checked = _check_export(out, "--generate-to", str(theirs_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    theirs = np.load(theirs_file).astype(np.int16)
    assert int(np.abs(generate_reference(out, reference) - theirs).max()) <= GREY_LEVELS
    # the UNet did change: the image is not the base model's
    assert int(np.abs(theirs - reference["generated_uint8"].astype(np.int16)).max()) > GREY_LEVELS


def test_an_export_generates_the_same_image_in_diffusers_as_here(model, reference, tmp_path):
    """The diffusers folder loaded here and exported again: diffusers' pipeline on the export and the
    project's give one image (the reference's, since the weights are the same)."""
    folder = model.save_pretrained(tmp_path / "export")
    theirs_file = tmp_path / "theirs.npy"
    checked = _check_export(folder, "--generate-to", str(theirs_file))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    theirs = np.load(theirs_file).astype(np.int16)
    ours = generate_reference(folder, reference)
    assert int(np.abs(ours - theirs).max()) <= GREY_LEVELS
    assert int(np.abs(theirs - reference["generated_uint8"].astype(np.int16)).max()) <= GREY_LEVELS


def test_controlnet_generation_gives_diffusers_controlnet_pipelines_image(model, reference, tmp_path):
    """diffusers' BlipDiffusionControlNetPipeline and the project's pipeline with the same ControlNet and control
    map (at the output size, which both then take as it is) give one image; the ControlNet, with non-zero
    output convolutions as after training, changes the image."""
    controlnet = ControlNetModel.from_unet(model.unet)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.5)
    controlnet.save_pretrained(tmp_path / "controlnet")
    side = reference["generated_uint8"].shape[0]
    control = canny_edges(Image.fromarray(reference["reference_image"])).resize((side, side))
    control.save(tmp_path / "control.png")
    theirs_file = tmp_path / "theirs.npy"
    checked = _check_export(FOLDER, "--generate-to", str(theirs_file), "--controlnet", str(tmp_path / "controlnet"),
                            "--control-image", str(tmp_path / "control.png"))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    theirs = np.load(theirs_file).astype(np.int16)
    pipeline = BlipDiffusionPipeline(model, controlnet=ControlNetModel.from_pretrained(tmp_path / "controlnet"))
    ours = generate_reference(pipeline, reference, control_image=Image.open(tmp_path / "control.png"))
    assert int(np.abs(ours - theirs).max()) <= GREY_LEVELS
    assert int(np.abs(theirs - reference["generated_uint8"].astype(np.int16)).max()) > GREY_LEVELS
