"""BLIP-Diffusion's pre-training objective (paper 3.2): the latent diffusion loss with subject conditioning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The share of samples whose subject embeddings are dropped, so that the model keeps text-only generation.
DROP_SUBJECT_PROB = 0.15


def training_prompt(caption: str, category: str) -> str:
    """The authors' pre-training prompt: the caption followed by the subject text."""
    return f"{caption.strip().rstrip('.')}, the {category.lower()} is"


def pretraining_loss(model, pixel_values: torch.Tensor, captions: list[str], categories: list[str],
                     target: torch.Tensor | None = None, latents: torch.Tensor | None = None) -> torch.Tensor:
    """Epsilon MSE at a uniform DDPM timestep, the UNet conditioned on :func:`training_prompt` with the
    subject embeddings before its end-of-text token, dropped for ``model.drop_subject_prob`` of the rows.
    ``latents`` are cached VAE posteriors (mean and std stacked on channels), used instead of encoding
    ``target``. ``model`` is a :class:`~subjectpairs.training.blip_diffusion.BlipDiffusion`."""
    if latents is not None:
        mean, std = latents.float().chunk(2, dim=1)
        clean = mean + std * torch.randn_like(mean)
    else:
        with torch.no_grad():
            clean = model.vae.encode(target).latent_dist.sample()
    clean = clean * model.latent_scale
    noise = torch.randn_like(clean)
    steps = torch.randint(0, model.noise_scheduler.config.num_train_timesteps, (clean.shape[0],),
                          device=clean.device)
    noisy = model.noise_scheduler.add_noise(clean, noise, steps)
    ctx = model.subject_embeddings(pixel_values, categories)
    with_subject = torch.rand(len(captions)) >= model.drop_subject_prob
    hidden = model.text_conditioning([training_prompt(c, k) for c, k in zip(captions, categories)], ctx, with_subject)
    predicted = model.unet(noisy, steps, encoder_hidden_states=hidden).sample
    loss = F.mse_loss(predicted.float(), noise.float())
    if not bool(with_subject.any()):
        # Under DDP every trainable parameter needs a gradient each step, the Q-Former's too.
        loss = loss + 0.0 * ctx.sum()
    return loss
