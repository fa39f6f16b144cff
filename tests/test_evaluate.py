"""The DreamBench evaluation (``subjectpairs evaluate``) and subject fine-tuning (``subjectpairs finetune``) on
the real DreamBench photos and prompt file, with a tiny random BLIP-Diffusion and tiny CLIP and DINO models:
the outputs and their layout, the metrics' definitions, determinism and resumption after a kill, the
fine-tuned mode, bad input, and the in-memory ``quick_evaluation`` of training."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from subjectpairs.cli import app

DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"
if not (DREAMBENCH / "prompts_and_classes.txt").is_file():
    pytest.skip(f"no DreamBench copy at {DREAMBENCH}", allow_module_level=True)

runner = CliRunner()
SUBJECTS = ["dog", "teapot"]
IMAGES_PER_PROMPT = 2
PROMPTS = 25  # DreamBench's prompts per subject
METRICS = ("dino", "clip_i", "clip_t")
COLUMNS = ("subject", "class", "prompt", "seed", "index", "image", *METRICS)


def one_line_error(result) -> str:
    """The output of a command that stopped on bad input: exit code 2, one line, no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: "), result.output
    return lines[0]


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def assert_same_image(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal but for a float's last bits under another thread count: a few pixels a level apart at most."""
    assert ours.shape == theirs.shape
    difference = np.abs(ours - theirs)
    assert difference.max() <= 1 and difference.mean() < 0.01, (difference.max(), difference.mean())


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from subjectpairs.training.blip_diffusion import BlipDiffusion

    return BlipDiffusion.from_config("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def metric_flags(tiny_clip, tiny_dino) -> list[str]:
    return ["--clip-model", str(tiny_clip), "--dino-model", str(tiny_dino)]


def evaluate_args(model_folder: Path, out: Path, metric_flags: list[str], *extra: str,
                  dreambench: Path = DREAMBENCH) -> list[str]:
    return ["evaluate", "--model", str(model_folder), "--dreambench", str(dreambench), "--out", str(out),
            *metric_flags, *extra]


ZERO_SHOT = ("--subjects", ",".join(SUBJECTS), "--images-per-prompt", str(IMAGES_PER_PROMPT), "--steps", "2")


@pytest.fixture(scope="module")
def zero_shot(tmp_path_factory, model_folder, metric_flags):
    """Run A: zero-shot, dog and teapot, 2 images per prompt, 2 denoising steps, via the command line."""
    out = tmp_path_factory.mktemp("evaluations") / "zero-shot"
    result = runner.invoke(app, evaluate_args(model_folder, out, metric_flags, *ZERO_SHOT))
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def bench_copy(tmp_path_factory) -> Path:
    """The prompt file with the dog's and the teapot's photos, in a folder the tests may write beside."""
    folder = tmp_path_factory.mktemp("bench") / "dreambench"
    folder.mkdir()
    shutil.copy(DREAMBENCH / "prompts_and_classes.txt", folder)
    for subject in SUBJECTS:
        shutil.copytree(DREAMBENCH / subject, folder / subject)
    return folder


# --- units and prompts, no models -------------------------------------------------------------------------------


def test_units_cover_every_prompt_and_seed_and_name_their_files():
    from subjectpairs.training.dreambench import read_dreambench
    from subjectpairs.training.evaluation import plan_units

    bench = read_dreambench(DREAMBENCH)
    subjects = bench.subjects(SUBJECTS)
    units = plan_units(bench, subjects, [0, 7])
    assert len(units) == PROMPTS * len(SUBJECTS) * 2
    assert len({(u.subject, u.prompt_index, u.seed) for u in units}) == len(units)
    dog = [u for u in units if u.subject == "dog" and u.seed == 7]
    assert [u.prompt for u in dog] == bench.prompts(subjects[0])
    first = dog[0]
    assert (first.category, first.prompt_index, first.prompt) == ("dog", 0, "a dog in the jungle")
    assert first.image_path(3) == "images/dog/00-seed7-3.png"
    assert first.record_path == "records/dog/00-seed7.json"
    assert len({u.record_path for u in units}) == len(units)


@pytest.mark.parametrize("prompt, category, given", [
    ("a dog in the jungle", "dog", "in the jungle"),
    ("a teapot floating on top of water", "teapot", "floating on top of water"),
    ("a red teapot", "teapot", "a red teapot"),  # the class is not at the start: the prompt whole
    ("a cube shaped teapot", "teapot", "a cube shaped teapot"),
    ("a dog wearing a santa hat", "dog", "wearing a santa hat"),
    ("a doghouse in the snow", "dog", "a doghouse in the snow"),  # "a dog" is not "a dog "
])
def test_generation_prompt_drops_the_lead_the_pipeline_puts_back(prompt, category, given):
    from subjectpairs.training.evaluation import generation_prompt

    assert generation_prompt(prompt, category) == given


# --- a zero-shot run --------------------------------------------------------------------------------------------


def test_zero_shot_run_writes_one_row_per_image_and_a_summary_of_them(zero_shot):
    out, output = zero_shot
    total = PROMPTS * len(SUBJECTS) * IMAGES_PER_PROMPT
    assert f"zero-shot: {total} images of {len(SUBJECTS)} subjects ({total} made now" in output
    assert "paper: 0.594 / 0.779 / 0.300" in output

    table = pd.read_parquet(out / "metrics.parquet")
    assert set(COLUMNS) <= set(table.columns)
    assert len(table) == total
    assert list(table["subject"].unique()) == SUBJECTS
    assert set(table["seed"]) == {0} and set(table["index"]) == set(range(IMAGES_PER_PROMPT))
    assert dict(zip(table["subject"], table["class"])) == {"dog": "dog", "teapot": "teapot"}
    assert len(table.drop_duplicates(["subject", "prompt", "seed", "index"])) == total
    for metric in METRICS:
        assert table[metric].map(math.isfinite).all() and table[metric].between(-1, 1).all(), metric
    for image in table["image"]:
        assert not Path(image).is_absolute() and image.startswith("images/"), image
        assert (out / image).is_file(), image
    assert len(set(table["image"])) == total
    assert len(list((out / "images").rglob("*.png"))) == total

    # DreamBench's prompts with the unique token dropped: the live list for the dog, the object list for the teapot
    prompts = {subject: set(group["prompt"]) for subject, group in table.groupby("subject")}
    assert all(len(found) == PROMPTS for found in prompts.values())
    assert {"a dog in the jungle", "a dog wearing a santa hat", "a red dog", "a dog in a purple wizard outfit"} \
        <= prompts["dog"]
    assert {"a teapot floating on top of water", "a teapot in the jungle", "a cube shaped teapot"} <= prompts["teapot"]
    assert "a teapot wearing a santa hat" not in prompts["teapot"]
    assert "a dog floating on top of water" not in prompts["dog"]
    for prompt in table["prompt"]:
        assert "{" not in prompt and "  " not in prompt and prompt == prompt.strip(), prompt

    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "zero-shot" and summary["images"] == total
    assert summary["finetune_steps"] is None
    for metric in METRICS:
        assert summary[metric] == pytest.approx(table[metric].mean(), abs=1e-9), metric
    assert list(summary["subjects"]) == SUBJECTS
    for subject, group in table.groupby("subject"):
        figures = summary["subjects"][subject]
        assert figures["class"] == subject and figures["images"] == PROMPTS * IMAGES_PER_PROMPT
        for metric in METRICS:
            assert figures[metric] == pytest.approx(group[metric].mean(), abs=1e-9), (subject, metric)
    assert set(summary["oracle"]["subjects"]) == set(SUBJECTS)
    for subject in SUBJECTS:
        oracle = summary["oracle"]["subjects"][subject]
        assert oracle["photos"] == len(list((DREAMBENCH / subject).glob("*.jpg")))
        assert -1 <= oracle["dino"] <= 1 and -1 <= oracle["clip_i"] <= 1
    for metric in ("dino", "clip_i"):
        assert summary["oracle"][metric] == pytest.approx(
            np.mean([summary["oracle"]["subjects"][s][metric] for s in SUBJECTS]), abs=1e-12)
    assert summary["paper"]["table1"] == {"dino": 0.594, "clip_i": 0.779, "clip_t": 0.300}
    assert summary["paper"]["real images"]["dino"] == 0.774
    assert re.fullmatch(r"[0-9a-f]{64}", summary["model_hash"])
    config = summary["config"]
    assert config["steps"] == 2 and config["images_per_prompt"] == IMAGES_PER_PROMPT
    assert config["subjects"] == SUBJECTS and config["seeds"] == [0]
    assert "out" not in config  # where the run was written is no setting of its figures

    with Image.open(out / "report.png") as report:
        report.load()
        assert report.format == "PNG" and min(report.size) > 100


def test_the_model_hash_is_of_the_model_folder(zero_shot, model_folder, tmp_path):
    from subjectpairs.training.evaluation_job import model_hash

    summary = json.loads((zero_shot[0] / "summary.json").read_text())
    assert model_hash(str(model_folder)) == summary["model_hash"]
    changed = shutil.copytree(model_folder, tmp_path / "changed")
    (changed / "unet" / "config.json").write_text((changed / "unet" / "config.json").read_text() + "\n")
    assert model_hash(str(changed)) != summary["model_hash"]


def test_metrics_are_dreambooths_definitions_recomputed_from_the_saved_files(zero_shot, tiny_clip, tiny_dino):
    """DINO and CLIP-I: the mean cosine similarity of the image's features to each of the subject's photos;
    CLIP-T: of the image's and the (full) prompt's CLIP features; the oracle: of every photo to the others."""
    from subjectpairs.training.subject_metrics import SubjectScorer

    out, _ = zero_shot
    table = pd.read_parquet(out / "metrics.parquet")
    summary = json.loads((out / "summary.json").read_text())
    scorer = SubjectScorer(str(tiny_clip), str(tiny_dino))
    for subject, index in (("teapot", 1), ("dog", 0)):
        row = table[(table["subject"] == subject) & (table["index"] == index)].iloc[len(table) // 8]
        with Image.open(out / row["image"]) as image:
            generated = scorer.image_features([image.convert("RGB")])
        photos = []
        for path in sorted((DREAMBENCH / subject).glob("*.jpg")):
            with Image.open(path) as photo:
                photos.append(photo.convert("RGB"))
        real = scorer.image_features(photos)
        cosine = torch.nn.functional.cosine_similarity
        dino = cosine(generated.dino, real.dino).mean().item()  # (1, D) against (P, D): one per photo
        clip_i = cosine(generated.clip, real.clip).mean().item()
        clip_t = cosine(generated.clip, scorer.text_features([row["prompt"]])).item()
        assert row["dino"] == pytest.approx(dino, abs=1e-5)
        assert row["clip_i"] == pytest.approx(clip_i, abs=1e-5)
        assert row["clip_t"] == pytest.approx(clip_t, abs=1e-5)

        pairs = [(i, j) for i in range(len(photos)) for j in range(len(photos)) if i != j]
        oracle = summary["oracle"]["subjects"][subject]
        assert oracle["dino"] == pytest.approx(
            np.mean([cosine(real.dino[i], real.dino[j], dim=0).item() for i, j in pairs]), abs=1e-5)
        assert oracle["clip_i"] == pytest.approx(
            np.mean([cosine(real.clip[i], real.clip[j], dim=0).item() for i, j in pairs]), abs=1e-5)


def test_a_worker_without_ray_writes_the_same_unit(zero_shot, tiny_clip, tiny_dino, model_folder, tmp_path):
    """EvaluationWorker on its own: a unit's images (seed 0, one batch, the subject's first photo) and rows
    are the run's, and its files land where the run put them."""
    from subjectpairs.training.config import EvaluateConfig
    from subjectpairs.training.dreambench import read_dreambench
    from subjectpairs.training.evaluation import EvaluationWorker, plan_units, read_photos

    out, _ = zero_shot
    config = EvaluateConfig(model=str(model_folder), dreambench=str(DREAMBENCH), out=str(tmp_path / "out"),
                            subjects=["teapot"], images_per_prompt=IMAGES_PER_PROMPT, steps=2,
                            clip_model=str(tiny_clip), dino_model=str(tiny_dino))
    bench = read_dreambench(DREAMBENCH)
    subject = bench.subject("teapot")
    unit = plan_units(bench, [subject], [0])[13]
    assert unit.prompt == "a teapot floating on top of water"
    result = EvaluationWorker(config, device="cpu").run(subject, read_photos(subject), [unit], str(tmp_path / "out"),
                                                        None, oracle=False)
    assert result["oracle"] is None
    assert json.loads((tmp_path / "out" / unit.record_path).read_text()) == result["rows"]
    expected = json.loads((out / unit.record_path).read_text())
    assert len(result["rows"]) == len(expected) == IMAGES_PER_PROMPT
    for ours, theirs in zip(result["rows"], expected):
        assert {k: v for k, v in ours.items() if k not in METRICS} == {k: v for k, v in theirs.items()
                                                                      if k not in METRICS}
        for metric in METRICS:
            assert ours[metric] == pytest.approx(theirs[metric], abs=1e-4)
        # other thread counts than the Ray worker's may move a float's last bits: a pixel by one level at most
        assert_same_image(pixels(tmp_path / "out" / ours["image"]), pixels(out / theirs["image"]))


# --- determinism, resumption, a changed setting -----------------------------------------------------------------


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def test_a_run_killed_halfway_resumes_to_the_same_images_and_summary(zero_shot, model_folder, tiny_clip, tiny_dino,
                                                                     tmp_path):
    from subjectpairs.training.config import EvaluateConfig
    from subjectpairs.training.evaluation_job import run_evaluation

    first, _ = zero_shot
    resumed = shutil.copytree(first, tmp_path / "resumed")
    # what a kill leaves: half of the units' records (and the dog's oracle) missing, their images missing or
    # one torn, no outputs, and the lock of a process that is gone
    removed_units = 0
    for subject in SUBJECTS:
        records = sorted(p for p in (resumed / "records" / subject).glob("*.json") if p.name != "oracle.json")
        assert len(records) == PROMPTS
        for record in records[1::2]:
            record.unlink()
            removed_units += 1
            for image in (resumed / "images" / subject).glob(f"{record.stem}-*.png"):
                image.unlink()
    (resumed / "records" / "dog" / "oracle.json").unlink()
    torn = resumed / "images" / "teapot" / "03-seed0-1.png"
    assert not (resumed / "records" / "teapot" / "03-seed0.json").exists()
    torn.write_bytes(b"\x89PNG half")
    for name in ("summary.json", "metrics.parquet", "report.png"):
        (resumed / name).unlink()
    (resumed / ".subjectpairs.lock").write_text(json.dumps(
        {"pid": _dead_pid(), "host": socket.gethostname(), "command": "evaluate", "started": "earlier",
         "token": "gone"}))
    assert removed_units == 24

    config = EvaluateConfig(model=str(model_folder), dreambench=str(DREAMBENCH), out=str(resumed),
                            subjects=SUBJECTS, images_per_prompt=IMAGES_PER_PROMPT, steps=2,
                            clip_model=str(tiny_clip), dino_model=str(tiny_dino))
    report = run_evaluation(config, progress=False)
    assert report.generated == removed_units * IMAGES_PER_PROMPT
    assert not (resumed / ".subjectpairs.lock").exists()

    want, got = files_of(first / "images"), files_of(resumed / "images")
    assert list(got) == list(want)
    assert [name for name in want if got[name] != want[name]] == []  # byte for byte, the torn one too
    assert json.loads((resumed / "summary.json").read_text()) == json.loads((first / "summary.json").read_text())
    assert report.summary == json.loads((first / "summary.json").read_text())
    pd.testing.assert_frame_equal(pd.read_parquet(resumed / "metrics.parquet"),
                                  pd.read_parquet(first / "metrics.parquet"))
    for subject in SUBJECTS:
        assert files_of(resumed / "records" / subject) == files_of(first / "records" / subject)


def test_a_rerun_with_another_setting_is_refused_naming_it(zero_shot, model_folder, metric_flags):
    out, _ = zero_shot
    before = files_of(out)
    changed = [*ZERO_SHOT[:-1], "3"]  # --steps 3
    assert changed[-2] == "--steps"
    line = one_line_error(runner.invoke(app, evaluate_args(model_folder, out, metric_flags, *changed)))
    assert "other settings (steps)" in line and str(out) in line
    line = one_line_error(runner.invoke(app, evaluate_args(model_folder, out, metric_flags, *changed,
                                                           "--guidance", "5")))
    assert "(guidance, steps)" in line
    assert files_of(out) == before


def test_a_rerun_of_a_finished_run_makes_nothing(zero_shot, model_folder, tiny_clip, tiny_dino):
    """Every record is there: no image is made and Ray is not started; the outputs are written again alike."""
    from subjectpairs.training.config import EvaluateConfig
    from subjectpairs.training.evaluation_job import run_evaluation

    out, _ = zero_shot
    before = files_of(out)
    config = EvaluateConfig(model=str(model_folder), dreambench=str(DREAMBENCH), out=str(out), subjects=SUBJECTS,
                            images_per_prompt=IMAGES_PER_PROMPT, steps=2, clip_model=str(tiny_clip),
                            dino_model=str(tiny_dino), address="ray://nowhere.invalid:1")  # run-only: no Ray
    report = run_evaluation(config, progress=False)
    assert report.generated == 0
    after = files_of(out)
    rewritten = ("report.png", "config.yaml")  # config.yaml: now with the run-only address
    assert {name: data for name, data in after.items() if name not in rewritten} == \
        {name: data for name, data in before.items() if name not in rewritten}
    assert "nowhere.invalid" in after["config.yaml"].decode()


# --- fine-tuned ----------------------------------------------------------------------------------------------------


def test_fine_tuned_mode_tunes_each_subject_and_generates_from_its_embedding(tmp_path, model_folder, metric_flags):
    from subjectpairs.training.model_folders import load_subject_embedding
    from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline

    out = tmp_path / "fine-tuned"
    result = runner.invoke(app, evaluate_args(model_folder, out, metric_flags, "--subjects", "teapot",
                                              "--images-per-prompt", "1", "--steps", "2", "--finetune-steps", "2"))
    assert result.exit_code == 0, result.output
    assert "fine-tuned: 25 images of 1 subject (" in result.output
    assert "paper: 0.670 / 0.805 / 0.302" in result.output
    tuned = out / "finetuned" / "teapot"
    assert (tuned / "subject_embedding.safetensors").is_file() and (tuned / "model_index.json").is_file()
    assert [json.loads(line)["step"] for line in (tuned / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "fine-tuned" and summary["finetune_steps"] == 2 and summary["images"] == PROMPTS
    assert summary["paper"]["table1"] == {"dino": 0.670, "clip_i": 0.805, "clip_t": 0.302}
    assert summary["config"]["finetune_steps"] == 2
    assert len(pd.read_parquet(out / "metrics.parquet")) == PROMPTS

    # the images are the fine-tuned model's, from the cached embedding (no subject photo)
    embedding, category = load_subject_embedding(tuned)
    assert category == "teapot"
    pipeline = BlipDiffusionPipeline.from_pretrained(tuned)
    image = pipeline(["floating on top of water"], None, "teapot", guidance_scale=7.5, num_inference_steps=2,
                     generator=torch.Generator().manual_seed(0), subject_embeddings=embedding)[0]
    # (zero-shot from the first photo, or the base model with the embedding, differ from it by up to 3 levels)
    assert_same_image(np.asarray(image, dtype=np.int16), pixels(out / "images" / "teapot" / "13-seed0-0.png"))


def test_finetune_steps_paper_is_the_papers_mean():
    from subjectpairs.training.config import EvaluateConfig
    from subjectpairs.training.evaluation_job import finetune_steps_of

    base = {"model": "m", "dreambench": "d", "out": "o"}
    assert finetune_steps_of(EvaluateConfig(**base, finetune_steps="paper")) == 76
    assert finetune_steps_of(EvaluateConfig(**base, finetune_steps=40)) == 40
    assert finetune_steps_of(EvaluateConfig(**base)) is None


def test_a_subject_named_twice_is_refused_as_a_repeated_seed_is():
    """Named twice, a subject's units would be planned twice and its images counted twice in the summary."""
    from pydantic import ValidationError

    from subjectpairs.training.config import EvaluateConfig

    with pytest.raises(ValidationError, match=r"\['dog'\] named twice"):
        EvaluateConfig(model="m", dreambench="d", out="o", subjects="dog,teapot,dog")
    with pytest.raises(ValidationError, match=r"\[3\] named twice"):
        EvaluateConfig(model="m", dreambench="d", out="o", seeds="3,1,3")


@pytest.mark.parametrize("steps, words", [("abc", "finetune_steps.int: Input should be a valid integer"),
                                          ("0", "fine-tuning needs 1 step or more"),
                                          ("-3", "fine-tuning needs 1 step or more")])
def test_finetune_steps_that_are_no_count_are_one_line_before_ray(steps, words, tmp_path, model_folder, metric_flags):
    out = tmp_path / "out"
    line = one_line_error(runner.invoke(app, evaluate_args(model_folder, out, metric_flags, "--subjects", "dog",
                                                           "--finetune-steps", steps)))
    assert "finetune_steps" in line and words in line, line
    assert not out.exists()


# --- bad input -----------------------------------------------------------------------------------------------------


def _no_prompt_file(tmp_path: Path, bench: Path, model: Path) -> dict:
    folder = tmp_path / "no-prompts"
    shutil.copytree(bench / "dog", folder / "dog")
    return {"--dreambench": folder}


def _model_without_index(tmp_path: Path, bench: Path, model: Path) -> dict:
    folder = shutil.copytree(model, tmp_path / "no-index")
    (folder / "model_index.json").unlink()
    return {"--model": folder}


def _not_an_evaluation(tmp_path: Path, bench: Path, model: Path) -> dict:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    return {}


def _config_of_another_command(tmp_path: Path) -> dict:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("model: m\nsubject_dir: photos\ncategory: dog\nout: o\nsteps: 3\n")
    return {}


def _corrupt_photo(tmp_path: Path, bench: Path, model: Path) -> dict:
    folder = shutil.copytree(bench, tmp_path / "corrupt-bench")
    (folder / "dog" / "02.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return {"--dreambench": folder}


BAD_INPUT = {
    "a corrupt photo": (_corrupt_photo, "02.jpg: cannot read the photo"),
    "unknown subject": (lambda tmp_path, bench, model: {"--subjects": "dog,dogg"}, "no subject 'dogg'"),
    "no prompt file": (_no_prompt_file, "prompts_and_classes.txt: cannot read"),
    "model without model_index.json": (_model_without_index, "a folder without model_index.json"),
    "out is the dreambench folder": (lambda tmp_path, bench, model: {"--out": bench}, "it would overwrite the input"),
    "out inside the dreambench folder": (lambda tmp_path, bench, model: {"--out": bench / "eval"},
                                         "lies inside --dreambench"),
    "out not an evaluation": (_not_an_evaluation, "not empty and not an evaluation folder"),
    "out holds another command's config": (
        lambda tmp_path, bench, model: _config_of_another_command(tmp_path), "config.yaml: invalid configuration"),
    "reference image beyond the photos": (lambda tmp_path, bench, model: {"--set": "reference_image=9"},
                                          "--reference-image 9: subject dog has 5 photos"),
}


@pytest.mark.parametrize("mistake", BAD_INPUT)
def test_bad_input_is_one_line_before_anything_runs(mistake, tmp_path, bench_copy, model_folder, metric_flags):
    make, words = BAD_INPUT[mistake]
    flags = {"--model": model_folder, "--dreambench": bench_copy, "--out": tmp_path / "out", "--subjects": "dog",
             "--images-per-prompt": "1", "--steps": "2",
             **make(tmp_path, bench_copy, model_folder)}
    out = Path(flags["--out"])
    bench_before = files_of(bench_copy)
    out_before = files_of(out) if out.exists() else None
    result = runner.invoke(app, ["evaluate", *metric_flags, *[str(part) for item in flags.items() for part in item]])
    line = one_line_error(result)
    assert words in line, line
    assert not (out / "images").exists() and not (out / "records").exists()
    assert (files_of(out) if out.exists() else None) == out_before or out == bench_copy
    assert files_of(bench_copy) == bench_before


# --- subjectpairs finetune, and generate from its folder -------------------------------------------------------------


@pytest.fixture(scope="module")
def finetuned_dog(tmp_path_factory, model_folder):
    out = tmp_path_factory.mktemp("finetune") / "dog"
    result = runner.invoke(app, ["finetune", "--model", str(model_folder), "--subject-dir", str(DREAMBENCH / "dog"),
                                 "--category", "dog", "--out", str(out), "--steps", "2"])
    return out, result


def test_finetune_command_writes_a_model_folder_with_the_cached_embedding(finetuned_dog):
    from subjectpairs.training.model_folders import load_subject_embedding

    out, result = finetuned_dog
    assert result.exit_code == 0, result.output
    assert re.search(r"fine-tuned 2 steps on 5 photos in [0-9.]+ s \([0-9.]+ steps/s\)", result.output), result.output
    for name in ("model_index.json", "subject_embedding.safetensors", "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    embedding, category = load_subject_embedding(out)
    assert category == "dog" and embedding.ndim == 3 and torch.isfinite(embedding).all()


def test_finetune_into_a_non_empty_folder_is_one_line(tmp_path, model_folder):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    line = one_line_error(runner.invoke(app, [
        "finetune", "--model", str(model_folder), "--subject-dir", str(DREAMBENCH / "dog"), "--category", "dog",
        "--out", str(out), "--steps", "2"]))
    assert "not empty" in line
    assert files_of(out) == {"keep.txt": b"mine\n"}


def test_generate_from_a_finetuned_folder_needs_no_subject_image(finetuned_dog, tmp_path):
    from subjectpairs.training.model_folders import load_subject_embedding
    from subjectpairs.training.pipeline_blip_diffusion import BlipDiffusionPipeline

    folder, made = finetuned_dog
    assert made.exit_code == 0, made.output
    image_path = tmp_path / "x.png"
    result = runner.invoke(app, ["generate", "--model", str(folder), "--category", "dog", "--prompt", "on the beach",
                                 "--out", str(image_path), "--steps", "2"])
    assert result.exit_code == 0, result.output
    embedding, _ = load_subject_embedding(folder)
    expected = BlipDiffusionPipeline.from_pretrained(folder)(
        ["on the beach"], None, "dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        subject_embeddings=embedding)[0]
    assert np.array_equal(pixels(image_path), np.asarray(expected, dtype=np.int16))


def test_generate_without_a_subject_image_from_a_folder_without_an_embedding_is_one_line(model_folder, tmp_path):
    line = one_line_error(runner.invoke(app, ["generate", "--model", str(model_folder), "--category", "dog",
                                              "--prompt", "on the beach", "--out", str(tmp_path / "x.png")]))
    assert "--subject-image is needed" in line and "no cached subject embedding" in line
    assert not (tmp_path / "x.png").exists()


# --- quick_evaluation (training's --eval-every) ---------------------------------------------------------------------


def test_quick_evaluation_of_an_in_memory_model(tiny_clip, tiny_dino):
    from subjectpairs.training.blip_diffusion import BlipDiffusion
    from subjectpairs.training.dreambench import read_dreambench
    from subjectpairs.training.evaluation import quick_evaluation
    from subjectpairs.training.subject_metrics import SubjectScorer

    model = BlipDiffusion.from_config("tiny", seed=0)
    scorer = SubjectScorer(str(tiny_clip), str(tiny_dino))
    bench = read_dreambench(DREAMBENCH)
    subjects = bench.subjects(SUBJECTS)
    figures = quick_evaluation(model, scorer, bench, subjects, prompts=2, steps=2, guidance=7.5)
    assert figures["images"] == 2 * len(subjects)
    assert set(figures) == {*METRICS, "images"}
    for metric in METRICS:
        assert math.isfinite(figures[metric]) and -1 <= figures[metric] <= 1, metric
    again = quick_evaluation(model, scorer, bench, subjects, prompts=2, steps=2, guidance=7.5)
    assert again == pytest.approx(figures, abs=1e-6)  # a fixed evaluation: the same figures for the same model
    one = quick_evaluation(model, scorer, bench, subjects[:1], prompts=1, steps=2, guidance=7.5)
    assert one["images"] == 1
