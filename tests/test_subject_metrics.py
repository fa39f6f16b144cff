"""DreamBench's DINO, CLIP-I and CLIP-T (``training.subject_metrics``) against the definitions computed here
with transformers itself, on real DreamBench photos, with the tiny CLIP and ViT of the conftest."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

from subjectpairs.errors import InputError
from subjectpairs.training.subject_metrics import (
    ImageFeatures, SubjectScorer, prompt_fidelity, real_image_oracle, subject_fidelity,
)

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"
TOLERANCE = 1e-5


def dreambench_photos(subject: str) -> list[Image.Image]:
    folder = DREAMBENCH / subject
    if not folder.is_dir():
        pytest.skip(f"no DreamBench photos at {folder}")
    return [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.jpg"))]


@pytest.fixture(scope="module")
def scorer(tiny_clip, tiny_dino) -> SubjectScorer:
    return SubjectScorer(str(tiny_clip), str(tiny_dino), device="cpu")


@pytest.fixture(scope="module")
def real() -> list[Image.Image]:
    """The dog's photos: the subject's real images."""
    return dreambench_photos("dog")


@pytest.fixture(scope="module")
def generated() -> list[Image.Image]:
    """Stand-ins for generated images: photos of other subjects at generation-like sizes, a greyscale one
    (the scorer converts it to RGB), and a mirrored photo of the dog itself."""
    cat, teapot, dog = dreambench_photos("cat"), dreambench_photos("teapot"), dreambench_photos("dog")
    return [cat[0].resize((64, 64)), cat[1].resize((96, 64)), teapot[0].resize((64, 64)).convert("L"),
            ImageOps.mirror(dog[2]).resize((80, 80))]


PROMPTS = ["a dog in the jungle", "a dog wearing a santa hat", "a cube shaped dog", "a dog on the beach"]


# -- the definitions, written out with transformers ------------------------------------------------------

@torch.no_grad()
def direct_dino(folder: Path, images: list[Image.Image]) -> torch.Tensor:
    """The CLS token of the ViT's last hidden state (not normalised)."""
    model = ViTModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    processor = ViTImageProcessor.from_pretrained(str(folder))
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
    return model(pixel_values=pixels).last_hidden_state[:, 0]


@torch.no_grad()
def direct_clip_image(folder: Path, images: list[Image.Image]) -> torch.Tensor:
    """CLIP's projected image features: visual_projection of the vision tower's pooled output."""
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPProcessor.from_pretrained(str(folder))
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
    return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)


@torch.no_grad()
def direct_clip_text(folder: Path, texts: list[str]) -> torch.Tensor:
    """CLIP's projected text features: text_projection of the text tower's pooled output."""
    model = CLIPModel.from_pretrained(str(folder)).eval()
    processor = CLIPProcessor.from_pretrained(str(folder))
    tokens = processor(text=texts, return_tensors="pt", padding=True, truncation=True)
    pooled = model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
    return model.text_projection(pooled)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double()[None], b.double()[None])[0])


def mean_pair_cosine(generated: torch.Tensor, real: torch.Tensor) -> list[float]:
    """Per generated image, its cosine with each real photo, averaged over the photos (DreamBooth's score)."""
    return [sum(cosine(g, r) for r in real) / len(real) for g in generated]


# -- (a) the metrics are DreamBooth's definitions -------------------------------------------------------

def test_dino_is_the_mean_over_real_photos_of_the_cls_token_cosine(scorer, tiny_dino, real, generated):
    scores = subject_fidelity(scorer.image_features(generated), scorer.image_features(real))["dino"]
    gen, ref = direct_dino(tiny_dino, generated), direct_dino(tiny_dino, real)
    expected = mean_pair_cosine(gen, ref)
    assert scores.shape == (len(generated),)
    assert scores.tolist() == pytest.approx(expected, abs=TOLERANCE)
    # the two readings one could mistake it for give other numbers, so the comparison above tells them apart
    to_mean_feature = [cosine(g, F.normalize(ref, dim=-1).mean(dim=0)) for g in gen]
    to_first_photo = [cosine(g, ref[0]) for g in gen]
    assert max(abs(a - b) for a, b in zip(expected, to_mean_feature)) > 100 * TOLERANCE
    assert max(abs(a - b) for a, b in zip(expected, to_first_photo)) > 100 * TOLERANCE


