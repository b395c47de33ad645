"""A tokenizer built on merges: new tokens enter a BPE tokenizer the way its own tokens do.

Each new token becomes a vocabulary entry of the BPE model with merges appended after
every existing merge. Every base merge has a lower rank, so the expanded tokenisation is
the original tokenisation with the new merges applied on top, inside pre-token
boundaries: a new ` iterable` is emitted in "an iterable of" but not inside ` iterables`
when BPE splits that word differently. (Hugging Face added tokens, the `added_tokens`
mode, match raw text before pre-tokenisation and would fire there.)

The merges of a new token are planned on its pieces under the current tokenizer (its
phrase ids, mid-text) by simulating BPE, so each step is the merge the expanded
tokenizer will really make. A merge path joins consecutive pieces through intermediates;
an intermediate that is already in the vocabulary or is another requested token is
reused, any other is added as a new vocabulary entry. Intermediates are reachable (BPE
emits one wherever a token's merges stop part way), so they need embeddings too.

New ids start at len(tokenizer) and are consecutive: the requested tokens kept, in
request order, then the intermediates, in the order their merges were added.
`MergeExpansion.tokens` lists them in id order with their surface text and pieces.

Tokens that can never be emitted are skipped with a reason, as in
`tokens.select_new_tokens`: already in the vocabulary, spanning a pre-token boundary
(` New York` under byte-level BPE), needing characters outside the BPE alphabet (byte
fallback or unknown pieces), or not emitted alone mid-text by the spliced tokenizer,
which is checked for every kept token. With `unreachable="added_tokens"` (for tokens
taken from a target tokenizer) those but the ones already in the vocabulary enter as
Hugging Face added tokens instead, after the merged ones.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Callable, Iterable, Sequence

from tokenizers import AddedToken
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tokdist_ray.errors import NoNewTokensError
from tokdist_ray.vocab.bpe_model import BYTE_PIECE, BpeModel, Pair, apply_merges, first_merge, surface_text
from tokdist_ray.vocab.tokens import (
    IN_VOCABULARY,
    NewToken,
    TokenSelection,
    phrase_ids,
    select_new_tokens,
    skip_counts,
)

log = logging.getLogger("tokdist_ray")

MERGES = "merges"
ADDED_TOKENS = "added_tokens"
MODES = (MERGES, ADDED_TOKENS)
SKIP = "skip"

# Skip reasons, as written into report.json (besides those of tokens.select_new_tokens).
SPANS_PRE_TOKENS = "spans_pre_token_boundary"
OUTSIDE_ALPHABET = "characters_outside_bpe_alphabet"
NOT_EMITTED = "not_emitted_after_splicing"
TOO_MANY_PIECES = "too_many_pieces"

# The merge planner's cost grows with the fourth power of a token's pieces (a dynamic
# program per merge): 400 pieces took 11 s, 800 took 158 s. Real tokens have a few dozen
# at most (a 24-character word in a foreign script under byte-level BPE).
MAX_MERGE_PIECES = 128

# An intermediate that ends inside a UTF-8 character has no surface text of its own;
# the planner takes any other path first.
_PARTIAL_CHARACTER_COST = 1000


@dataclass
class MergeExpansion:
    """The expanded tokenizer and what it added, one NewToken per new id."""

    tokenizer: PreTrainedTokenizerBase
    mode: str  # MERGES or ADDED_TOKENS
    new_start: int  # id of tokens[0]; tokens[i] has id new_start + i
    tokens: list[NewToken]  # surface text and pieces (original ids) of every new id
    n_requested: int  # tokens[:n_requested] were asked for, the rest are intermediates
    merges: list[Pair]  # appended merges in rank order, as vocabulary strings
    skipped: list[dict]  # {"token": ..., "reason": ...} for every token left out
    added_tokens: list[str] = field(default_factory=list)  # unreachable by merges, entered as added tokens (last ids)

    @property
    def requested(self) -> list[NewToken]:
        return self.tokens[: self.n_requested]

    @property
    def intermediates(self) -> list[NewToken]:
        return self.tokens[self.n_requested : len(self.tokens) - len(self.added_tokens)]


def expand_with_merges(
    tokenizer: PreTrainedTokenizerBase, new_tokens: Iterable[str], mode: str = MERGES, unreachable: str = SKIP
) -> MergeExpansion:
    """Expand `tokenizer` with `new_tokens` (surface strings, " Krankenwagen", or a
    target tokenizer: those of its tokens the model lacks).

    mode=MERGES splices vocabulary entries and merges into a BPE fast tokenizer;
    anything else falls back to ADDED_TOKENS with a warning. mode=ADDED_TOKENS is the
    reference's behaviour. `unreachable`: SKIP the tokens merges cannot produce, or give
    them ADDED_TOKENS. Raises NoNewTokensError when the filters of
    `tokens.select_new_tokens` leave nothing.
    """
    if mode not in MODES:
        raise ValueError(f"tokenizer mode must be one of {MODES}, got {mode!r}")
    if unreachable not in (SKIP, ADDED_TOKENS):
        raise ValueError(f"unreachable must be {SKIP!r} or {ADDED_TOKENS!r}, got {unreachable!r}")
    selection = select_new_tokens(tokenizer, new_tokens)
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else None
    unsupported = _why_merges_cannot_work(tokenizer_json) if mode == MERGES else None
    if unsupported:
        log.warning("new tokens enter as Hugging Face added tokens: %s", unsupported)
    if mode == ADDED_TOKENS or unsupported:
        return _expand_with_added_tokens(tokenizer, selection)

    model = BpeModel.from_tokenizer_json(tokenizer_json)
    tokens, skipped = _mergeable(tokenizer, selection, model)
    while True:
        expansion = _splice(tokenizer, model, tokens, skipped)
        missing = not_emitted(expansion)
        if not missing:
            expansion = _with_added_tokens(expansion, selection) if unreachable == ADDED_TOKENS else expansion
            if not expansion.tokens:
                raise NoNewTokensError(
                    f"merges can build none of the {len(expansion.skipped)} tokens ({skip_counts(expansion.skipped)}); "
                    f"pass tokens that are one pre-token of at most {MAX_MERGE_PIECES} pieces each (a word with its "
                    "leading space, e.g. ' Krankenwagen', not ' New York'), or use tokenizer_mode added_tokens"
                )
            return expansion
        skipped = skipped + [{"token": t, "reason": NOT_EMITTED} for t in missing]
        tokens = [t for t in tokens if t.text not in set(missing)]


def _why_merges_cannot_work(tokenizer_json: dict | None) -> str | None:
    """Why new merges cannot be spliced into this tokenizer, or None if they can."""
    if tokenizer_json is None:
        return "the tokenizer is not a fast (Rust) tokenizer"
    model = tokenizer_json["model"]
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')}, not BPE"
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE model marks word-internal pieces (continuing_subword_prefix / end_of_word_suffix)"
    return None


def add_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Sequence[NewToken]) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` with `tokens` as non-normalised Hugging Face added tokens (each
    string encodes to its one id wherever it occurs in raw text), at consecutive new ids."""
    expanded = copy.deepcopy(tokenizer)
    start = len(tokenizer)
    expanded.add_tokens([AddedToken(t.text, normalized=False, special=False) for t in tokens])
    ids = expanded.convert_tokens_to_ids([t.text for t in tokens])
    if ids != list(range(start, start + len(tokens))):
        raise RuntimeError(f"new tokens did not receive consecutive ids from {start}; got {ids[:5]}...")
    return expanded


