"""Reading and writing BLIP-Diffusion model folders as diffusers lays them out, strictly.

A folder (or hub repository) holds ``model_index.json``, ``qformer/``, ``text_encoder/``, ``tokenizer/``,
``unet/``, ``vae/``, ``scheduler/`` and ``image_processor/``, as the released ``Salesforce/blipdiffusion``.
Every weight file must fit its module exactly (:func:`load_component`); the Q-Former's tokenizer is found as
diffusers finds it and must be able to tokenize words (:func:`load_qformer_tokenizer`); what is written
(:func:`write_weights_as_released`, :func:`save_vocabulary_files`) is what diffusers' own classes read.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertTokenizer, PretrainedConfig, PreTrainedModel

from subjectpairs.errors import InputError

# diffusers' Q-Former loads the tokenizer its config names, else this one.
DEFAULT_QFORMER_TOKENIZER = "bert-base-uncased"
# What an export names: its own qformer/ folder, relative to the model folder (see load_qformer_tokenizer).
EXPORT_QFORMER_TOKENIZER = "qformer"
# BLIP-2's beginning-of-sequence token of the Q-Former's caption decoder, which diffusers adds too.
DECODER_BOS_TOKEN = "[DEC]"
# Category words that every usable tokenizer has as tokens, the tiny test vocabularies included.
PROBE_WORDS = ("dog", "cup", "car")
QFORMER_TOKENIZER_HINT = ("pass a BERT tokenizer folder or hub id: --set qformer_tokenizer=FOLDER (train), "
                          "--qformer-tokenizer FOLDER (generate), or \"tokenizer\" in qformer/config.json")


def _file_path(source: str, subfolder: str, name: str) -> Path | None:
    """``subfolder/name`` of a model folder or hub repository, None where it has no such file."""
    local = Path(source)
    if local.is_dir():
        path = local / subfolder / name
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, name, subfolder=subfolder or None))
    except Exception:  # not published, or offline
        return None


def check_model_source(flag: str, source: str, marker: str) -> None:
    """A local folder must hold ``marker`` (its config file); a path that is no folder must look like a hub
    id (``owner/name``), so that a mistyped folder fails in the driver with its name instead of as a hub
    lookup in every worker."""
    local = Path(source).expanduser()
    if local.exists() and not (local / marker).is_file():
        raise InputError(f"{flag} {source}: a folder without {marker}")
    if not local.exists() and (source.startswith((".", "/", "~")) or source.count("/") != 1):
        raise InputError(f"{flag} {source}: no such folder (nor a hub id)")


def read_json_file(source: str | Path, subfolder: str, name: str) -> dict:
    """A JSON file of a model folder or hub repository; {} where it has none."""
    path = _file_path(str(source), subfolder, name)
    if path is None:
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a JSON file ({exc})") from exc


def qformer_subfolder(source: str) -> str:
    """``qformer`` for a whole BLIP-Diffusion folder or hub repository, "" for a Q-Former folder (or, offline,
    a hub id: a Q-Former repository has its config at the root)."""
    return "qformer" if _file_path(source, "qformer", "config.json") is not None else ""


def _tokenizer_beside_model(qformer: str, subfolder: str, named: str) -> str:
    """A relative folder named in the Q-Former's config, taken from the model folder (the one holding
    ``qformer/``), so that a moved or copied export still finds its own tokenizer; anything else (a hub
    id, an absolute path) as given, as diffusers passes it on."""
    root = Path(qformer)
    if not root.is_dir() or Path(named).is_absolute():
        return named
    if not subfolder and (root.parent / "model_index.json").is_file():
        root = root.parent  # the qformer/ folder of a whole model folder, given on its own
    return str(root / named) if (root / named).is_dir() else named


def check_tokenizes(tokenizer, described: str, hint: str) -> None:
    """transformers 5 builds a tokenizer of special tokens only, without an error, from a folder without a
    vocabulary or from a hub id while offline; every word would become the unknown token."""
    for word in PROBE_WORDS:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if not ids or all(token == tokenizer.unk_token_id for token in ids):
            raise InputError(f"{described}: a vocabulary of {len(tokenizer)} tokens that cannot tokenize "
                             f"{word!r}; {hint}")


def load_qformer_tokenizer(qformer: str | Path, override: str | None = None) -> BertTokenizer:
    """The BERT tokenizer of the Q-Former in ``qformer`` (a BLIP-Diffusion or Q-Former folder or hub id),
    the first of: ``override``; the ``"tokenizer"`` that the Q-Former's ``config.json`` names, which
    diffusers' Q-Former loads (a relative folder is taken from the model folder); a vocabulary saved beside
    the Q-Former; ``bert-base-uncased``, diffusers' default. ``[DEC]`` is added as the beginning-of-sequence
    token, as diffusers does. A tokenizer that does not load or cannot tokenize common category words is an
    InputError naming what to pass."""
    qformer = str(qformer)
    subfolder = qformer_subfolder(qformer)
    named = PretrainedConfig.get_config_dict(qformer, subfolder=subfolder)[0].get("tokenizer")
    if override:
        source, inner, origin = override, "", "qformer_tokenizer"
    elif named:
        config = f"{qformer}/{subfolder}/config.json" if subfolder else f"{qformer}/config.json"
        source, inner, origin = _tokenizer_beside_model(qformer, subfolder, named), "", f'"tokenizer" in {config}'
    elif any(_file_path(qformer, subfolder, name) for name in ("vocab.txt", "tokenizer.json")):
        source, inner, origin = qformer, subfolder, "saved beside the Q-Former"
    else:
        source, inner, origin = DEFAULT_QFORMER_TOKENIZER, "", f"none named or saved in {qformer}, so the default"
    described = f"Q-Former tokenizer {source}{f'/{inner}' if inner else ''} ({origin})"
    return load_bert_tokenizer(source, inner, described, QFORMER_TOKENIZER_HINT)


def load_bert_tokenizer(source: str, subfolder: str, described: str, hint: str) -> BertTokenizer:
    """A BERT tokenizer that truncates on the right and tokenizes common words, with ``[DEC]`` as its
    beginning-of-sequence token; an InputError naming ``described``
    and ``hint`` otherwise."""
    try:
        tokenizer = BertTokenizer.from_pretrained(source, subfolder=subfolder, truncation_side="right")
    except (OSError, ValueError) as exc:
        raise InputError(f"{described}: cannot load it ({str(exc).splitlines()[0]}); {hint}") from exc
    check_tokenizes(tokenizer, described, hint)
    if DECODER_BOS_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"bos_token": DECODER_BOS_TOKEN})
    return tokenizer


def load_component(cls, source: str, subfolder: str):
    """``cls.from_pretrained`` that stops on weights that do not fit the module exactly: transformers and
    diffusers leave a missing weight randomly initialised, with a log line at most, and a model on random
    weights must never pass for a trained one."""
    where = f"{source}/{subfolder}" if subfolder else source
    # transformers raises on mismatched shapes without naming them; told to skip them, it lists them
    options = {"ignore_mismatched_sizes": True} if issubclass(cls, PreTrainedModel) else {}
    try:
        model, info = cls.from_pretrained(source, subfolder=subfolder, output_loading_info=True, **options)
    except ValueError as exc:  # diffusers refuses mismatched shapes itself, naming the first
        raise InputError(f"{where}: weights do not fit {cls.__name__} ({str(exc).splitlines()[0]})") from exc
    mismatched = [key if isinstance(key, str) else key[0] for key in info["mismatched_keys"]]
    problems = [f"{kind} {', '.join(sorted(keys)[:5])}{', ...' if len(keys) > 5 else ''}"
                for kind, keys in (("missing", info["missing_keys"]), ("unexpected", info["unexpected_keys"]),
                                   ("mismatched", mismatched)) if keys]
    if problems:
        raise InputError(f"{where}: weights do not match {cls.__name__} ({'; '.join(problems)})")
    return model


def write_weights_as_released(folder: Path, prefix: str, position_ids: torch.Tensor) -> None:
    """Weight names as diffusers' module has them: under ``prefix``, and with the position ids that it
    keeps as a saved buffer. transformers 5 saves no such buffer, and puts the prefix back only on a
    module that it loaded through the prefix mapping, not on one built from a config."""
    file = folder / "model.safetensors"
    weights = {name if name.startswith(prefix) else prefix + name: tensor for name, tensor in load_file(file).items()}
    weights[f"{prefix}embeddings.position_ids"] = position_ids.detach().cpu().contiguous()
    save_file(weights, file, metadata={"format": "pt"})


def save_vocabulary_files(tokenizer, folder: Path) -> None:
    """The tokenizer as the released repository holds it: vocabulary files (``vocab.json`` and
    ``merges.txt``, or ``vocab.txt``), ``special_tokens_map.json`` and ``tokenizer_config.json``, which
    diffusers' slow tokenizer classes read. No ``tokenizer.json``: transformers 5 builds the same tokenizer
    from the vocabulary files."""
    tokenizer.save_pretrained(folder)
    tokenizer.backend_tokenizer.model.save(str(folder))
    (folder / "special_tokens_map.json").write_text(json.dumps(tokenizer.special_tokens_map, indent=2))
    (folder / "tokenizer.json").unlink()


def save_qformer_folder(qformer, tokenizer, folder: Path) -> Path:
    """A Q-Former folder in the released layout (``qformer/`` of ``Salesforce/blipdiffusion``), its BERT
    tokenizer's vocabulary files beside the weights, where :func:`load_qformer_tokenizer` finds them."""
    qformer.save_pretrained(folder)
    write_weights_as_released(folder, "", qformer.embeddings.position_ids)
    save_vocabulary_files(tokenizer, folder)
    return folder


