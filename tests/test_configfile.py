"""Config files read back (``read_config``: a path or URI, overrides, one-line errors naming the file) and the
hashes that leave run-only fields out."""

from __future__ import annotations

import uuid

import pytest
from pydantic import BaseModel, ConfigDict, Field
from typer.testing import CliRunner

from subjectpairs import storage
from subjectpairs.cli import app
from subjectpairs.configfile import RUN_ONLY, config_yaml, hashed_settings, read_config, run_only_fields
from subjectpairs.errors import InputError
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.training.config import TrainConfig


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size: int = Field(8, ge=1)
    workers: int = Field(1, json_schema_extra=RUN_ONLY)


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    seed: int = 0
    section: Section = Field(default_factory=Section)
    out: str | None = Field(None, json_schema_extra=RUN_ONLY)


def test_reads_a_local_file_and_a_uri(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("name: a\nsection:\n  size: 4\n")
    assert read_config(Settings, path) == Settings(name="a", section=Section(size=4))
    assert read_config(Settings, str(path)) == read_config(Settings, path)

    uri = f"memory://configfile-test-{uuid.uuid4().hex}/config.yaml"
    storage.publish_bytes(uri, path.read_bytes())
    try:
        assert read_config(Settings, uri) == Settings(name="a", section=Section(size=4))
    finally:
        storage.remove(uri)


def test_reads_what_config_yaml_wrote(tmp_path):
    config = TrainConfig(shards=["a", "b"], out=str(tmp_path), seed=3, lr=1e-5)
    (tmp_path / "config.yaml").write_bytes(config_yaml(config, "train"))
    assert read_config(TrainConfig, tmp_path / "config.yaml") == config


def test_overrides_go_on_top_of_the_file_dotted_into_sections(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("name: a\nseed: 1\nsection:\n  size: 4\n")
    assert read_config(Settings, path, {"seed": 2, "section.workers": 3}) == Settings(
        name="a", seed=2, section=Section(size=4, workers=3))
    # without a file, overrides alone; a section the file lacks is made
    assert read_config(Settings, None, {"name": "b", "section.size": 5}) == Settings(name="b", section=Section(size=5))
    assert read_config(Settings, None, {"name": "b", "out": None}).out is None
    with pytest.raises(InputError, match=r"^seed\.size: seed is not a section of the configuration$"):
        read_config(Settings, path, {"seed.size": 1})


def test_an_empty_file_is_an_empty_mapping(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("# nothing set\n")
    assert read_config(Settings, path, {"name": "a"}) == Settings(name="a")


@pytest.mark.parametrize(("text", "problem"), [
    (None, "file not found"),
    ("name: [a\n", "not YAML (line 2, column 1: expected ',' or ']', but got '<stream end>')"),
    ("- name: a\n", "expected a mapping of config keys, found list"),
    ("name: a\nseed: many\ncolour: red\n", "invalid configuration: seed: Input should be a valid integer, unable "
                                           "to parse string as an integer; colour: Extra inputs are not permitted"),
    ("seed: 1\n", "invalid configuration: name: Field required"),
    ("name: a\nsection:\n  size: 0\n", "invalid configuration: section.size: Input should be greater than or "
                                       "equal to 1"),
])
def test_each_problem_is_one_line_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "settings.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(InputError) as raised:
        read_config(Settings, path)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and problem in message


def test_a_folder_and_an_undecodable_file_name_the_file(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path}: is a directory"):
        read_config(Settings, tmp_path)
    path = tmp_path / "settings.yaml"
    path.write_bytes(b"name: \x81\x82\n")
    with pytest.raises(InputError) as raised:
        read_config(Settings, path)
    assert str(raised.value).startswith(f"{path}: not YAML (") and "\n" not in str(raised.value)


def test_many_problems_are_cut_short(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("".join(f"extra{n}: 1\n" for n in range(8)))
    with pytest.raises(InputError) as raised:
        read_config(Settings, path)
    message = str(raised.value)
    assert message.count("Extra inputs are not permitted") == 4 and message.endswith("; and 4 more")
    assert message.startswith(f"{path}: invalid configuration: name: Field required; extra0: ")


def test_the_command_line_prints_the_one_line_and_exits_2(tmp_path):
    config = tmp_path / "filter.yaml"
    config.write_text("bbox: [a\n")
    result = CliRunner().invoke(app, ["filter", "--config", str(config)])
    assert result.exit_code == 2
    assert f"{config}: not YAML (line 2, column 1:" in result.output and "Traceback" not in result.output


def test_run_only_fields_are_found_in_nested_models_and_left_out_of_the_hashed_settings():
    assert run_only_fields(Settings) == {"out": True, "section": {"workers": True}}
    assert hashed_settings(Settings(name="a", out="x", section=Section(size=2, workers=5))) == {
        "name": "a", "seed": 0, "section": {"size": 2}}


# Pinned: output folders and resumed runs compare against these hashes, so they must never change by accident.
BUILD_HASH = "f447f97a512589ebc39365e054662cccc02dcdaa43b2a8c20e3348eb4d12e812"
BUILD_MADE_HASH = "b6fe086d9a96678345b51c2582149707f613856af3a030a9eac66ca48f44a3d3"
TRAIN_HASH = "f8614ede210299625ccfeb4ecfe2d16c4ad8932c13100c0dbc4eb59ceb2ec524"
TRAIN_NUMBERS_HASH = "096aae6f8cd929b3f668d0adf8b6e73753719d6cb6e0084fb64455ddf5a689dd"


def test_the_build_config_hash_is_pinned():
    assert run_only_fields(BuildConfig) == {
        "out": True, "address": True, "max_tasks": True, "segment_actors": True, "caption_actors": True,
        "pair": {"segmenter": {"require_clipseg": True}}}
    assert BuildConfig(out="out", candidates="candidates.parquet").config_hash() == BUILD_HASH
    assert BuildConfig(out="out", candidates="candidates.parquet",
                       pair={"segmenter": {"require_clipseg": True}}).config_hash() == BUILD_HASH
    assert BuildConfig(out="elsewhere", candidates="candidates.parquet", address="ray://head:10001", max_tasks=3,
                       segment_actors=2, caption_actors=1).config_hash() == BUILD_HASH
    made = BuildConfig.model_validate({"out": "out", "candidates": "candidates.parquet", "exclude": "rejects.txt",
                                       "captioner": {"model": "Salesforce/blip2-opt-6.7b"},
                                       "pair": {"seed": 3, "quality": {"enabled": False}},
                                       "fetch": {"deadline": 60.0}})
    assert made.config_hash() == BUILD_MADE_HASH


def test_the_train_run_hash_is_pinned():
    assert set(run_only_fields(TrainConfig)) == {
        "out", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "record_keys", "max_failures",
        "address", "resume", "compile", "cpus_per_worker", "eval_every", "eval_dreambench", "eval_subjects",
        "eval_prompts", "eval_inference_steps", "eval_clip_model", "eval_dino_model"}
    assert TrainConfig(shards=["shards"], out="run").run_hash() == TRAIN_HASH
    assert TrainConfig(shards=["shards"], out="run2", max_steps=5, checkpoint_every=2, keep_checkpoints=1,
                       log_every=3, record_keys=True, max_failures=2, address="ray://head:10001", resume=True,
                       compile=True, cpus_per_worker=4, eval_every=100, eval_dreambench="dreambench",
                       eval_subjects=["dog"], eval_prompts=2).run_hash() == TRAIN_HASH
    assert TrainConfig(shards=["a", "b"], out="run", model="tiny", seed=7, lr=1e-5,
                       latents=["la", "lb"]).run_hash() == TRAIN_NUMBERS_HASH
