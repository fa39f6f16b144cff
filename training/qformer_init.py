"""Starting weights of stage 1: the Q-Former built from CLIP and BERT as BLIP-2 builds it, or converted from
LAVIS's ``blip2_pretrain_vitL`` checkpoint.

Both return the Q-Former (:class:`~.qformer.SubjectQFormer`, the released BLIP-Diffusion layout), the stage-1
heads (:class:`~.qformer_pretraining.QFormerPretrainingHeads`) and the BERT tokenizer with ``[DEC]`` added.

From CLIP and BERT (LAVIS's ``Blip2Base.init_vision_encoder`` and ``init_Qformer``): the image encoder is the
CLIP vision tower without its last layer and its final LayerNorm (LAVIS's ``create_clip_vit_L``: 23 of
ViT-L/14's 24 layers), in BLIP-2's fused-qkv layout; ``ln_vision``, the LayerNorm after it, is new. The
Q-Former's embeddings, self-attention and feed-forward layers are BERT's; the queries' feed-forward layers
(``*_query``) start as copies of BERT's; the cross-attention layers, the queries and the contrastive and
matching heads are new; ``[DEC]`` gets a new embedding row; the LM head is BERT's masked-LM head where the
BERT checkpoint has one (``bert-base-uncased`` has), else new. As LAVIS, BERT's token-type embeddings are
not used (the Q-Former has none).

From LAVIS (``Blip2Qformer`` state dict, ``clip_L`` vision, ``cross_attention_freq`` 2, 32 queries): every
weight is converted; the Q-Former keeps its cross-attention frequency; the first ``num_query_tokens``
queries are kept (BLIP-Diffusion uses 16), so the result is a warm start, not the paper's own stage-1
checkpoint. LAVIS saves no frozen weights in its checkpoints; where the file has no image encoder, it is
taken from a CLIP model as above (LAVIS's ``clip_vit_L.pth`` is OpenAI's ViT-L/14).
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, Blip2Config, CLIPVisionConfig, CLIPVisionModel
from transformers.utils import logging as transformers_logging

from subjectpairs.errors import InputError

from .model_folders import DEFAULT_QFORMER_TOKENIZER, load_bert_tokenizer
from .qformer import NUM_QUERY_TOKENS, SubjectQFormer
from .qformer_pretraining import QFormerPretrainingConfig, QFormerPretrainingHeads

# LAVIS's image-encoder width per attention head (CLIP's ViTs: 64) and the Q-Former's (BERT-base: 64);
# its checkpoints hold no configs.
LAVIS_HEAD_WIDTH = 64
LAVIS_TOKENIZER_HINT = "pass the BERT tokenizer of the checkpoint (LAVIS: bert-base-uncased) as --qformer-tokenizer"


def _from_pretrained(cls, source: str, flag: str, optional_prefixes: tuple[str, ...] = ()):
    """``cls.from_pretrained`` that refuses a checkpoint missing any weight but those under
    ``optional_prefixes`` (returned as a set of the missing names). Unused weights (CLIP's text tower,
    BERT's pooler and next-sentence head) are expected."""
    # transformers logs a table of every unused weight (a whole text tower); what matters is checked here
    report = transformers_logging.get_logger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        model, info = cls.from_pretrained(source, output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise InputError(f"{flag} {source}: cannot load it as {cls.__name__} ({str(exc).splitlines()[0]})") from exc
    finally:
        report.setLevel(level)
    missing = set(info["missing_keys"])
    required = sorted(key for key in missing if not key.startswith(optional_prefixes))
    if required or info["mismatched_keys"]:
        names = required or [key if isinstance(key, str) else key[0] for key in info["mismatched_keys"]]
        raise InputError(f"{flag} {source}: weights do not fit {cls.__name__} "
                         f"({'missing' if required else 'mismatched'} {', '.join(names[:5])})")
    return model.eval(), missing


def _vision_config(width: int, layers: int, heads: int, intermediate: int, image_size: int, patch: int,
                   eps: float = 1e-5, activation: str = "quick_gelu") -> dict:
    """The frozen encoder's config: CLIP's ViT in BLIP-2's layout, ``layers`` layers (OpenAI's CLIPs, LAVIS's
    ``clip_vit`` included, use QuickGELU)."""
    return {"hidden_size": width, "intermediate_size": intermediate, "num_hidden_layers": layers,
            "num_attention_heads": heads, "image_size": image_size, "patch_size": patch,
            "hidden_act": activation, "layer_norm_eps": eps, "qkv_bias": True}


def _qformer_config(vision: dict, qformer: dict, num_query_tokens: int) -> Blip2Config:
    return Blip2Config(vision_config=vision, qformer_config=qformer, num_query_tokens=num_query_tokens)


def _fused_qkv(q_weight, k_weight, v_weight, q_bias, v_bias) -> dict[str, torch.Tensor]:
    """BLIP-2's fused projection. The key bias is dropped: it adds the same amount to a query's every
    attention logit, which the softmax cancels, and BLIP-2's layout has none."""
    return {"qkv.weight": torch.cat([q_weight, k_weight, v_weight]),
            "qkv.bias": torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])}