def _expand_with_added_tokens(tokenizer: PreTrainedTokenizerBase, selection: TokenSelection) -> MergeExpansion:
    expanded = add_tokens(tokenizer, selection.tokens)
    tokens = list(selection.tokens)
    return MergeExpansion(expanded, ADDED_TOKENS, len(tokenizer), tokens, len(tokens), [], selection.skipped)


def _with_added_tokens(expansion: MergeExpansion, selection: TokenSelection) -> MergeExpansion:
    """The tokens merges cannot produce entered as added tokens, after the merged ones."""
    fallback = {s["token"] for s in expansion.skipped if s["reason"] in (SPANS_PRE_TOKENS, OUTSIDE_ALPHABET, NOT_EMITTED)}
    tokens = [t for t in selection.tokens if t.text in fallback]
    if not tokens:
        return expansion
    log.info("%d tokens merges cannot produce enter as added tokens", len(tokens))
    return MergeExpansion(
        add_tokens(expansion.tokenizer, tokens), MERGES, expansion.new_start, expansion.tokens + tokens,
        expansion.n_requested, expansion.merges, [s for s in expansion.skipped if s["token"] not in fallback],
        [t.text for t in tokens],
    )


def _mergeable(
    tokenizer: PreTrainedTokenizerBase, selection: TokenSelection, model: BpeModel
) -> tuple[list[NewToken], list[dict]]:
    """(tokens a merge path can build, skipped = the selection's skips and the others)."""
    backend = tokenizer.backend_tokenizer
    encodings = backend.encode_batch(["\n" + t.text for t in selection.tokens], add_special_tokens=False)
    tokens, skipped = [], list(selection.skipped)
    for token, encoding in zip(selection.tokens, encodings):
        parts = [backend.id_to_token(i) for i in token.phrase_ids]
        reason = _unmergeable_reason(parts, encoding.word_ids[-len(parts) :], model)
        if reason:
            skipped.append({"token": token.text, "reason": reason})
        else:
            tokens.append(token)
    if too_long := [s["token"] for s in skipped if s["reason"] == TOO_MANY_PIECES]:
        log.warning("%d tokens are skipped: more than %d pieces each, beyond what merges are planned for (%s)",
                    len(too_long), MAX_MERGE_PIECES, ", ".join(repr(t[:24] + "...") for t in too_long[:3]))
    return tokens, skipped


