"""Which token positions of a tokenized prompt belong to which word (sub-token merging)."""

from __future__ import annotations

import string

from ..config import RevelioError


class WordNotInPrompt(RevelioError, KeyError):
    """A word asked for is not in the prompt; the message lists the words that are."""


def normalise(word: str) -> str:
    return word.strip(string.punctuation + " ").lower()


def word_positions(tokenizer, input_ids: list[int]) -> list[tuple[str, list[int]]]:
    """Split a tokenized prompt back into (word, token positions) pairs.

    The prompt text is decoded from ``input_ids``; each whitespace-separated word is
    tokenized alone and matched at the running position, which holds for BPE (CLIP) and
    unigram (T5) tokenizers because both split on whitespace first. Positions index
    ``input_ids`` itself, so a start token shifts them by one. Punctuation glued to a word
    ("circle,") stays with the word's pieces only if the bare word's pieces do not match.
    """
    special = set(tokenizer.all_special_ids)
    text = tokenizer.decode(input_ids, skip_special_tokens=True)
    cursor = 0
    while cursor < len(input_ids) and input_ids[cursor] in special:
        cursor += 1
    out: list[tuple[str, list[int]]] = []
    for raw in text.split():
        pieces = tokenizer(raw, add_special_tokens=False).input_ids
        if input_ids[cursor:cursor + len(pieces)] != pieces:
            break  # truncated prompt: the rest of the words have no tokens
        bare = normalise(raw)
        bare_pieces = tokenizer(bare, add_special_tokens=False).input_ids if bare else []
        n = len(bare_pieces) if bare_pieces and pieces[:len(bare_pieces)] == bare_pieces else len(pieces)
        if bare:
            out.append((bare, list(range(cursor, cursor + n))))
        cursor += len(pieces)
    return out


def positions_of(query: str, words: list[tuple[str, list[int]]]) -> list[int]:
    """Token positions of every word in ``query`` (each occurrence in the prompt); clear error if absent."""
    wanted = [normalise(w) for w in query.split() if normalise(w)]
    if not wanted:
        raise WordNotInPrompt(f"empty word {query!r}; words in the prompt: {', '.join(dict.fromkeys(w for w, _ in words))}")
    found: list[int] = []
    for w in wanted:
        hits = [p for word, pos in words if word == w for p in pos]
        if not hits:
            raise WordNotInPrompt(f"{w!r} is not in the prompt; available words: "
                                  f"{', '.join(dict.fromkeys(w for w, _ in words))}")
        found += hits
    return found
