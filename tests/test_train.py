"""The trainer end to end on local Ray (Ray Train, 1-2 CPU workers, gloo), with the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.configfile import read_config
from subjectpairs.errors import InputError
from subjectpairs.training import trainer
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.config import LatentsConfig, TrainConfig
from subjectpairs.training.export import export_run
from subjectpairs.training.latents import check_latents, write_latents
from subjectpairs.training.trainer import (
    RunInUse, latest_checkpoint, load_run_model, mark_complete, prepare_run, run_training,
)
from pair_shards import Dataset, write_pair_shards

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    return write_pair_shards(tmp_path_factory.mktemp("pairs"), counts=[7, 5, 6, 6])


@pytest.fixture(scope="module")
def shards(dataset) -> Path:
    return dataset.folder


def train(ray_local, shards: Path, out: Path, **settings) -> list[dict]:
    values = {"shards": [str(shards)], "out": str(out), "model": "tiny", "workers": 2, "loader_workers": 0,
              "batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "shuffle_buffer": 8, "lr": 1e-4, **settings}
    run_training(TrainConfig.model_validate(values), progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def keys_by_step(out: Path, rank: int) -> dict[int, list[str]]:
    steps: dict[int, list[str]] = {}
    for line in (out / "keys" / f"rank-{rank:05d}.txt").read_text().splitlines():
        step, key = line.split("\t")
        steps.setdefault(int(step), []).append(key)
    return steps


@pytest.fixture(scope="module")
def two_worker_run(ray_local, dataset, tmp_path_factory) -> tuple[Path, set[str]]:
    shards = dataset.folder
    out = tmp_path_factory.mktemp("runs") / "two"
    excluded = set(dataset.all_keys[::5])
    exclude = out.parent / "rejects.txt"
    exclude.write_text("# reviewer rejects\n" + "\n".join(sorted(excluded)) + "\n")
    train(ray_local, shards, out, record_keys=True, exclude=str(exclude), loader_workers=1, max_steps=4)
    return out, excluded


def test_two_workers_see_disjoint_samples_in_equal_steps_and_never_an_excluded_key(two_worker_run):
    out, excluded = two_worker_run
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(m["loss"] > 0 and m["samples_per_s"] > 0 and 0 <= m["data_wait"] <= 1 for m in metrics)
    rank0, rank1 = keys_by_step(out, 0), keys_by_step(out, 1)
    assert sorted(rank0) == sorted(rank1) == [1, 2, 3, 4]
    seen0 = [k for step in rank0.values() for k in step]
    seen1 = [k for step in rank1.values() for k in step]
    assert len(seen0) == len(set(seen0)) == 8 and len(seen1) == len(set(seen1)) == 8
    assert not set(seen0) & set(seen1)
    assert not (set(seen0) | set(seen1)) & excluded
    checkpoint = Path(latest_checkpoint(str(out)))
    assert checkpoint.name == "step-00000004"
    assert {p.name for p in checkpoint.iterdir()} >= {"trainable.safetensors", "optimizer.pt", "complete.json",
                                                      "trainer_state.json", "rank-00000.pt", "rank-00001.pt"}


def test_resumed_run_logs_the_same_losses_as_an_uninterrupted_one(ray_local, shards, tmp_path):
    """12 steps straight, against a run stopped at the first epoch's last step, resumed to a step inside the
    second epoch, then resumed to 12: the data crosses an epoch boundary (24 samples, 4 per step), and
    dropout, noise, timesteps and subject dropping all draw random numbers."""
    straight = train(ray_local, shards, tmp_path / "straight", max_steps=12, checkpoint_every=3)
    epoch_end = max(m["step"] for m in straight if m["epoch"] == 0)
    assert 3 < epoch_end < 9
    first = train(ray_local, shards, tmp_path / "resumed", max_steps=epoch_end, checkpoint_every=3)
    train(ray_local, shards, tmp_path / "resumed", max_steps=epoch_end + 2, checkpoint_every=3, resume=True)
    resumed = train(ray_local, shards, tmp_path / "resumed", max_steps=12, checkpoint_every=3, resume=True)
    assert [m["step"] for m in resumed] == list(range(1, 13))
    assert [m["loss"] for m in first] == [m["loss"] for m in straight[:epoch_end]]
    assert [m["loss"] for m in resumed[epoch_end:]] == [m["loss"] for m in straight[epoch_end:]]
    assert all(m["corrupt_samples"] == 0 and m["corrupt_shards"] == [] for m in resumed)
    assert all(m["total_batch"] == 4 for m in resumed)  # 2 workers of 2


def fake_checkpoint(run: Path, step: int, whole: bool = True) -> Path:
    folder = run / f"step-{step:08d}"
    folder.mkdir(parents=True)
    for name in ("trainable.safetensors", "optimizer.pt", "rank-00000.pt", "rank-00001.pt"):
        (folder / name).write_bytes(bytes(100 + step))
    (folder / "trainer_state.json").write_text(json.dumps({"step": step}))
    if whole:
        mark_complete(str(folder))
    return folder


def run_config(tmp_path: Path, **settings) -> TrainConfig:
    return TrainConfig.model_validate({"shards": [str(tmp_path / "pairs")], "out": str(tmp_path / "run"),
                                       "model": "tiny", "workers": 2, **settings})


def test_resume_starts_from_the_newest_whole_checkpoint_and_removes_the_broken(tmp_path, caplog):
    """A checkpoint cut short, or one the run stopped writing before its completion record (a crash
    before Ray's own record too), is passed by with a warning naming it: the step printed and the
    checkpoint the workers load (latest_checkpoint) are the same one."""
    run = tmp_path / "run"
    assert prepare_run(run_config(tmp_path)) == 0
    for step in (2, 4):
        fake_checkpoint(run, step)
    truncated = fake_checkpoint(run, 6) / "optimizer.pt"
    truncated.write_bytes(truncated.read_bytes()[:50])
    fake_checkpoint(run, 8, whole=False)
    (run / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's list, naming step 8 at most
    with pytest.raises(RunInUse, match="step-00000008"):
        prepare_run(run_config(tmp_path))
    with caplog.at_level("WARNING", logger="subjectpairs.training.trainer"):
        assert prepare_run(run_config(tmp_path, resume=True, keep_checkpoints=1)) == 4
    assert "step-00000006" in caplog.text and "optimizer.pt has 50 bytes of 106" in caplog.text
    assert "step-00000008" in caplog.text and "never finished" in caplog.text
    assert latest_checkpoint(str(run)) == str(run / "step-00000004")
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "step-00000004"]


def test_a_run_from_before_completion_records_resumes_from_what_rays_snapshot_listed(tmp_path):
    run = tmp_path / "run"
    prepare_run(run_config(tmp_path))
    for step in (2, 4, 6):
        fake_checkpoint(run, step, whole=False)
    (run / "checkpoint_manager_snapshot.json").write_text(json.dumps(
        {"checkpoints": [str(run / "step-00000002"), str(run / "step-00000004")]}))  # step 6: not stored yet
    assert prepare_run(run_config(tmp_path, resume=True, keep_checkpoints=2)) == 4
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "step-00000002", "step-00000004"]
    assert latest_checkpoint(str(run)) == str(run / "step-00000004")  # now by its completion record


def test_resume_without_a_whole_checkpoint_is_one_line(tmp_path):
    run = tmp_path / "run"
    prepare_run(run_config(tmp_path))
    (fake_checkpoint(run, 2) / "rank-00001.pt").unlink()
    with pytest.raises(InputError, match=r"no whole checkpoint to resume from \(step-00000002: rank-00001.pt "
                                         r"is missing\)") as error:
        prepare_run(run_config(tmp_path, resume=True))
    assert "\n" not in str(error.value)


def test_bad_data_flags_fail_in_the_driver_and_leave_nothing_in_the_way(tmp_path, dataset):
    """Before Ray starts: one line each, and the corrected command then finds the folder free."""
    run = tmp_path / "run"
    base = {"shards": [str(dataset.folder)], "out": str(run), "model": "tiny", "workers": 2, "loader_workers": 1,
            "batch_size": 2, "max_steps": 1}
    mistakes = [({"shards": [str(tmp_path / "nowhere")]}, "--shards: .*nowhere"),
                ({"exclude": str(tmp_path / "rejects.txt")}, "--exclude .*rejects.txt: no such file"),
                ({"batch_size": 13}, "leave one with 1[12] samples, less than a batch of 13"),
                ({"init": str(tmp_path / "model")}, "--init .*model: no such folder")]
    for settings, message in mistakes:
        with pytest.raises(InputError, match=message):
            run_training(TrainConfig.model_validate({**base, **settings}), progress=False)
        assert not run.exists() or not [p for p in run.iterdir() if not p.name.startswith(".subjectpairs")]
    assert prepare_run(TrainConfig.model_validate(base)) == 0


def test_a_start_that_fails_before_its_first_checkpoint_leaves_the_folder_as_it_was(tmp_path, dataset,
                                                                                   monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")

    def fails(config, loop, resumed_from, progress):
        (run / "metrics.jsonl").write_text('{"step": 1}\n')
        raise RuntimeError("the workers failed")

    monkeypatch.setattr(trainer, "_fit", fails)
    config = {"shards": [str(dataset.folder)], "out": str(run), "model": "tiny", "workers": 2, "batch_size": 2}
    with pytest.raises(RuntimeError, match="workers failed"):
        run_training(TrainConfig.model_validate(config), progress=False)
    assert [p.name for p in run.iterdir() if not p.name.startswith(".subjectpairs")] == ["notes.txt"]
    assert prepare_run(TrainConfig.model_validate(config)) == 0


def test_a_run_folder_is_not_reused_by_accident(ray_local, shards, two_worker_run):
    out, _ = two_worker_run
    base = {"shards": [str(shards)], "out": str(out), "model": "tiny", "workers": 2, "batch_size": 2}
    with pytest.raises(RunInUse, match="--resume"):
        run_training(TrainConfig.model_validate(base), progress=False)
    with pytest.raises(RunInUse, match="lr"):
        run_training(TrainConfig.model_validate({**base, "resume": True, "lr": 1.0}), progress=False)


def test_a_wrong_model_folder_fails_at_once_with_its_name(tmp_path):
    (tmp_path / "not-a-model").mkdir()
    base = {"shards": ["pairs"], "out": str(tmp_path / "run")}
    with pytest.raises(InputError, match="not a model folder"):
        run_training(TrainConfig.model_validate({**base, "init": str(tmp_path / "not-a-model")}), progress=False)
    with pytest.raises(InputError, match="no such folder"):
        run_training(TrainConfig.model_validate({**base, "init": "./missing/model"}), progress=False)
    assert not (tmp_path / "run").exists()


def test_overfitting_eight_samples_lowers_the_loss(ray_local, tmp_path):
    shards = tmp_path / "eight"
    write_pair_shards(shards, counts=[8])
    metrics = train(ray_local, shards, tmp_path / "overfit", workers=1, batch_size=8, max_steps=40, lr=2e-3,
                    checkpoint_every=40, drop_subject_prob=0.0)
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-8:]) / 8 < 0.6 * sum(losses[:8]) / 8


def test_export_then_init_keeps_every_weight(two_worker_run, tmp_path):
    out, _ = two_worker_run
    export = tmp_path / "export"
    export_run(str(out), str(export))
    assert (export / "model_index.json").is_file()
    exported = BlipDiffusion.from_pretrained(export)
    trained = load_file(str(Path(latest_checkpoint(str(out))) / "trainable.safetensors"))
    state = exported.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in trained.items())
    base = BlipDiffusion.from_pretrained(out / "base").state_dict()
    frozen = [name for name in state if name.startswith(("vae.", "qformer.visual_encoder."))]
    assert frozen and all(torch.equal(state[name], base[name]) for name in frozen)
    assert any(not torch.equal(state[name], base[name]) for name in trained)  # training changed weights
    continued = load_run_model(TrainConfig(shards=["x"], out=str(tmp_path / "next"), init=str(export)), str(tmp_path))
    assert all(torch.equal(continued.state_dict()[name], tensor) for name, tensor in state.items())


def test_generate_command_writes_an_image(two_worker_run, tmp_path):
    from PIL import Image

    out, _ = two_worker_run
    export = tmp_path / "model"
    export_run(str(out), str(export))
    subject = tmp_path / "subject.jpg"
    Image.new("RGB", (48, 40), (180, 40, 40)).save(subject)
    result = CliRunner().invoke(app, ["generate", "--model", str(export), "--subject-image", str(subject),
                                      "--category", "dog", "--prompt", "on the beach", "--steps", "2",
                                      "--out", str(tmp_path / "dog.png")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "dog.png").size == (64, 64)


def test_training_on_cached_latents_with_relative_paths(ray_local, shards, tmp_path, monkeypatch):
    """Relative paths (as `make demo` gives them) must survive Ray Train's per-worker working directories."""
    monkeypatch.chdir(tmp_path)
    manifest = write_latents(LatentsConfig(shards=[str(shards)], out="latents", model="tiny", batch_size=4))
    written = read_config(LatentsConfig, tmp_path / "latents" / "config.yaml")  # beside them, to rerun anywhere
    assert written == LatentsConfig(shards=[str(shards)], out=str(tmp_path / "latents"), model="tiny", batch_size=4)
    assert sum(entry["samples"] for entry in manifest["shards"]) == 24
    values = {"shards": [str(shards)], "out": "cached", "model": "tiny", "workers": 2, "loader_workers": 0,
              "batch_size": 2, "max_steps": 2, "shuffle_buffer": 8, "latents": ["latents"]}
    run_training(TrainConfig.model_validate(values), progress=False)
    metrics = [json.loads(line) for line in (tmp_path / "cached" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    latents = tmp_path / "latents"
    with pytest.raises(ValueError, match="another VAE"):
        check_latents([str(latents)], BlipDiffusion.from_config("tiny", seed=1).vae, 64)
    with pytest.raises(ValueError, match="128 px"):
        check_latents([str(latents)], BlipDiffusion.from_config("tiny", seed=0).vae, 128)


def test_a_target_that_does_not_decode_is_listed_not_lost(tmp_path):
    import webdataset as wds

    from subjectpairs.corpus.reader import read_shard, resolve_shards
    from subjectpairs.training.latents import encode_shard

    dataset = write_pair_shards(tmp_path / "pairs", counts=[5])
    (shard,) = resolve_shards([str(dataset.folder)])
    samples = read_shard(shard.uri)
    broken_key = dataset.all_keys[2]
    with wds.TarWriter(shard.uri, encoder=False) as writer:
        for sample in samples:
            key = json.loads(sample["json"])["key"]
            writer.write({**{k: v for k, v in sample.items() if k != "__key__"}, "__key__": key,
                          **({"target.jpg": b"not a jpeg"} if key == broken_key else {})})
    entry = encode_shard(shard, str(tmp_path / "latents"), BlipDiffusion.from_config("tiny").vae, 64, batch_size=2)
    assert entry["samples"] == 4
    assert [item["key"] for item in entry["skipped"]] == [broken_key] and entry["skipped"][0]["reason"]


def test_latent_shards_are_byte_reproducible(tmp_path):
    """Written by the pair shards' writer: no write time, user or group in the tar headers."""
    import tarfile

    from subjectpairs.corpus.reader import resolve_shards
    from subjectpairs.training.latents import encode_shard

    dataset = write_pair_shards(tmp_path / "pairs", counts=[3])
    (shard,) = resolve_shards([str(dataset.folder)])
    vae = BlipDiffusion.from_config("tiny").vae
    written = []
    for out in ("first", "second"):
        encode_shard(shard, str(tmp_path / out), vae, 64, batch_size=2)
        written.append(tmp_path / out / Path(shard.uri).name)
    assert written[0].read_bytes() == written[1].read_bytes()
    with tarfile.open(written[0]) as tar:
        headers = [(member.mtime, member.uname, member.gname, member.uid) for member in tar.getmembers()]
    assert headers == [(0, "", "", 0)] * 3


def test_latents_name_an_unreadable_shard_in_one_line_and_list_a_dotted_key(tmp_path):
    import webdataset as wds

    from subjectpairs.corpus.reader import read_shard, resolve_shards
    from subjectpairs.training.latents import encode_shard

    dataset = write_pair_shards(tmp_path / "pairs", counts=[4, 4])
    dotted_shard, truncated_shard = resolve_shards([str(dataset.folder)])
    samples = read_shard(dotted_shard.uri)
    with wds.TarWriter(dotted_shard.uri, encoder=False) as writer:
        for index, sample in enumerate(samples):
            key = json.loads(sample["json"])["key"] + (".b" if index == 1 else "")
            writer.write({**{k: v for k, v in sample.items() if not k.startswith("__")}, "__key__": key})
    vae = BlipDiffusion.from_config("tiny").vae
    entry = encode_shard(dotted_shard, str(tmp_path / "latents"), vae, 64, batch_size=2)
    assert entry["samples"] == 3
    assert [item["key"] for item in entry["skipped"]] == [dataset.all_keys[1] + ".b"]
    data = Path(truncated_shard.uri).read_bytes()
    Path(truncated_shard.uri).write_bytes(data[:len(data) // 2 + 100])
    with pytest.raises(InputError, match=f"{truncated_shard.uri}: cannot read the shard") as error:
        encode_shard(truncated_shard, str(tmp_path / "latents"), vae, 64, batch_size=2)
    assert "\n" not in str(error.value)


DREAMBENCH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "dreambench"


@pytest.mark.skipif(not DREAMBENCH.is_dir(), reason="the shared DreamBench subjects are not beside the checkout")
def test_the_dreambench_evaluation_during_training_is_logged_and_leaves_the_run_unchanged(
        ray_local, shards, tmp_path, tiny_clip, tiny_dino):
    evaluated = train(ray_local, shards, tmp_path / "evaluated", eval_every=2, eval_dreambench=str(DREAMBENCH),
                      eval_subjects=["dog", "teapot"], eval_prompts=2, eval_inference_steps=2,
                      eval_clip_model=str(tiny_clip), eval_dino_model=str(tiny_dino))
    plain = train(ray_local, shards, tmp_path / "plain")
    evaluations = [record for record in evaluated if "eval" in record]
    assert [record["step"] for record in evaluations] == [2, 4]
    for record in evaluations:
        assert record["eval"]["images"] == 4  # two subjects x two prompts
        assert all(-1.0 <= record["eval"][metric] <= 1.0 for metric in ("dino", "clip_i", "clip_t"))
    # the evaluation draws from no random stream of the run and leaves the model in training mode
    assert [r["loss"] for r in evaluated if "loss" in r] == [r["loss"] for r in plain]


def test_a_bad_evaluation_benchmark_fails_in_the_driver(tmp_path, shards):
    with pytest.raises(InputError, match="prompts_and_classes.txt"):
        run_training(TrainConfig(shards=[str(shards)], out=str(tmp_path / "run"), model="tiny", batch_size=2, eval_every=2,
                                 eval_dreambench=str(tmp_path)), progress=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="eval_every and eval_dreambench go together"):
        TrainConfig(shards=[str(shards)], out=str(tmp_path / "run"), eval_every=2)