# -- CLIP's vision tower -----------------------------------------------------------------------------------

def vision_weights_from_clip(clip: CLIPVisionModel, layers: int) -> dict[str, torch.Tensor]:
    """``visual_encoder.*`` weights (but ``post_layernorm``, BLIP-2's new ``ln_vision``) from a transformers
    CLIP vision tower's first ``layers`` layers."""
    # transformers 5's CLIPVisionModel holds the tower's parts itself; earlier ones under ``vision_model``
    source = {name.removeprefix("vision_model."): tensor.detach() for name, tensor in clip.state_dict().items()}
    out = {
        "embeddings.class_embedding": source["embeddings.class_embedding"].reshape(1, 1, -1),
        "embeddings.patch_embedding.weight": source["embeddings.patch_embedding.weight"],
        "embeddings.position_embedding": source["embeddings.position_embedding.weight"][None],
        "pre_layernorm.weight": source["pre_layrnorm.weight"],
        "pre_layernorm.bias": source["pre_layrnorm.bias"],
    }
    for index in range(layers):
        layer = f"encoder.layers.{index}."  # the same prefix in both layouts
        weight = {part: source[f"{layer}self_attn.{part}_proj.weight"] for part in "qkv"}
        bias = {part: source[f"{layer}self_attn.{part}_proj.bias"] for part in "qv"}
        fused = _fused_qkv(weight["q"], weight["k"], weight["v"], bias["q"], bias["v"])
        out.update({f"{layer}self_attn.{name}": tensor for name, tensor in fused.items()})
        out[f"{layer}self_attn.projection.weight"] = source[f"{layer}self_attn.out_proj.weight"]
        out[f"{layer}self_attn.projection.bias"] = source[f"{layer}self_attn.out_proj.bias"]
        for name in ("layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2"):
            out[f"{layer}{name}.weight"] = source[f"{layer}{name}.weight"]
            out[f"{layer}{name}.bias"] = source[f"{layer}{name}.bias"]
    return {f"visual_encoder.{name}": tensor for name, tensor in out.items()}


def load_clip_vision(clip: str) -> tuple[CLIPVisionModel, dict]:
    """A CLIP model's vision tower (a whole CLIP folder or hub id, or a vision-only one) and the BLIP-2
    image encoder's config of its layers but the last."""
    model, _ = _from_pretrained(CLIPVisionModel, clip, "--clip")
    config: CLIPVisionConfig = model.config
    if config.num_hidden_layers < 2:
        raise InputError(f"--clip {clip}: {config.num_hidden_layers} layer; BLIP-2 drops the last of at least 2")
    vision = _vision_config(config.hidden_size, config.num_hidden_layers - 1, config.num_attention_heads,
                            config.intermediate_size, config.image_size, config.patch_size, config.layer_norm_eps,
                            config.hidden_act)
    return model, vision


# -- from CLIP and BERT ----------------------------------------------------------------------------------

