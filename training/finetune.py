"""Subject-specific fine-tuning (paper 3.3 and A.6), as LAVIS does it.

- ``before_training``: the Q-Former embeds every photo of the subject with its category once; the mean of
  those embeddings is cached and stands in for the Q-Former at every step and at generation.
- The text encoder and the Q-Former stay frozen; the UNet trains, and so does the cached embedding (LAVIS
  makes it a parameter with gradients; ``train_embedding=False`` keeps it fixed).
- Each step takes ``batch_size`` photos (a new random order every pass over them), LAVIS's subject-driven
  data set's prompt ``"a {category}"`` with the embedding at ``ctx_begin_pos``, and the epsilon loss at a
  uniform DDPM timestep. Photos go through LAVIS's transforms: bicubic resize of the short side and centre
  crop, to the Q-Former's input size (CLIP normalisation) and to the UNet's training size ([-1, 1]).
- AdamW, constant learning rate, no warm-up, betas 0.9/0.999, eps 1e-8; weight decay on weight matrices
  (and the embedding), none on biases and norms (LAVIS's ``get_optimizer_params``).

The noise, timesteps and photo order come from one CPU generator seeded by ``seed``, so a run repeats on any
device to floating-point accuracy. The result is a model folder in ``export``'s layout plus the cached
embedding (:data:`~subjectpairs.training.model_folders.SUBJECT_EMBEDDING_FILE`).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm.auto import tqdm

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml
from subjectpairs.devices import resolve_device
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, output_entries, refuse_overlap

from .blip_diffusion import BlipDiffusion
from .config import FinetuneConfig
from .dreambench import PHOTO_SUFFIXES
from .model_folders import SUBJECT_EMBEDDING_FILE, check_model_source, save_subject_embedding
from .pipeline_blip_diffusion import BlipDiffusionPipeline

METRICS_FILE = "metrics.jsonl"
VALIDATION_FOLDER = "validation"
# AdamW as LAVIS's runner builds it
BETAS, EPS = (0.9, 0.999), 1e-8


def finetune_prompt(category: str) -> str:
    """LAVIS's subject-driven data set's caption for every photo."""
    return f"a {' '.join(category.lower().split())}"


def centre_square(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize of the short side to ``size``, then the centre square (torchvision's Resize(size) and
    CenterCrop(size), as LAVIS's BLIP-Diffusion processors)."""
    image = image.convert("RGB")
    width, height = image.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    image = image.resize(new, Image.BICUBIC)
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def input_pixels(model: BlipDiffusion, image: Image.Image) -> torch.Tensor:
    array = np.asarray(centre_square(image, model.input_size), dtype=np.float32) / 255.0
    array = (array - np.asarray(model.image_mean, np.float32)) / np.asarray(model.image_std, np.float32)
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def target_pixels(model: BlipDiffusion, image: Image.Image) -> torch.Tensor:
    array = np.asarray(centre_square(image, model.target_size), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def read_subject_photos(folder: str) -> list[tuple[str, Image.Image]]:
    """Every photo in ``folder`` (a path or URI), by name; one that cannot be read is an InputError naming it."""
    if not storage.is_dir(folder):
        raise InputError(f"--subject-dir {folder}: not a folder")
    uris = storage.list_files(folder, PHOTO_SUFFIXES)
    if not uris:
        raise InputError(f"--subject-dir {folder}: no photos ({', '.join(PHOTO_SUFFIXES)})")
    photos = []
    for uri in sorted(uris):
        try:
            image = Image.open(io.BytesIO(storage.read_bytes(uri)))
            image.load()
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
            raise InputError(f"{uri}: cannot read the photo ({exc})") from exc
        photos.append((uri, image.convert("RGB")))
    return photos


def read_prompt_lines(uri: str) -> list[str]:
    try:
        lines = [line.strip() for line in storage.read_bytes(uri).decode("utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise InputError(f"{uri}: not a text file of prompts ({exc})") from exc
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise InputError(f"{uri}: no prompts (one per line)")
    return prompts


class SubjectFinetuner:
    """One subject's fine-tuning on ``model`` (changed in place): :meth:`train_step` runs one optimizer step,
    :meth:`save` writes the model folder with the cached embedding."""

    def __init__(self, model: BlipDiffusion, photos: list[Image.Image], category: str, config: FinetuneConfig,
                 device: torch.device) -> None:
        device = torch.device(device)
        self.model, self.category, self.config, self.device = model.to(device), category, config, device
        for frozen in (model.qformer, model.text_encoder, model.vae):
            frozen.requires_grad_(False).eval()
        model.unet.requires_grad_(True).train()
        with torch.no_grad():
            inputs = torch.cat([input_pixels(model, photo) for photo in photos]).to(device, model.qformer.dtype)
            mean = model.subject_embeddings(inputs, [category] * len(photos)).float().mean(dim=0, keepdim=True)
            targets = torch.cat([target_pixels(model, photo) for photo in photos]).to(device, model.vae.dtype)
            # the VAE posterior of every photo once: a step samples it as LAVIS's vae.encode(...).sample() does
            posterior = model.vae.encode(targets).latent_dist
            self.latent_mean, self.latent_std = posterior.mean.float(), posterior.std.float()
        self.embedding = torch.nn.Parameter(mean, requires_grad=config.train_embedding)
        decay, no_decay = [], []
        for name, parameter in model.unet.named_parameters():
            (no_decay if parameter.ndim < 2 or "bias" in name else decay).append(parameter)
        if config.train_embedding:
            decay.append(self.embedding)
        self.trainable = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr, betas=BETAS, eps=EPS)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.order: list[int] = []
        self.step = 0
        bf16 = config.mixed_precision == "bf16" or (config.mixed_precision == "auto" and device.type == "cuda")
        self._autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
        self.prompt = finetune_prompt(category)

    def _next_photos(self) -> list[int]:
        batch = []
        while len(batch) < self.config.batch_size:
            if not self.order:
                self.order = torch.randperm(len(self.latent_mean), generator=self.generator).tolist()
            batch.append(self.order.pop(0))
        return batch

    def train_step(self) -> float:
        model, size = self.model, self.config.batch_size
        chosen = torch.tensor(self._next_photos())
        mean, std = self.latent_mean[chosen], self.latent_std[chosen]
        draw = lambda shape: torch.randn(shape, generator=self.generator).to(self.device)  # noqa: E731
        clean = (mean + std * draw(mean.shape)) * model.latent_scale
        noise = draw(clean.shape)
        steps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (size,),
                              generator=self.generator).to(self.device)
        noisy = model.noise_scheduler.add_noise(clean, noise, steps)
        with self._autocast():
            states = model.text_conditioning([self.prompt] * size, self.embedding.expand(size, -1, -1),
                                             ctx_at=model.ctx_begin_pos)
            predicted = model.unet(noisy.to(model.unet.dtype), steps, encoder_hidden_states=states).sample
        loss = F.mse_loss(predicted.float(), noise.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.detach())

    def contact_sheet(self, prompts: list[str], inference_steps: int) -> Image.Image:
        """One image per prompt from the cached embedding, seed ``config.seed``, labelled, in a row."""
        pipeline = BlipDiffusionPipeline(self.model)
        try:
            images = pipeline(prompts, None, self.category, num_inference_steps=inference_steps,
                              generator=torch.Generator().manual_seed(self.config.seed),
                              subject_embeddings=self.embedding.detach())
        finally:
            self.model.unet.train()
        return labelled_row(images, prompts, f"step {self.step}")

    def save(self, folder: Path) -> Path:
        self.model.save_pretrained(folder)
        save_subject_embedding(folder, self.embedding, self.category)
        return folder


def labelled_row(images: list[Image.Image], labels: list[str], title: str) -> Image.Image:
    side = images[0].size[0]
    band = 14
    sheet = Image.new("RGB", (side * len(images), side + 2 * band), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title, fill="black")
    for index, (image, label) in enumerate(zip(images, labels)):
        sheet.paste(image, (index * side, band))
        draw.text((index * side + 2, side + band + 1), label[: max(side // 6, 8)], fill="black")
    return sheet


@dataclass
class FinetuneReport:
    out: str
    steps: int
    seconds: float
    final_loss: float
    photos: int
    sheets: list[str]

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.seconds if self.seconds else 0.0


def run_finetune(config: FinetuneConfig, progress: bool = True) -> FinetuneReport:
    """Check the inputs, fine-tune and write ``config.out``, which must be new or empty."""
    check_model_source("--model", config.model, "model_index.json")
    model_folder = config.model if Path(config.model).expanduser().exists() else None
    refuse_overlap(config.out, {"--model": model_folder, "--subject-dir": config.subject_dir})
    if storage.exists(config.out) and output_entries(config.out):
        raise InputError(f"--out {config.out}: not empty; fine-tuning writes a new model folder")
    prompts = read_prompt_lines(config.validation_prompts) if config.validation_prompts else []
    photos = read_subject_photos(config.subject_dir)
    model = BlipDiffusion.from_pretrained(config.model, qformer_tokenizer=config.qformer_tokenizer)
    with OutputLock(config.out, "finetune"):
        return finetune_into(model, [image for _, image in photos], config, prompts, progress)


def finetune_into(model: BlipDiffusion, photos: list[Image.Image], config: FinetuneConfig, prompts: list[str],
                  progress: bool = False) -> FinetuneReport:
    """Fine-tune ``model`` on ``photos`` and publish the folder to ``config.out``: the contact sheets as they
    are drawn, then the model, ``config.yaml`` and ``metrics.jsonl``, and the cached embedding last, so that
    a folder with :data:`SUBJECT_EMBEDDING_FILE` is complete."""
    started = time.perf_counter()
    tuner = SubjectFinetuner(model, photos, config.category, config, resolve_device())
    records, sheets, loss = [], [], float("nan")
    for _ in tqdm(range(config.steps), desc=f"fine-tuning on {len(photos)} photos", disable=not progress):
        step_started = time.perf_counter()
        loss = tuner.train_step()
        records.append({"step": tuner.step, "loss": loss, "lr": config.lr,
                        "seconds": time.perf_counter() - step_started})
        if prompts and (tuner.step % config.validation_every == 0 or tuner.step == config.steps):
            sheet = tuner.contact_sheet(prompts, config.validation_steps)
            buffer = io.BytesIO()
            sheet.save(buffer, format="PNG")
            uri = storage.join(config.out, VALIDATION_FOLDER, f"step-{tuner.step:06d}.png")
            storage.publish_bytes(uri, buffer.getvalue())
            sheets.append(uri)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as scratch:
        folder = tuner.save(Path(scratch) / "model")
        embedding = folder / SUBJECT_EMBEDDING_FILE
        kept = Path(scratch) / SUBJECT_EMBEDDING_FILE
        embedding.rename(kept)
        (folder / CONFIG_FILE).write_bytes(config_yaml(config, "finetune"))
        (folder / METRICS_FILE).write_text("".join(json.dumps(record) + "\n" for record in records))
        storage.publish_folder(folder, config.out)
        storage.publish_file(kept, storage.join(config.out, SUBJECT_EMBEDDING_FILE))
    return FinetuneReport(config.out, config.steps, seconds, loss, len(photos), sheets)
