"""The DreamBench evaluation's work, without Ray: what to generate (:func:`plan_units`), and a worker that
generates a unit's images with :class:`BlipDiffusionPipeline`, zero-shot or after fine-tuning on the
subject's photos, and scores them (:class:`EvaluationWorker`). ``evaluation_job`` schedules workers on a
Ray cluster and writes the outputs.

A unit is one subject, one prompt and one seed: ``images_per_prompt`` images drawn as one batch from
``torch.Generator().manual_seed(seed)``, as ``subjectpairs generate --seed S --num-images N`` draws them, so
any image can be regenerated on its own. The pipeline builds ``"a {class} {prompt}"``: a DreamBench prompt
that starts with ``a {class}`` gives the rest (``in the jungle``); the others (``a red dog``) are given whole.
"""

from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image

from subjectpairs import storage
from subjectpairs.devices import resolve_device

from .blip_diffusion import BlipDiffusion
from .config import EvaluateConfig, FinetuneConfig
from .dreambench import BenchSubject, DreamBench
from .finetune import finetune_into
from .model_folders import SUBJECT_EMBEDDING_FILE, load_subject_embedding
from .pipeline_blip_diffusion import BlipDiffusionPipeline
from .schedulers import build_scheduler
from .subject_metrics import ImageFeatures, SubjectScorer, prompt_fidelity, real_image_oracle, subject_fidelity

IMAGES_FOLDER = "images"
RECORDS_FOLDER = "records"
FINETUNED_FOLDER = "finetuned"
ORACLE_RECORD = "oracle.json"


@dataclass(frozen=True)
class EvalUnit:
    subject: str
    category: str
    prompt_index: int
    prompt: str
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.prompt_index:02d}-seed{self.seed}"

    def image_path(self, index: int) -> str:
        """Relative to the evaluation folder."""
        return f"{IMAGES_FOLDER}/{self.subject}/{self.stem}-{index}.png"

    @property
    def record_path(self) -> str:
        return f"{RECORDS_FOLDER}/{self.subject}/{self.stem}.json"


def plan_units(bench: DreamBench, subjects: list[BenchSubject], seeds: list[int]) -> list[EvalUnit]:
    return [EvalUnit(subject.name, subject.category, index, prompt, seed)
            for subject in subjects for index, prompt in enumerate(bench.prompts(subject)) for seed in seeds]


def generation_prompt(prompt: str, category: str) -> str:
    """What follows ``a {category}`` in the prompt, which the pipeline puts back; else the whole prompt."""
    lead = f"a {category} "
    return prompt[len(lead):] if prompt.startswith(lead) else prompt


def read_photos(subject: BenchSubject) -> list[bytes]:
    """The subject's photo files, read where the benchmark lies (the driver) and sent to workers."""
    return [path.read_bytes() for path in subject.photos]