def qformer_from_clip_and_bert(clip: str, bert: str, num_query_tokens: int = NUM_QUERY_TOKENS,
                               cross_attention_frequency: int = 1,
                               config: QFormerPretrainingConfig = QFormerPretrainingConfig()):
    """BLIP-Diffusion's stage-1 start: CLIP ViT (``clip``, e.g. ``openai/clip-vit-large-patch14``) and a
    Q-Former from BERT (``bert``, e.g. ``bert-base-uncased``, whose tokenizer it uses), a cross-attention
    in every layer (BLIP-Diffusion's ``cross_attention_freq`` 1). New weights are drawn from torch's global
    random stream, so the caller seeds them. Returns (Q-Former, heads, tokenizer)."""
    tokenizer = load_bert_tokenizer(bert, "", f"--bert {bert} tokenizer", "pass a BERT folder with its vocabulary")
    clip_model, vision = load_clip_vision(clip)
    masked_lm, missing = _from_pretrained(BertForMaskedLM, bert, "--bert", optional_prefixes=("cls.",))
    bert_config: BertConfig = masked_lm.config
    if len(tokenizer) - 1 != bert_config.vocab_size:
        raise InputError(f"--bert {bert}: its tokenizer has {len(tokenizer) - 1} tokens, its embeddings "
                         f"{bert_config.vocab_size}")
    qformer_config = {
        "vocab_size": len(tokenizer), "hidden_size": bert_config.hidden_size,
        "num_hidden_layers": bert_config.num_hidden_layers, "num_attention_heads": bert_config.num_attention_heads,
        "intermediate_size": bert_config.intermediate_size, "hidden_act": bert_config.hidden_act,
        "hidden_dropout_prob": bert_config.hidden_dropout_prob,
        "attention_probs_dropout_prob": bert_config.attention_probs_dropout_prob,
        "max_position_embeddings": bert_config.max_position_embeddings,
        "initializer_range": bert_config.initializer_range, "layer_norm_eps": bert_config.layer_norm_eps,
        "pad_token_id": tokenizer.pad_token_id, "cross_attention_frequency": cross_attention_frequency,
        "encoder_hidden_size": vision["hidden_size"],
    }
    qformer = SubjectQFormer(_qformer_config(vision, qformer_config, num_query_tokens))
    heads = QFormerPretrainingHeads(qformer.config.qformer_config, config.embed_dim, config.initial_temperature)
    weights = vision_weights_from_clip(clip_model, vision["num_hidden_layers"])
    weights.update(_qformer_weights_from_bert(masked_lm.bert.state_dict(), qformer))
    _load_exactly(qformer, weights, new=("visual_encoder.post_layernorm.", "query_tokens", "proj_layer.",
                                         "crossattention."), source=f"--bert {bert}")
    if not any(key.startswith("cls.predictions.transform.") for key in missing):
        head = masked_lm.cls.predictions
        heads.lm_head.transform.load_state_dict(head.transform.state_dict())
        with torch.no_grad():
            heads.lm_head.bias[: bert_config.vocab_size] = head.bias
            heads.lm_head.bias[bert_config.vocab_size:] = 0
    return qformer.eval(), heads, tokenizer


def _qformer_weights_from_bert(bert: dict[str, torch.Tensor], qformer: SubjectQFormer) -> dict[str, torch.Tensor]:
    """The Q-Former's weights that BERT gives (LAVIS's ``init_Qformer``): embeddings (the ``[DEC]`` row new),
    self-attention, and the feed-forward layers, also as the queries' ``*_query`` copies."""
    words = qformer.embeddings.word_embeddings.weight.detach().clone()
    words[: bert["embeddings.word_embeddings.weight"].shape[0]] = bert["embeddings.word_embeddings.weight"]
    out = {"embeddings.word_embeddings.weight": words}
    for name in ("position_embeddings.weight", "LayerNorm.weight", "LayerNorm.bias"):
        out[f"embeddings.{name}"] = bert[f"embeddings.{name}"]
    for index in range(qformer.config.qformer_config.num_hidden_layers):
        layer = f"encoder.layer.{index}."  # the same prefix in both layouts
        for kind in ("weight", "bias"):
            for part in ("query", "key", "value"):
                out[f"{layer}attention.attention.{part}.{kind}"] = bert[f"{layer}attention.self.{part}.{kind}"]
            for name in ("attention.output.dense", "attention.output.LayerNorm"):
                out[f"{layer}{name}.{kind}"] = bert[f"{layer}{name}.{kind}"]
            for name, query_name in (("intermediate.dense", "intermediate_query.dense"),
                                     ("output.dense", "output_query.dense"),
                                     ("output.LayerNorm", "output_query.LayerNorm")):
                out[f"{layer}{name}.{kind}"] = out[f"{layer}{query_name}.{kind}"] = bert[f"{layer}{name}.{kind}"]
    return out