# A fine-tuned model folder's cached subject embedding (``subjectpairs finetune``), at the folder's root
# where diffusers' loader, which reads only the components model_index.json names, leaves it alone.
SUBJECT_EMBEDDING_FILE = "subject_embedding.safetensors"


def save_subject_embedding(folder: Path, embedding: torch.Tensor, category: str) -> Path:
    """``embedding`` (1, 16, H) with the subject's category in the file's metadata."""
    path = Path(folder) / SUBJECT_EMBEDDING_FILE
    save_file({"subject_embedding": embedding.detach().float().cpu().contiguous()}, path,
              metadata={"format": "pt", "category": category})
    return path


def load_subject_embedding(source: str | Path) -> tuple[torch.Tensor, str] | None:
    """The cached subject embedding and its category of a fine-tuned folder or hub repository; None where
    the model has none (a zero-shot model)."""
    from safetensors import safe_open

    path = _file_path(str(source), "", SUBJECT_EMBEDDING_FILE)
    if path is None:
        return None
    try:
        with safe_open(str(path), framework="pt") as weights:
            category = (weights.metadata() or {}).get("category", "")
            embedding = weights.get_tensor("subject_embedding")
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise InputError(f"{path}: not a subject embedding file ({str(exc).splitlines()[0]})") from exc
    if embedding.ndim != 3 or embedding.shape[0] != 1 or not category:
        raise InputError(f"{path}: expected a (1, queries, width) subject embedding with its category")
    return embedding, category
