"""One rank's Trainer without Ray: steps on real batches, and a checkpoint that resumes exactly."""

from __future__ import annotations

import torch

from pair_shards import write_pair_shards
from subjectpairs.corpus.reader import resolve_shards
from subjectpairs.training.blip_diffusion import BlipDiffusion
from subjectpairs.training.config import TrainConfig
from subjectpairs.training.data import BatchReader, StreamPosition
from subjectpairs.training.rank_trainer import Trainer

CPU = torch.device("cpu")


def batches(shards, model: BlipDiffusion, position: StreamPosition) -> BatchReader:
    return BatchReader(shards, rank=0, world_size=1, num_workers=0, batch_size=2, seed=3,
                       input_size=model.input_size, target_size=model.target_size, exclude=frozenset(),
                       latents=None, shuffle_buffer=4, position=position)


def test_a_trainer_steps_and_resumes_from_its_checkpoint_exactly(tmp_path):
    dataset = write_pair_shards(tmp_path / "pairs", counts=[10])
    shards = resolve_shards([str(dataset.folder)])
    config = TrainConfig(shards=[str(dataset.folder)], out=str(tmp_path / "run"), model="tiny", batch_size=2,
                         lr=1e-3)
    torch.manual_seed(0)
    model = BlipDiffusion.from_config("tiny", seed=0).train()
    trainer = Trainer(config, model, CPU)
    start = {name: tensor.clone() for name, tensor in model.trainable_state_dict().items()}
    reader = batches(shards, model, StreamPosition())
    losses = [float(trainer.train_step(reader.next_batch())["loss"]) for _ in range(2)]
    assert trainer.step == 2 and all(loss > 0 for loss in losses)
    changed = [name for name, tensor in model.trainable_state_dict().items() if not torch.equal(tensor, start[name])]
    assert changed  # the optimizer moved the weights

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    trainer.save(str(folder), rank=0, position=reader.position.to_dict(), epoch=0, run_hash="x")
    going_on = float(trainer.train_step(reader.next_batch())["loss"])

    torch.manual_seed(123)  # whatever the streams were, the checkpoint's come back
    resumed = Trainer(config, BlipDiffusion.from_config("tiny", seed=0).train(), CPU)
    position = StreamPosition.from_dict(resumed.restore(str(folder), rank=0))
    assert resumed.step == 2
    again = float(resumed.train_step(batches(shards, resumed.model, position).next_batch())["loss"])
    assert again == going_on
    for name, tensor in resumed.model.trainable_state_dict().items():
        assert torch.equal(tensor, model.trainable_state_dict()[name]), name


def test_collectives_in_one_process_are_the_values_themselves():
    from subjectpairs.training.rank_trainer import Collectives

    ranks = Collectives(1, CPU)
    assert not ranks.distributed
    assert ranks.sum(2.5) == 2.5
    assert ranks.all(True) and not ranks.all(False)
    assert ranks.union(["b.tar", "a.tar", "b.tar"]) == ["a.tar", "b.tar"]
    ranks.barrier()