def test_clip_i_is_the_mean_over_real_photos_of_the_projected_image_feature_cosine(scorer, tiny_clip, real,
                                                                                   generated):
    scores = subject_fidelity(scorer.image_features(generated), scorer.image_features(real))["clip_i"]
    gen, ref = direct_clip_image(tiny_clip, generated), direct_clip_image(tiny_clip, real)
    expected = mean_pair_cosine(gen, ref)
    assert scores.tolist() == pytest.approx(expected, abs=TOLERANCE)
    to_mean_feature = [cosine(g, F.normalize(ref, dim=-1).mean(dim=0)) for g in gen]
    assert max(abs(a - b) for a, b in zip(expected, to_mean_feature)) > 100 * TOLERANCE
    # the projection matters: the vision tower's pooled output alone would score differently
    with torch.no_grad():
        model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
        pixels = CLIPProcessor.from_pretrained(str(tiny_clip))(images=generated + real, return_tensors="pt")
        pooled = model.vision_model(pixel_values=pixels.pixel_values).pooler_output
    unprojected = mean_pair_cosine(pooled[: len(generated)], pooled[len(generated):])
    assert max(abs(a - b) for a, b in zip(expected, unprojected)) > 100 * TOLERANCE


def test_clip_t_is_the_cosine_of_each_image_with_its_own_prompt(scorer, tiny_clip, generated):
    scores = prompt_fidelity(scorer.image_features(generated), scorer.text_features(PROMPTS))
    images, texts = direct_clip_image(tiny_clip, generated), direct_clip_text(tiny_clip, PROMPTS)
    expected = [cosine(image, text) for image, text in zip(images, texts)]
    assert scores.shape == (len(generated),)
    assert scores.tolist() == pytest.approx(expected, abs=TOLERANCE)
    # row-wise: image i with prompt i, not with the others
    shifted = [cosine(image, text) for image, text in zip(images, texts.roll(1, dims=0))]
    assert max(abs(a - b) for a, b in zip(expected, shifted)) > 100 * TOLERANCE


def test_scores_do_not_depend_on_the_batch_an_image_is_scored_in(scorer, real, generated):
    together = subject_fidelity(scorer.image_features(generated), scorer.image_features(real))
    for index, image in enumerate(generated):
        alone = subject_fidelity(scorer.image_features([image]), scorer.image_features(real))
        assert float(alone["dino"][0]) == pytest.approx(float(together["dino"][index]), abs=TOLERANCE)
        assert float(alone["clip_i"][0]) == pytest.approx(float(together["clip_i"][index]), abs=TOLERANCE)


# -- (b) the real-image oracle ----------------------------------------------------------------------------

def test_the_real_image_oracle_averages_every_ordered_pair_of_distinct_photos(scorer, tiny_clip, tiny_dino,
                                                                              real):
    oracle = real_image_oracle(scorer.image_features(real))
    dino, clip = direct_dino(tiny_dino, real), direct_clip_image(tiny_clip, real)
    pairs = list(itertools.permutations(range(len(real)), 2))
    assert len(pairs) == len(real) * (len(real) - 1)
    expected_dino = sum(cosine(dino[i], dino[j]) for i, j in pairs) / len(pairs)
    expected_clip = sum(cosine(clip[i], clip[j]) for i, j in pairs) / len(pairs)
    assert oracle["dino"] == pytest.approx(expected_dino, abs=TOLERANCE)
    assert oracle["clip_i"] == pytest.approx(expected_clip, abs=TOLERANCE)
    # a photo against itself (cosine 1) is left out: with the diagonal the mean would be higher
    with_self = (sum(cosine(dino[i], dino[j]) for i in range(len(real)) for j in range(len(real)))
                 / len(real) ** 2)
    assert with_self - oracle["dino"] > 100 * TOLERANCE


def test_the_real_image_oracle_of_a_single_photo_is_an_input_error(scorer, real):
    with pytest.raises(InputError, match="needs two photos"):
        real_image_oracle(scorer.image_features(real[:1]))


def test_the_oracle_of_two_photos_is_their_cosine(scorer, tiny_dino, real):
    oracle = real_image_oracle(scorer.image_features(real[:2]))
    dino = direct_dino(tiny_dino, real[:2])
    assert oracle["dino"] == pytest.approx(cosine(dino[0], dino[1]), abs=TOLERANCE)


# -- (c) features -----------------------------------------------------------------------------------------

