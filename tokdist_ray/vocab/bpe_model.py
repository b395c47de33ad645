"""The BPE model inside a Hugging Face fast tokenizer, as the merge planner needs it.

Works on the vocabulary strings of the model (`Ġiterable` in byte-level BPE, `▁iterable`
in SentencePiece-style BPE), never on surface text: a merge joins two vocabulary strings
into their concatenation, whichever family the tokenizer belongs to.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Callable

Pair = tuple[str, str]
BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # a byte-fallback piece of SentencePiece-style BPE


def surface_text(backend) -> Callable[[list[str]], str]:
    """Surface text of vocabulary strings as they appear mid-document (after a newline,
    so that decoders which strip a leading space at the start of text keep it).
    `backend` is a tokenizers.Tokenizer."""
    decode = backend.decoder.decode if backend.decoder is not None else "".join
    context = [backend.id_to_token(i) for i in backend.encode("\n", add_special_tokens=False).ids]
    prefix = decode(context)
    return lambda strings: decode(context + strings)[len(prefix) :]


@dataclass
class BpeModel:
    """The `model` section of a tokenizer.json: vocabulary and merges in rank order."""

    tokenizer_json: dict
    vocab: dict[str, int]
    ranks: dict[Pair, int]  # merge -> rank (0 is applied first)

    @classmethod
    def from_tokenizer_json(cls, tokenizer_json: dict) -> "BpeModel":
        merges = tokenizer_json["model"]["merges"]
        pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
        return cls(tokenizer_json, tokenizer_json["model"]["vocab"], {pair: rank for rank, pair in enumerate(pairs)})

    @property
    def n_merges(self) -> int:
        return len(self.tokenizer_json["model"]["merges"])

    def spliced(self, new_vocab: dict[str, int], new_merges: list[Pair]) -> str:
        """tokenizer.json with the new entries in the vocabulary and the new merges after
        every existing one, written in the file's own merge format ("a b" or ["a", "b"]).

        Added tokens outside the model's vocabulary (Llama 3's specials) enter it at their
        ids: on load, the tokenizers library gives such a token the id after the model's
        vocabulary, which would now be a new entry's.
        """
        model = dict(self.tokenizer_json["model"])
        added = {t["content"]: t["id"] for t in self.tokenizer_json["added_tokens"] if t["content"] not in self.vocab}
        model["vocab"] = {**self.vocab, **added, **new_vocab}
        as_strings = bool(model["merges"]) and isinstance(model["merges"][0], str)
        model["merges"] = model["merges"] + [f"{a} {b}" if as_strings else [a, b] for a, b in new_merges]
        return json.dumps({**self.tokenizer_json, "model": model}, ensure_ascii=False)


def apply_merges(parts: list[str], ranks: dict[Pair, int]) -> list[str]:
    """BPE on a pre-token's parts, in the order of the tokenizers library: repeatedly the
    adjacent pair with the lowest rank, the leftmost one among equals."""
    parts = list(parts)
    while len(parts) > 1:
        ranked = [(ranks[pair], i) for i, pair in enumerate(zip(parts, parts[1:])) if pair in ranks]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def first_merge(parts: list[str], entry_cost: Callable[[str], int]) -> int:
    """Index i of the pair (parts[i], parts[i + 1]) to merge first on the cheapest binary
    merge tree that joins all parts into one.

    A tree costs the sum of `entry_cost` over its inner nodes, the root excepted (the
    root is the token itself). Ties go to the left-deep tree, whose intermediates are
    prefixes of the token (` Kranken` on the way to ` Krankenwagen`).
    """
    n = len(parts)
    best: dict[tuple[int, int], tuple[int, int]] = {(i, i + 1): (0, 0) for i in range(n)}  # span -> (cost, -split)
    for width in range(2, n + 1):
        for i in range(n - width + 1):
            j = i + width
            node = 0 if width == n else entry_cost("".join(parts[i:j]))
            best[i, j] = min((best[i, k][0] + best[k, j][0] + node, -k) for k in range(i + 1, j))
    i, j = 0, n
    while True:
        k = -best[i, j][1]
        if k - i >= 2:
            j = k
        elif j - k >= 2:
            i = k
        else:
            return i