def _load_exactly(qformer: SubjectQFormer, weights: dict[str, torch.Tensor], new: tuple[str, ...],
                  source: str) -> None:
    """``weights`` into ``qformer``, each of the right shape, every weight covered but those whose names
    contain one of ``new`` (left as initialised)."""
    own = qformer.state_dict()
    for name, tensor in weights.items():
        if name not in own:
            raise InputError(f"{source}: has a weight that the Q-Former does not ({name})")
        if own[name].shape != tensor.shape:
            raise InputError(f"{source}: {name} is {tuple(tensor.shape)}, the Q-Former needs {tuple(own[name].shape)}")
    uncovered = [name for name in own if name not in weights and not any(part in name for part in new)]
    if uncovered:
        raise InputError(f"{source}: has no weights for {', '.join(uncovered[:5])}")
    qformer.load_state_dict(weights, strict=False)


# -- from LAVIS ----------------------------------------------------------------------------------------

def read_lavis_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS checkpoint file (``{"model": state_dict, ...}``), read without running
    pickled code."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise InputError(f"--init {path}: not a LAVIS checkpoint ({str(exc).splitlines()[0]})") from exc
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "query_tokens" not in state or "Qformer.bert.embeddings.word_embeddings.weight" \
            not in state:
        raise InputError(f"--init {path}: not a LAVIS BLIP-2 checkpoint (no query_tokens and Qformer.bert weights)")
    return state


def _indices(state: dict, pattern: str) -> list[int]:
    found = {int(match.group(1)) for name in state if (match := re.match(pattern, name))}
    return sorted(found)


