"""Stage 1 (``pretrain-qformer``): one rank's steps, the learning-rate schedule and optimizer groups, and the
job end to end on local Ray (2 CPU workers, gloo) over img2dataset shards, resumed exactly and continued by
stage 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from img2dataset_shards import write_img2dataset_shards
from safetensors.torch import load_file
from typer.testing import CliRunner

from subjectpairs.cli import app
from subjectpairs.configfile import CONFIG_FILE, config_yaml
from subjectpairs.errors import InputError
from subjectpairs.training.config import PretrainQFormerConfig, TrainConfig
from subjectpairs.training.image_text_data import ImageTextBatchReader, resolve_image_text_shards
from subjectpairs.training.qformer_pretraining import PRETRAINING_HEADS_FILE, QFormerPretraining
from subjectpairs.training.qformer_pretraining_job import (
    QFORMER_DIR,
    random_model,
    run_qformer_pretraining,
    with_decay_steps,
)
from subjectpairs.training.rank_trainer import QFormerTrainer, warmup_cosine_lr
from subjectpairs.training.trainer import run_training

pytestmark = pytest.mark.timeout(600)
CPU = torch.device("cpu")
LOSSES = ("loss", "loss_itc", "loss_itm", "loss_lm")


@pytest.fixture(scope="module")
def image_text(tmp_path_factory) -> Path:
    return write_img2dataset_shards(tmp_path_factory.mktemp("image-text"), (6, 5, 7, 6)).folder


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield
    ray.shutdown()


def settings(shards: Path, out: Path, **overrides) -> PretrainQFormerConfig:
    values = {"shards": [str(shards)], "out": str(out), "model": "tiny", "workers": 2, "loader_workers": 0,
              "batch_size": 2, "max_steps": 4, "checkpoint_every": 2, "shuffle_buffer": 8, "lr": 1e-3,
              "warmup_steps": 2, "warmup_lr": 1e-4, "min_lr": 1e-4, **overrides}
    return PretrainQFormerConfig.model_validate(values)


def pretrain(shards: Path, out: Path, **overrides) -> list[dict]:
    run_qformer_pretraining(settings(shards, out, **overrides), progress=False)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_pretraining(tmp_path: Path, **overrides) -> tuple[PretrainQFormerConfig, QFormerPretraining]:
    config = settings(tmp_path / "shards", tmp_path / "run", workers=1, **overrides)
    torch.manual_seed(0)
    return config, random_model(config, str(tmp_path / "scratch")).train()


# -- one rank ------------------------------------------------------------------------------------------

def test_every_loss_falls_when_overfitting_a_few_pairs(tmp_path):
    """One batch of four photo-caption pairs, again and again. The tiny model learns the captions first,
    then tells the images apart (contrast), then matched pairs from hard negatives (matching)."""
    shards = write_img2dataset_shards(tmp_path / "shards", (4,)).folder
    config, model = tiny_pretraining(tmp_path, batch_size=4, lr=1e-2, warmup_steps=0, min_lr=1e-3,
                                     lr_decay_steps=60, weight_decay=0.0, max_steps=500)
    trainer = QFormerTrainer(config, model, CPU, seed=1)
    reader = ImageTextBatchReader(resolve_image_text_shards([str(shards)]), rank=0, world_size=1, num_workers=0,
                                  batch_size=4, seed=0, image_size=32, shuffle_buffer=4)
    batch = reader.next_batch()
    history = [{name: float(value) for name, value in trainer.train_step(batch).items()}
               for _ in range(config.max_steps)]
    first, last = history[0], {name: sum(step[name] for step in history[-10:]) / 10 for name in LOSSES}
    # each starts at chance: ln 4 and more for the contrast, about ln 2 for matching
    assert first["loss_itc"] > 1.3 and first["loss_itm"] > 0.6 and first["loss_lm"] > 4
    assert last["loss_itc"] < 0.5 and last["loss_itm"] < 0.1 and last["loss_lm"] < 0.3 * first["loss_lm"]


def test_the_optimizer_decays_weight_matrices_only_and_follows_lavis_schedule(tmp_path):
    config, model = tiny_pretraining(tmp_path, lr=1e-4, warmup_lr=1e-6, warmup_steps=10, min_lr=1e-5,
                                     lr_decay_steps=110, weight_decay=0.05)
    trainer = QFormerTrainer(config, model, CPU, seed=0)
    decayed, kept = trainer.optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and kept["weight_decay"] == 0.0
    names = {id(p): name for name, p in model.named_parameters()}
    kept_names = {names[id(p)] for p in kept["params"]}
    assert "qformer.visual_encoder.post_layernorm.weight" in kept_names and "heads.lm_head.bias" in kept_names
    assert all(p.ndim == 1 for p in kept["params"])
    # LAVIS decays every parameter of more or fewer than one dimension that is no bias: the queries and the
    # 0-d temperature too
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert {"qformer.query_tokens", "heads.temp", "heads.itm_head.weight"} <= decayed_names
    assert not any(name.endswith(".bias") for name in decayed_names)
    # frozen parts are in no group
    grouped = {names[id(p)] for group in (decayed, kept) for p in group["params"]}
    assert not any(name.startswith(("qformer.visual_encoder.encoder", "qformer.proj_layer")) for name in grouped)

    lr = [trainer.learning_rate(step) for step in (0, 5, 10, 60, 110, 200)]
    assert lr[0] == pytest.approx(1e-6) and lr[1] == pytest.approx(1e-6 + (1e-4 - 1e-6) / 2)
    assert lr[2] == pytest.approx(1e-4) and lr[3] == pytest.approx((1e-4 + 1e-5) / 2)
    assert lr[4] == pytest.approx(1e-5) and lr[5] == pytest.approx(1e-5)
    assert warmup_cosine_lr(35, lr=1.0, warmup_lr=0.0, warmup_steps=10, min_lr=0.0,
                            decay_steps=110) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_a_stage_1_folder_round_trips_with_its_heads(tmp_path):
    _, model = tiny_pretraining(tmp_path)
    with torch.no_grad():
        model.heads.temp.fill_(0.05)
    folder = model.save_pretrained(tmp_path / "stage1")
    assert (folder / PRETRAINING_HEADS_FILE).is_file() and (folder / "vocab.txt").is_file()
    loaded = QFormerPretraining.from_pretrained(str(folder))
    before, after = model.state_dict(), loaded.state_dict()
    assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)
    assert loaded.decoder_bos_id == model.decoder_bos_id
    (folder / PRETRAINING_HEADS_FILE).write_bytes(b"damaged")
    with pytest.raises(InputError, match=PRETRAINING_HEADS_FILE):
        QFormerPretraining.from_pretrained(str(folder))


def test_the_cosine_schedule_is_fixed_at_the_runs_first_start(tmp_path):
    out = tmp_path / "run"
    first = with_decay_steps(settings(tmp_path, out, max_steps=10))
    assert first.lr_decay_steps == 10
    out.mkdir()
    (out / CONFIG_FILE).write_bytes(config_yaml(first, "pretrain-qformer"))
    assert with_decay_steps(settings(tmp_path, out, max_steps=20, resume=True)).lr_decay_steps == 10
    assert with_decay_steps(settings(tmp_path, out, max_steps=20, resume=True, lr_decay_steps=15)).lr_decay_steps == 15
    assert with_decay_steps(settings(tmp_path, tmp_path / "other", max_steps=20)).lr_decay_steps == 20


# -- the job ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_worker_run(ray_local, image_text, tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("stage1") / "run"
    return out, pretrain(image_text, out)


def test_two_workers_log_every_loss_and_write_the_qformer_folder(two_worker_run):
    out, metrics = two_worker_run
    assert [record["step"] for record in metrics] == [1, 2, 3, 4]
    for record in metrics:
        assert all(math.isfinite(record[name]) for name in LOSSES)
        assert record["loss"] == pytest.approx(record["loss_itc"] + record["loss_itm"] + record["loss_lm"], rel=1e-5)
        assert record["total_batch"] == 4 and record["corrupt_samples"] == 0
    assert [record["lr"] for record in metrics[:3]] == pytest.approx([1e-4, 5.5e-4, 1e-3])
    folder = out / QFORMER_DIR
    assert {"config.json", "model.safetensors", "vocab.txt", PRETRAINING_HEADS_FILE} <= {p.name for p in folder.iterdir()}
    trained = load_file(folder / "model.safetensors")
    base = load_file(out / "base" / "model.safetensors")
    moved = [name for name in trained if not torch.equal(trained[name], base[name])]
    assert any(name.startswith("encoder.layer.") for name in moved) and "query_tokens" in moved
    assert not any(name.startswith(("visual_encoder.encoder.", "proj_layer.")) for name in moved)  # frozen


def test_a_resumed_run_logs_the_same_losses_and_ends_with_the_same_qformer(two_worker_run, image_text, tmp_path):
    out, uninterrupted = two_worker_run
    interrupted = tmp_path / "run"
    # a run planned for 4 steps, stopped after 2: its schedule was fixed at its start, and the resumption
    # (which does not name it) keeps it
    pretrain(image_text, interrupted, max_steps=2, lr_decay_steps=4)
    resumed = pretrain(image_text, interrupted, max_steps=4, resume=True)
    for ours, theirs in zip(resumed, uninterrupted, strict=True):
        assert ours["step"] == theirs["step"]
        for name in LOSSES:
            assert ours[name] == pytest.approx(theirs[name], rel=1e-6, abs=1e-7), (ours["step"], name)
    expected = load_file(out / QFORMER_DIR / "model.safetensors")
    for name, tensor in load_file(interrupted / QFORMER_DIR / "model.safetensors").items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert "lr_decay_steps: 4" in (interrupted / "config.yaml").read_text()


def test_the_result_starts_a_stage_2_run(two_worker_run, ray_local, tmp_path):
    from pair_shards import write_pair_shards

    from subjectpairs.training.blip_diffusion import BlipDiffusion

    out, _ = two_worker_run
    stable_diffusion = BlipDiffusion.from_config("tiny", seed=0).save_pretrained(tmp_path / "sd")
    pairs = write_pair_shards(tmp_path / "pairs", counts=[6])
    stage2 = tmp_path / "stage2"
    run_training(TrainConfig(shards=[str(pairs.folder)], out=str(stage2), stable_diffusion=str(stable_diffusion),
                             qformer=str(out / QFORMER_DIR), workers=1, loader_workers=0, batch_size=2,
                             max_steps=1, shuffle_buffer=4), progress=False)
    trained = load_file(stage2 / "step-00000001" / "trainable.safetensors")
    stage1 = load_file(out / QFORMER_DIR / "model.safetensors")
    # stage 2 started from the stage-1 weights: one small step away from them
    assert (trained["qformer.query_tokens"] - stage1["query_tokens"]).abs().max() < 1e-3


def test_bad_flags_fail_in_the_driver_and_leave_nothing(image_text, tmp_path, caplog):
    out = tmp_path / "run"
    with pytest.raises(InputError, match="--shards"):  # warned first: 5000 warm-up steps of 4
        run_qformer_pretraining(settings(tmp_path / "no-shards", out, warmup_steps=5000))
    assert "the whole run warms up" in caplog.text
    with pytest.raises(InputError, match="--init .*no such"):
        run_qformer_pretraining(settings(image_text, out, init=str(tmp_path / "missing" / "qformer")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="--init .*config.json"):
        run_qformer_pretraining(settings(image_text, out, init=str(tmp_path / "empty")))
    with pytest.raises(InputError, match="--init .*no such checkpoint"):
        run_qformer_pretraining(settings(image_text, out, init=str(tmp_path / "blip2_pretrain_vitL.pth")))
    with pytest.raises(InputError, match="less than a batch of 50"):
        run_qformer_pretraining(settings(image_text, out, batch_size=50))
    with pytest.raises(InputError, match="--shards"):
        run_qformer_pretraining(settings(tmp_path / "no-shards", out))
    with pytest.raises(ValueError, match="clip goes with bert"):
        settings(image_text, out, clip="openai/clip-vit-large-patch14")
    assert not out.exists()


def test_the_command_line_runs_stage_1(ray_local, image_text, tmp_path):
    out = tmp_path / "run"
    arguments = ["pretrain-qformer", "--shards", str(image_text), "--out", str(out), "--model", "tiny",
                 "--workers", "1", "--batch-size", "2", "--max-steps", "1", "--set", "loader_workers=0",
                 "--set", "warmup_steps=0"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert "pre-trained to step 1 (from 0)" in result.output and f"{out}/{QFORMER_DIR}" in result.output
    assert (out / QFORMER_DIR / "model.safetensors").is_file()
    again = CliRunner().invoke(app, arguments)
    assert again.exit_code != 0 and "--resume" in again.output
