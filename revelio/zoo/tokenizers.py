"""Offline tokenizers for the tiny zoo models: a CLIP BPE and a T5 unigram over a small vocabulary.

Every word of the vocabulary is one token; any other word still tokenizes, character by
character, so free-text prompts and multi-token concepts work as with real tokenizers.
"""

from __future__ import annotations

from transformers import CLIPTokenizer, T5TokenizerFast

from ..datasets.digits import WORDS as DIGIT_WORDS
from ..datasets.shapes import COLORS, SHAPES

COMMON = (
    "a an the and of on in with at to is are this that photo picture image drawing painting of handwritten digit "
    "number background foreground floor tree grass sky person face dog cat car house water wall road field object "
    "objects shape shapes small large big little left right top bottom middle center corner next above below "
    "one two three some many colour color colorful bright dark light white black gray grey brown pink"
).split()
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?"


def vocabulary() -> list[str]:
    """The whole-word vocabulary: shapes-world words, digit names and common words, in a fixed order."""
    words = list(SHAPES) + list(COLORS) + list(DIGIT_WORDS) + COMMON + [s + "s" for s in SHAPES]
    return list(dict.fromkeys(words))


def build_clip_tokenizer(max_length: int = 32) -> CLIPTokenizer:
    """CLIP-style BPE: characters, ``char</w>`` ends of words, and merges that build each vocabulary word."""
    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}

    def add(tok: str) -> None:
        vocab.setdefault(tok, len(vocab))

    for c in CHARS:
        add(c)
        add(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen = set()
    for w in vocabulary():
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        cur = pieces[0]
        for p in pieces[1:]:
            if (cur, p) not in seen:
                seen.add((cur, p))
                merges.append((cur, p))
            cur += p
            add(cur)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_t5_tokenizer(max_length: int = 32) -> T5TokenizerFast:
    """T5-style unigram with ``▁word`` pieces for the vocabulary and single characters as fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -4.0)]
    pieces += [("▁" + w, -1.0) for w in vocabulary()]
    pieces += [(c, -6.0) for c in CHARS]
    pieces += [("▁" + c, -5.0) for c in CHARS if not any(p[0] == "▁" + c for p in pieces)]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
