"""Small tokenizers built locally, for tiny models (tests, the demo, benchmarks with random weights).

Real runs load the tokenizers that ship with the weights (``tokenizer/`` of a diffusers folder, and the
Q-Former's BERT vocabulary). These are built from a small vocabulary in the same file formats, so they go
through the very same ``from_pretrained`` code.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# Words that the demo captions and the OpenImages category names use most; each becomes one token.
COMMON_WORDS = (
    "a an the of on in with and is are at to photo picture image close up view small large white black "
    "red blue green brown grey gray yellow orange pink old new two its sitting standing lying front top "
    "table floor grass wall background dog cat bird horse car bus boat truck bicycle cup coffee mug "
    "rocket astronaut person flower fruit apple orange toy ball shoe bag chair lamp bottle clock camera "
    "man woman building house tower sky water tree road street"
).split()
WORD_CHARS = string.ascii_lowercase + string.digits + "-'"
PUNCTUATION = ".,!?:;()\"/&"


def write_clip_bpe(folder: Path, words: tuple[str, ...] | list[str] = COMMON_WORDS) -> tuple[Path, Path]:
    """``vocab.json`` and ``merges.txt`` for a CLIP BPE tokenizer: characters, then one merge chain per
    word (left to right), so each listed word is a single token and anything else falls back to
    characters."""
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for char in WORD_CHARS + PUNCTUATION:
            vocab[char + suffix] = len(vocab)
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merge = f"{merged} {piece}"
            merged += piece
            if merge not in merges:
                merges.append(merge)
                vocab.setdefault(merged, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return vocab_file, merges_file


def write_bert_wordpiece(folder: Path, words: tuple[str, ...] | list[str] = COMMON_WORDS) -> Path:
    """``vocab.txt`` for a BERT WordPiece tokenizer: specials, characters, continuation characters and
    the listed words."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += list(WORD_CHARS + PUNCTUATION) + [f"##{char}" for char in WORD_CHARS]
    tokens += [word for word in dict.fromkeys(words) if word not in tokens]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(tokens) + "\n")
    return vocab_file


def tiny_clip_tokenizer(scratch: Path, model_max_length: int = 77):
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_bpe(scratch)
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=model_max_length)


def tiny_bert_tokenizer(scratch: Path):
    from transformers import BertTokenizer

    return BertTokenizer(str(write_bert_wordpiece(scratch)), truncation_side="right")
