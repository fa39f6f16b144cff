"""``subjectpairs latents``: side-car shards of the targets' VAE posteriors, keyed like the pairs.

Training with them skips the VAE encoder in every step. Each pair shard gets a latent shard of the same
name holding ``<key>.latent.npy`` (float16, the posterior's mean then std, 8 x size/8 x size/8), and the
folder a ``manifest.json`` that records which VAE made them, so a run with another VAE refuses them.
"""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from subjectpairs import storage
from subjectpairs.configfile import CONFIG_FILE, config_yaml
from subjectpairs.corpus.layout import LATENT_MEMBER, MANIFEST_FILE, TARGET_MEMBER
from subjectpairs.corpus.manifest import LatentManifest
from subjectpairs.corpus.reader import ShardInfo, iter_shard, resolve_shards
from subjectpairs.corpus.writer import shard_tar_writer, write_latent_member
from subjectpairs.devices import resolve_device
from subjectpairs.errors import InputError
from subjectpairs.guards import OutputLock, refuse_overlap
from subjectpairs.identifiers import check_sample_key
from subjectpairs.raycluster import start_ray

from .config import LatentsConfig
from .data import target_pixels


@dataclass(frozen=True)
class VaeSource:
    """The VAE of a run: ``init``'s, or that of the random ``kind`` model built from ``seed``."""

    kind: str
    init: str | None
    seed: int

    def load(self):
        from .blip_diffusion import BlipDiffusion
        from .model_folders import load_component

        if self.init:
            from diffusers import AutoencoderKL

            return load_component(AutoencoderKL, self.init, "vae")

        return BlipDiffusion.from_config(self.kind, seed=self.seed).vae


def vae_fingerprint(vae) -> str:
    """SHA-256 over the VAE's weights: latents are only valid for the VAE that made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def encode_shard(shard: ShardInfo, out: str, vae, target_size: int, batch_size: int) -> dict:
    """One pair shard -> its latent shard; returns its manifest entry."""
    import torch

    device = next(vae.parameters()).device
    name = Path(shard.uri.rstrip("/")).name
    keys: list[str] = []
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(scratch) / name
        with shard_tar_writer(str(local)) as writer:  # reproducible bytes, as the pair shards
            batch: list[tuple[str, np.ndarray]] = []

            def flush() -> None:
                pixels = torch.from_numpy(np.stack([p for _, p in batch])).to(device)
                with torch.no_grad():
                    posterior = vae.encode(pixels).latent_dist
                stacked = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
                for (key, _), latent in zip(batch, stacked):
                    write_latent_member(writer, key, latent)
                    keys.append(key)
                batch.clear()

            for sample in _readable_samples(shard.uri, frozenset({TARGET_MEMBER})):
                try:
                    batch.append((check_sample_key(sample["__key__"], "sample key"),
                                  target_pixels(sample[TARGET_MEMBER], target_size)))
                except Exception as exc:  # no latent for it: training skips the pair and counts it
                    skipped.append({"key": sample["__key__"], "reason": f"{type(exc).__name__}: {exc}"})
                    continue
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
        storage.publish_file(str(local), storage.join(out, name))
    return {"name": name, "samples": len(keys), "first_key": keys[0] if keys else None,
            "last_key": keys[-1] if keys else None, "skipped": skipped}


def _readable_samples(uri: str, members: frozenset[str]):
    """:func:`iter_shard`, with a shard that does not open or breaks off an InputError naming it."""
    try:
        yield from iter_shard(uri, members)
    except Exception as exc:  # tarfile, pyarrow and fsspec raise many types for a broken or missing file
        raise InputError(f"{uri}: cannot read the shard ({type(exc).__name__}: {exc})") from exc


def write_latents(config: LatentsConfig) -> dict:
    """Latent shards for every pair shard, one Ray task per shard (on a GPU where the cluster has one), into
    an ``out`` checked against the inputs and locked for the run; the config goes beside them, its local
    paths absolute, so that ``--config OUT/config.yaml`` reruns it from anywhere."""
    local_init = config.init is not None and (storage.is_remote(config.init) or Path(config.init).exists())
    config = config.model_copy(update={
        "out": storage.absolute(config.out), "shards": [storage.absolute(spec) for spec in config.shards],
        "init": storage.absolute(config.init) if local_init else config.init})
    out = config.out
    for spec in config.shards:
        refuse_overlap(out, {"--shards": spec})
    source = VaeSource(config.model, config.init, config.seed)
    refuse_overlap(out, {"--init": source.init if local_init else None})  # a hub id is no folder of ours
    with OutputLock(out, "latents"):
        manifest = _write_latents_locked(config.shards, out, source, config.batch_size, config.address)
        storage.publish_bytes(storage.join(out, CONFIG_FILE), config_yaml(config, "latents"))
        return manifest


def _write_latents_locked(shards: list[str], out: str, source: VaeSource, batch_size: int,
                          address: str | None) -> dict:
    import ray

    out = storage.absolute(out)
    pair_shards = resolve_shards([storage.absolute(spec) for spec in shards])
    if not pair_shards:
        raise InputError(f"no pair shards in {', '.join(shards)}")
    owns_ray = start_ray(address, include_dashboard=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0

    @ray.remote(num_gpus=gpus, max_retries=2)
    def encode(shard: ShardInfo) -> dict:
        vae = source.load().to(resolve_device()).eval()
        size = vae.config.sample_size
        return encode_shard(shard, out, vae, size, batch_size)

    vae = source.load()
    try:
        entries = ray.get([encode.remote(shard) for shard in pair_shards])
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, InputError):  # its one line, not the task's traceback
            raise exc.cause from None
        raise
    finally:
        if owns_ray:
            ray.shutdown()
    manifest = {"kind": LATENT_MEMBER, "vae": {"kind": source.kind, "init": source.init, "seed": source.seed,
                                               "sha256": vae_fingerprint(vae)},
                "target_size": vae.config.sample_size, "shards": entries}
    storage.publish_bytes(storage.join(out, MANIFEST_FILE), LatentManifest.model_validate(manifest).to_bytes())
    return manifest


def check_latents(latents: list[str], vae, target_size: int) -> None:
    """Refuse latent folders made by another VAE than the run's, or for another target size."""
    expected = vae_fingerprint(vae)
    for folder in latents:
        try:
            manifest = LatentManifest.read(folder)
        except InputError as exc:
            raise InputError(f"{exc}; make latents with `subjectpairs latents`") from exc
        if manifest is None:
            raise InputError(f"{folder}: no {MANIFEST_FILE}; make latents with `subjectpairs latents`")
        if manifest.target_size != target_size:
            raise InputError(f"{folder}: latents of {manifest.target_size} px targets, the model trains on "
                             f"{target_size} px")
        if manifest.vae.get("sha256") != expected:
            raise InputError(f"{folder}: latents made by another VAE than this run's (rerun `subjectpairs latents` "
                             "with the run's --model/--init/--seed)")
