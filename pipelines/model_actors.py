"""Model actors of a build: a segmentation model and BLIP-2 loaded once (one per GPU by default), serving
the batches of many CPU tasks, and the proxies that stand in for them inside a task (images travel shrunk
to the model's input size, maps come back and are brought to full size in the task)."""

from __future__ import annotations

from typing import Any

from subjectpairs.errors import InputError
from subjectpairs.pipelines.caption_sources import load_captioner
from subjectpairs.pipelines.config import BuildConfig
from subjectpairs.pipelines.segmentation import shrink_for_model, upsample_maps
from subjectpairs.pipelines.segmenters import SEGMENTERS, SegmenterChoice, build_segmenter


class CaptionerActor:
    """BLIP-2 and its CLIP ranker loaded once (on a GPU when there is one), captioning the batches of many
    CPU tasks."""

    def __init__(self, config_json: str) -> None:
        self.captioner = load_captioner(BuildConfig.model_validate_json(config_json))

    def describe(self) -> tuple[str, tuple[int, int]]:
        return self.captioner.name, self.captioner.input_size

    def caption(self, shrunk: list, labels: list[str], keys: list[str]) -> list[list[str]]:
        return self.captioner.caption(shrunk, labels, keys)


class RemoteCaptioner:
    """The captioner inside a task, backed by a :class:`CaptionerActor`; photos travel shrunk."""

    def __init__(self, actor: Any) -> None:
        import ray

        self.actor = actor
        self.name, self._input_size = ray.get(actor.describe.remote())

    def caption(self, images: Any, labels: Any, keys: Any) -> list[list[str]]:
        import ray

        shrunk = shrink_for_model(images, self._input_size)
        return ray.get(self.actor.caption.remote(shrunk, list(labels), list(keys)))


class SegmenterActor:
    """A segmentation model (a segmenter that ``runs_model``, CLIPSeg for the paper) loaded once, on one GPU
    when there is one, serving the batches of many CPU tasks."""

    def __init__(self, config_json: str, choice: SegmenterChoice) -> None:
        self.segmenter = build_segmenter(BuildConfig.model_validate_json(config_json).pair.segmenter, choice)

    def describe(self) -> tuple[dict[str, Any], tuple[int, int]]:
        return self.segmenter.describe(), self.segmenter.input_size

    def probabilities(self, shrunk: list, prompts: list[str]) -> Any:
        return self.segmenter.probabilities(shrunk, prompts)


class RemoteSegmenter:
    """The segmenter interface inside a task, backed by a :class:`SegmenterActor`: images are shrunk to
    the model's input size here, maps are brought back to full size here; only small arrays travel."""

    def __init__(self, actor: Any) -> None:
        import ray

        self.actor = actor
        self._description, self._input_size = ray.get(actor.describe.remote())
        self.name = self._description["name"]

    def describe(self) -> dict[str, Any]:
        return self._description

    def segment(self, images: Any, prompts: Any, boxes: Any) -> list:
        import ray

        shrunk = shrink_for_model(images, self._input_size)
        return upsample_maps(images, ray.get(self.actor.probabilities.remote(shrunk, list(prompts))))


def start_model_actors(config: BuildConfig, segmenter: SegmenterChoice) -> tuple[list[Any], list[Any]]:
    """Segmentation-model and BLIP-2 actors: by default one of each per GPU (sharing it when both run),
    none without GPUs; ``segment_actors`` / ``caption_actors`` set the counts (on CPUs when there are no
    GPUs)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    runs_model = SEGMENTERS[segmenter.name].runs_model
    segmenters = config.segment_actors
    if segmenters is None:
        segmenters = gpus if runs_model else 0
    captioners = config.caption_actors
    if captioners is None:
        captioners = gpus if config.captioner.model is not None else 0
    if segmenters and not runs_model:
        raise InputError(f"segment_actors serve a segmentation model and this build runs {segmenter.name}, "
                         f"which has none ({segmenter.reason}): set pair.segmenter.kind=clipseg (or a model)")
    if captioners and config.captioner.model is None:
        raise InputError("caption_actors serve BLIP-2: set captioner.model")
    share = 0.5 if segmenters and captioners else 1.0
    resources = {"num_gpus": share} if gpus else {"num_cpus": 1}
    config_json = config.model_dump_json()

    def start(actor: type, count: int, *args: Any) -> list[Any]:
        remote = ray.remote(actor).options(max_restarts=3, max_task_retries=3, **resources)
        return [remote.remote(config_json, *args) for _ in range(count)]

    return start(SegmenterActor, segmenters, segmenter), start(CaptionerActor, captioners)