def vision_weights_from_lavis(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """``visual_encoder.*`` weights (but ``post_layernorm``) and the encoder's config from LAVIS's
    ``clip_vit`` (``conv1``, ``transformer.resblocks.N``, ...)."""
    layers = _indices(state, r"visual_encoder\.transformer\.resblocks\.(\d+)\.")
    conv = state["visual_encoder.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual_encoder.positional_embedding"].shape[0] - 1) ** 0.5)
    intermediate = state["visual_encoder.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    vision = _vision_config(width, len(layers), width // LAVIS_HEAD_WIDTH, intermediate, grid * patch, patch)
    out = {
        "embeddings.class_embedding": state["visual_encoder.class_embedding"].reshape(1, 1, -1),
        "embeddings.patch_embedding.weight": conv,
        "embeddings.position_embedding": state["visual_encoder.positional_embedding"][None],
        "pre_layernorm.weight": state["visual_encoder.ln_pre.weight"],
        "pre_layernorm.bias": state["visual_encoder.ln_pre.bias"],
    }
    for index in layers:
        theirs, ours = f"visual_encoder.transformer.resblocks.{index}.", f"encoder.layers.{index}."
        q, k, v = state[f"{theirs}attn.in_proj_weight"].chunk(3)
        q_bias, _, v_bias = state[f"{theirs}attn.in_proj_bias"].chunk(3)
        out.update({f"{ours}self_attn.{name}": tensor for name, tensor in _fused_qkv(q, k, v, q_bias, v_bias).items()})
        for mine, lavis in (("self_attn.projection", "attn.out_proj"), ("layer_norm1", "ln_1"),
                            ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
            out[f"{ours}{mine}.weight"] = state[f"{theirs}{lavis}.weight"]
            out[f"{ours}{mine}.bias"] = state[f"{theirs}{lavis}.bias"]
    return {f"visual_encoder.{name}": tensor for name, tensor in out.items()}, vision


def qformer_from_lavis(checkpoint: str | Path, clip: str | None = None, tokenizer: str | None = None,
                       num_query_tokens: int = NUM_QUERY_TOKENS):
    """LAVIS's ``blip2_pretrain_vitL`` (or another ``Blip2Qformer`` on ``clip_L``) converted: the first
    ``num_query_tokens`` queries; the image encoder from the checkpoint, else from ``clip`` (its layers but
    the last); ``tokenizer``: its BERT tokenizer (default ``bert-base-uncased``, LAVIS's). Returns
    (Q-Former, heads, tokenizer)."""
    path = str(checkpoint)
    state = read_lavis_checkpoint(path)
    source = tokenizer or DEFAULT_QFORMER_TOKENIZER
    bert_tokenizer = load_bert_tokenizer(source, "", f"Q-Former tokenizer {source}", LAVIS_TOKENIZER_HINT)
    try:
        if any(name.startswith("visual_encoder.") for name in state):
            weights, vision = vision_weights_from_lavis(state)
        elif clip:
            clip_model, vision = load_clip_vision(clip)
            weights = vision_weights_from_clip(clip_model, vision["num_hidden_layers"])
        else:
            raise InputError(f"--init {path}: holds no image encoder (LAVIS saves no frozen weights); pass its "
                             "CLIP as --clip (LAVIS's clip_L: openai/clip-vit-large-patch14)")
        for kind in ("weight", "bias"):
            weights[f"visual_encoder.post_layernorm.{kind}"] = state[f"ln_vision.{kind}"]
        words = state["Qformer.bert.embeddings.word_embeddings.weight"]
        if words.shape[0] != len(bert_tokenizer):
            raise InputError(f"--init {path}: {words.shape[0]} word embeddings, but the tokenizer {source} has "
                             f"{len(bert_tokenizer)} tokens with [DEC]; {LAVIS_TOKENIZER_HINT}")
        queries = state["query_tokens"]
        if queries.shape[1] < num_query_tokens:
            raise InputError(f"--init {path}: {queries.shape[1]} queries, fewer than {num_query_tokens}")
        layers = _indices(state, r"Qformer\.bert\.encoder\.layer\.(\d+)\.")
        cross = _indices(state, r"Qformer\.bert\.encoder\.layer\.(\d+)\.crossattention\.")
        width = words.shape[1]
        qformer_config = {
            "vocab_size": words.shape[0], "hidden_size": width, "num_hidden_layers": len(layers),
            "num_attention_heads": width // LAVIS_HEAD_WIDTH,
            "intermediate_size": state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0],
            "max_position_embeddings": state["Qformer.bert.embeddings.position_embeddings.weight"].shape[0],
            "cross_attention_frequency": cross[1] - cross[0] if len(cross) > 1 else max(len(layers), 1),
            "encoder_hidden_size": vision["hidden_size"], "pad_token_id": bert_tokenizer.pad_token_id,
        }
        qformer = SubjectQFormer(_qformer_config(vision, qformer_config, num_query_tokens))
        weights["query_tokens"] = queries[:, :num_query_tokens]
        weights.update(_qformer_weights_from_lavis(state))
        _load_exactly(qformer, weights, new=("proj_layer.",), source=f"--init {path}")
        heads = QFormerPretrainingHeads(qformer.config.qformer_config, state["vision_proj.weight"].shape[0],
                                        float(state["temp"]))
        heads.load_state_dict(_heads_from_lavis(state))
    except KeyError as exc:
        raise InputError(f"--init {path}: not a LAVIS Blip2Qformer checkpoint on CLIP (no {exc.args[0]})") from exc
    except RuntimeError as exc:  # a head of another shape
        raise InputError(f"--init {path}: {str(exc).splitlines()[0]}") from exc
    return qformer.eval(), heads, bert_tokenizer


def _qformer_weights_from_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LAVIS's ``Qformer.bert.*``: the layout of transformers' Q-Former but for ``self`` (here
    ``attention``) inside the attention blocks."""
    out = {}
    for name, tensor in state.items():
        if not name.startswith("Qformer.bert.") or name.endswith("position_ids"):
            continue
        mine = name[len("Qformer.bert."):]
        mine = re.sub(r"\.(attention|crossattention)\.self\.", r".\1.attention.", mine)
        out[mine] = tensor
    return out


def _heads_from_lavis(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    heads = {name: state[name] for name in state if name.split(".")[0] in ("vision_proj", "text_proj", "itm_head")}
    heads["temp"] = state["temp"].reshape(())
    prefix = "Qformer.cls.predictions."
    heads["lm_head.bias"] = state[f"{prefix}bias"]
    heads.update({f"lm_head.{name[len(prefix):]}": tensor for name, tensor in state.items()
                  if name.startswith(f"{prefix}transform.")})
    return heads