def decode_photos(photos: list[bytes]) -> list[Image.Image]:
    decoded = []
    for data in photos:
        with Image.open(io.BytesIO(data)) as image:
            decoded.append(image.convert("RGB"))
    return decoded


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class EvaluationWorker:
    """Holds the metric models and the model under evaluation on one device (a GPU when there is one) and
    runs units; every file it writes lands under ``out``, a unit's record last."""

    def __init__(self, config: EvaluateConfig, device: str = "auto") -> None:
        self.config = config
        self.device = resolve_device(device)
        self.scorer = SubjectScorer(config.clip_model, config.dino_model, self.device)
        self._pipeline: BlipDiffusionPipeline | None = None  # the zero-shot model, loaded once
        self._subject: tuple[str, BlipDiffusionPipeline | None, torch.Tensor | None, ImageFeatures] | None = None

    def _load_model(self, source: str) -> BlipDiffusion:
        return BlipDiffusion.from_pretrained(source, qformer_tokenizer=self.config.qformer_tokenizer)

    def _wrap(self, model: BlipDiffusion) -> BlipDiffusionPipeline:
        scheduler = build_scheduler(model.scheduler_config, self.config.scheduler)
        return BlipDiffusionPipeline(model, scheduler).to(self.device)

    def _prepare(self, subject: BenchSubject, photos: list[Image.Image], out: str, finetune_steps: int | None):
        """(pipeline, cached embedding or None, real photos' features) of ``subject``, kept for its next unit."""
        if self._subject is not None and self._subject[0] == subject.name:
            return self._subject[1:]
        real = self.scorer.image_features(photos)
        if finetune_steps:
            folder = storage.join(out, FINETUNED_FOLDER, subject.name)
            if not storage.exists(storage.join(folder, SUBJECT_EMBEDDING_FILE)):  # not finished before
                tune = FinetuneConfig(model=self.config.model,
                                      subject_dir=storage.join(self.config.dreambench, subject.name),
                                      category=subject.category, out=folder, steps=finetune_steps,
                                      qformer_tokenizer=self.config.qformer_tokenizer)
                finetune_into(self._load_model(self.config.model), photos, tune, prompts=[])
            local = folder
            if storage.is_remote(folder):  # from_pretrained reads local folders and hub ids
                local = tempfile.mkdtemp(prefix="finetuned-")
                storage.download_folder(folder, local)
            pipeline = self._wrap(self._load_model(local))
            embedding, _ = load_subject_embedding(local)
        else:
            if self._pipeline is None:
                self._pipeline = self._wrap(self._load_model(self.config.model))
            pipeline, embedding = self._pipeline, None
        self._subject = (subject.name, pipeline, embedding, real)
        return pipeline, embedding, real

    def run(self, subject: BenchSubject, photo_files: list[bytes], units: list[EvalUnit], out: str,
            finetune_steps: int | None, oracle: bool) -> dict:
        """Generate and score ``units`` of ``subject`` (its photos' files in ``photo_files``); with ``oracle``
        also its real-image figures. Returns ``{"rows": [...], "oracle": {...} or None}``, each also written
        as a record under ``out``."""
        photos = decode_photos(photo_files)
        pipeline, embedding, real = self._prepare(subject, photos, out, finetune_steps)
        reference = None if embedding is not None else photos[self.config.reference_image]
        rows = []
        for unit in units:
            images, unit_rows = generate_and_score(pipeline, self.scorer, unit, real, reference, embedding,
                                                   self.config.images_per_prompt, self.config.steps,
                                                   self.config.guidance)
            for index, image in enumerate(images):
                storage.publish_bytes(storage.join(out, unit.image_path(index)), png_bytes(image))
            storage.publish_bytes(storage.join(out, unit.record_path), json.dumps(unit_rows).encode())
            rows.extend(unit_rows)
        figures = None
        if oracle:
            figures = {"subject": subject.name, "photos": len(subject.photos), **real_image_oracle(real)}
            storage.publish_bytes(storage.join(out, RECORDS_FOLDER, subject.name, ORACLE_RECORD),
                                  json.dumps(figures).encode())
        return {"rows": rows, "oracle": figures}


def generate_and_score(pipeline: BlipDiffusionPipeline, scorer: SubjectScorer, unit: EvalUnit, real: ImageFeatures,
                       reference: Image.Image | None, embedding: torch.Tensor | None, count: int, steps: int,
                       guidance: float) -> tuple[list[Image.Image], list[dict]]:
    """A unit's ``count`` images and their rows of metrics."""
    images = pipeline([generation_prompt(unit.prompt, unit.category)] * count, reference, unit.category,
                      guidance_scale=guidance, num_inference_steps=steps,
                      generator=torch.Generator().manual_seed(unit.seed), subject_embeddings=embedding)
    generated = scorer.image_features(images)
    fidelity = subject_fidelity(generated, real)
    text = prompt_fidelity(generated, scorer.text_features([unit.prompt] * count))
    rows = [{"subject": unit.subject, "class": unit.category, "prompt": unit.prompt,
             "prompt_index": unit.prompt_index, "seed": unit.seed, "index": index, "image": unit.image_path(index),
             "dino": float(fidelity["dino"][index]), "clip_i": float(fidelity["clip_i"][index]),
             "clip_t": float(text[index])} for index in range(count)]
    return images, rows


def mean_scores(rows: list[dict]) -> dict[str, float]:
    """The mean of each metric over images (DreamBooth averages over every generated image)."""
    return {metric: sum(row[metric] for row in rows) / len(rows) for metric in ("dino", "clip_i", "clip_t")}


def quick_evaluation(model: BlipDiffusion, scorer: SubjectScorer, bench: DreamBench, subjects: list[BenchSubject],
                     prompts: int, steps: int, guidance: float) -> dict[str, float]:
    """A small fixed zero-shot evaluation of an in-memory model (training's ``--eval-every``): the first
    ``prompts`` prompts of each subject, one image each from seed 0 and the subject's first photo; nothing
    is written. Returns the mean metrics and the image count."""
    pipeline = BlipDiffusionPipeline(model)
    rows = []
    for subject in subjects:
        photos = decode_photos(read_photos(subject))
        real = scorer.image_features(photos)
        for unit in plan_units(bench, [subject], [0])[:prompts]:
            rows.extend(generate_and_score(pipeline, scorer, unit, real, photos[0], None, 1, steps, guidance)[1])
    return {**mean_scores(rows), "images": len(rows)}