def test_image_and_text_features_are_unit_length(scorer, tiny_clip, tiny_dino, generated):
    features = scorer.image_features(generated)
    assert isinstance(features, ImageFeatures)
    assert features.dino.shape == (len(generated), 32)  # the tiny ViT's width
    assert features.clip.shape == (len(generated), 16)  # the tiny CLIP's projection
    text = scorer.text_features(PROMPTS)
    assert text.shape == (len(PROMPTS), 16)
    for rows in (features.dino, features.clip, text):
        assert rows.dtype == torch.float32 and rows.device.type == "cpu"
        assert torch.linalg.vector_norm(rows, dim=1).tolist() == pytest.approx([1.0] * len(rows), abs=1e-6)
    # normalised, not raw: the raw features are not unit length, so this checks the scorer's normalising
    raw = direct_dino(tiny_dino, generated)
    assert not torch.allclose(torch.linalg.vector_norm(raw, dim=1), torch.ones(len(generated)), atol=1e-3)
    assert torch.allclose(features.dino, F.normalize(raw, dim=-1), atol=TOLERANCE)


# -- (d) model paths ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--clip-model", "--dino-model"])
def test_a_folder_without_the_model_is_an_input_error_naming_the_flag(tmp_path, tiny_clip, tiny_dino, flag):
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    models = {"--clip-model": str(tiny_clip), "--dino-model": str(tiny_dino), flag: str(missing)}
    with pytest.raises(InputError, match=flag) as raised:
        SubjectScorer(models["--clip-model"], models["--dino-model"])
    assert str(missing) in str(raised.value)


def test_a_model_path_that_is_not_there_is_an_input_error_naming_the_flag(tmp_path, tiny_clip, tiny_dino):
    with pytest.raises(InputError, match="--clip-model"):
        SubjectScorer(str(tmp_path / "no" / "such" / "clip"), str(tiny_dino))
    with pytest.raises(InputError, match="--dino-model"):
        SubjectScorer(str(tiny_clip), str(tmp_path / "no" / "such" / "dino"))


def test_a_dino_model_of_another_architecture_is_an_input_error_naming_the_flag(tiny_clip, tiny_dino):
    """transformers would load it with a warning and random weights: every score would be noise."""
    with pytest.raises(InputError, match="--dino-model .*a clip model, not vit"):
        SubjectScorer(str(tiny_clip), str(tiny_clip))
    with pytest.raises(InputError, match="--clip-model .*a vit model, not clip"):
        SubjectScorer(str(tiny_dino), str(tiny_dino))


def test_a_dino_checkpoint_with_a_weight_missing_is_an_input_error_naming_it(tmp_path, tiny_clip, tiny_dino):
    import shutil

    from safetensors.torch import load_file, save_file

    damaged = tmp_path / "dino"
    shutil.copytree(tiny_dino, damaged)
    weights = load_file(damaged / "model.safetensors")
    dropped = sorted(name for name in weights if "layernorm" in name)[0]
    del weights[dropped]
    save_file(weights, damaged / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=f"--dino-model .*weights missing.*{dropped.rsplit('.', 2)[-2]}"):
        SubjectScorer(str(tiny_clip), str(damaged))


def test_a_clip_folder_without_its_processor_is_an_input_error_naming_the_clip_flag(tmp_path, tiny_clip,
                                                                                    tiny_dino):
    weights_only = tmp_path / "clip-weights-only"
    CLIPModel.from_pretrained(str(tiny_clip)).save_pretrained(weights_only)
    with pytest.raises(InputError, match="--clip-model"):
        SubjectScorer(str(weights_only), str(tiny_dino))


# -- (e) an image against itself ------------------------------------------------------------------------

def test_an_image_scores_dino_one_against_itself_only(scorer, real):
    photo, others = real[0], real[1:]
    itself = subject_fidelity(scorer.image_features([photo]), scorer.image_features([photo]))
    assert float(itself["dino"][0]) == pytest.approx(1.0, abs=1e-6)
    assert float(itself["clip_i"][0]) == pytest.approx(1.0, abs=1e-6)
    against_others = subject_fidelity(scorer.image_features([photo]), scorer.image_features(others))
    assert float(against_others["dino"][0]) < 1.0 - 100 * TOLERANCE
    against_all = subject_fidelity(scorer.image_features([photo]), scorer.image_features(real))
    # averaged with the other photos, the perfect match no longer scores 1
    assert float(against_all["dino"][0]) < 1.0 - 100 * TOLERANCE
    assert float(against_all["dino"][0]) == pytest.approx(
        (1.0 + float(against_others["dino"][0]) * len(others)) / len(real), abs=TOLERANCE)