def _unmergeable_reason(parts: list[str], pre_token_ids: list[int | None], model: BpeModel) -> str | None:
    """Why no merge path can build a token from its pieces, or None."""
    settings = model.tokenizer_json["model"]
    if "".join(parts) in model.vocab:  # in the vocabulary, though BPE never emits it here
        return IN_VOCABULARY
    if len(parts) > MAX_MERGE_PIECES:
        return TOO_MANY_PIECES
    if len(set(pre_token_ids)) > 1:
        return SPANS_PRE_TOKENS
    if any(p == settings.get("unk_token") or (settings.get("byte_fallback") and BYTE_PIECE.match(p)) for p in parts):
        return OUTSIDE_ALPHABET
    return None


class _MergePlanner:
    """Grows the new merges and vocabulary entries one requested token at a time."""

    def __init__(self, model: BpeModel, requested: set[str], surface: Callable[[list[str]], str]):
        self.model = model
        self.ranks = dict(model.ranks)
        self.requested = requested
        self.surface = surface
        self.merges: list[Pair] = []
        self.entries: dict[str, tuple[int, ...]] = {}  # new vocabulary string -> pieces, in creation order

    def add(self, parts: list[str], piece_ids: tuple[int, ...]) -> None:
        """Append merges until BPE joins `parts` (a token's pieces) into one token."""
        ends = list(accumulate(map(len, parts)))
        state = apply_merges(parts, self.ranks)
        while len(state) > 1:
            i = first_merge(state, self._entry_cost)
            start = sum(map(len, state[:i]))
            end = start + len(state[i]) + len(state[i + 1])
            self._add_merge(state[i], state[i + 1], piece_ids[bisect_right(ends, start) : bisect_left(ends, end) + 1])
            state = apply_merges(parts, self.ranks)

    def _entry_cost(self, token: str) -> int:
        if token in self.model.vocab or token in self.entries or token in self.requested:
            return 0
        return _PARTIAL_CHARACTER_COST if "\ufffd" in self.surface([token]) else 1

    def _add_merge(self, left: str, right: str, piece_ids: tuple[int, ...]) -> None:
        # The new merge ranks after every merge so far, so it fires only where BPE has
        # nothing else left to merge; base merges may still fire on what it produces.
        self.ranks[left, right] = self.model.n_merges + len(self.merges)
        self.merges.append((left, right))
        if left + right not in self.model.vocab:
            self.entries.setdefault(left + right, piece_ids)


def _splice(
    tokenizer: PreTrainedTokenizerBase, model: BpeModel, tokens: list[NewToken], skipped: list[dict]
) -> MergeExpansion:
    """Plan the merges of `tokens` and build the expanded tokenizer."""
    backend = tokenizer.backend_tokenizer
    surface = surface_text(backend)
    strings = ["".join(backend.id_to_token(i) for i in t.phrase_ids) for t in tokens]
    planner = _MergePlanner(model, set(strings), surface)
    for token in tokens:
        planner.add([backend.id_to_token(i) for i in token.phrase_ids], token.phrase_ids)
    intermediates = [s for s in planner.entries if s not in planner.requested]
    start = len(tokenizer)
    new_vocab = {s: start + i for i, s in enumerate(strings + intermediates)}
    expanded = tokenizer_from_json(tokenizer, model.spliced(new_vocab, planner.merges))
    if expanded.get_added_vocab() != tokenizer.get_added_vocab():
        raise RuntimeError("splicing merges moved the tokenizer's added tokens to other ids")
    new_tokens = tokens + [NewToken(_intermediate_text(surface, s), planner.entries[s]) for s in intermediates]
    return MergeExpansion(expanded, MERGES, start, new_tokens, len(tokens), planner.merges, skipped)


def _intermediate_text(surface, vocab_string: str) -> str:
    """An intermediate's surface text. One that ends inside a UTF-8 character has none:
    it decodes to U+FFFD, as every other such piece does, and reports, quotas and
    snippet counts key tokens by text; it goes by its vocabulary string, unique to it."""
    text = surface([vocab_string])
    return vocab_string if "\ufffd" in text else text


def tokenizer_from_json(tokenizer: PreTrainedTokenizerBase, tokenizer_json: str) -> PreTrainedTokenizerBase:
    """`tokenizer` with its backend replaced by `tokenizer_json`, loaded the way
    AutoTokenizer loads a saved directory, so special tokens, BOS/EOS handling, the
    post-processor and the chat template stay, and a reload encodes identically."""
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        Path(directory, "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        expanded = AutoTokenizer.from_pretrained(directory)
    expanded.name_or_path = tokenizer.name_or_path
    return expanded


def not_emitted(expansion: MergeExpansion) -> list[str]:
    """Requested tokens that `phrase_ids` under the expanded tokenizer does not give as
    their one new id. One batch encodes them all; the few it does not settle (where the
    newline context merges with the token) go through `phrase_ids` itself."""
    backend = expansion.tokenizer.backend_tokenizer
    context = backend.encode("\n", add_special_tokens=False).ids
    texts = [t.text for t in expansion.requested]
    encodings = backend.encode_batch(["\n" + t for t in texts], add_special_tokens=False)
    return [
        text
        for i, (text, encoding) in enumerate(zip(texts, encodings))
        if encoding.ids != context + [expansion.new_start + i]
        and phrase_ids(expansion.tokenizer, text) != [expansion.new_start + i]
    ]
