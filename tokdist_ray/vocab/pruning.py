"""New tokens taken back out of a merge expansion, merges kept consistent.

A new token goes with the merges that build it. Two kinds of token stay whatever they
cost:

- one that a kept token is built from (an operand of one of its merges): without it the
  kept token could never form;
- one whose text would, without it, still hold a new token: ` tous` taken out while
  ` tou` stays (for ` toujours`) leaves ` tou` + `s` wherever ` tous` was, and ` tou`'s
  output row was fitted to be unlikely exactly there, so taking ` tous` out would cost
  bits instead of saving them. A token taken out thus leaves its original pieces, as the
  original model reads them, which is what its cost was measured against.

The kept tokens keep their order, so ids stay consecutive from new_start: the requested
tokens first, then the intermediates.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Iterable, Mapping

from tokdist_ray.vocab.merges import MERGES, MergeExpansion, not_emitted, tokenizer_from_json


def cannot_prune(expansion: MergeExpansion) -> str | None:
    """Why tokens cannot be taken out of this expansion, or None."""
    if expansion.mode != MERGES:
        return "the new tokens are Hugging Face added tokens, not merges"
    if expansion.added_tokens:
        return "some new tokens entered as added tokens, after the merged ones"
    return None


def corpus_occurrences(expansion: MergeExpansion, counts: Mapping[str, int]) -> list[int] | None:
    """Each new token's occurrences in the corpus continued BPE learned it on
    (vocab/bpe_training.py: the expanded tokenizer tokenises that corpus as its merges did):
    its count when learned, less one for each firing of a later merge built from it.
    None unless every new token has a count (tokens chosen another way)."""
    if not counts or any(t.text not in counts for t in expansion.tokens):
        return None
    index = _new_index(expansion)
    left = [counts[t.text] for t in expansion.tokens]
    for pair in expansion.merges:
        built = index.get("".join(pair))
        for side in pair:
            if built is not None and side in index:
                left[index[side]] -= counts[expansion.tokens[built].text]
    return left


def _new_index(expansion: MergeExpansion) -> dict[str, int]:
    """Each new token's vocabulary string -> its index in expansion.tokens."""
    return {expansion.tokenizer.convert_ids_to_tokens(expansion.new_start + i): i for i in range(len(expansion.tokens))}


def _built_on(expansion: MergeExpansion, keep: set[int]) -> set[int]:
    """`keep` and every token a kept one is built from."""
    index = _new_index(expansion)
    keep = set(keep)
    for left, right in reversed(expansion.merges):  # a merge's operands are built by earlier merges
        if index.get(left + right) in keep:
            keep.update(index[part] for part in (left, right) if part in index)
    return keep


def _leaving_new_ids(pruned: MergeExpansion, texts: list[str]) -> list[bool]:
    """For each text, whether the pruned tokenizer still gives it a new id mid-document."""
    backend = pruned.tokenizer.backend_tokenizer
    context = backend.encode("\n", add_special_tokens=False).ids
    encodings = backend.encode_batch(["\n" + t for t in texts], add_special_tokens=False)
    return [any(i >= pruned.new_start for i in e.ids[len(context):]) for e in encodings]


def prune(expansion: MergeExpansion, drop: Iterable[int]) -> tuple[MergeExpansion, list[int]]:
    """(the expansion without the tokens at indices `drop` that can go, the indices of the
    tokens kept): all others, those kept tokens are built from, and those whose text would
    still hold a new token (see the module's docstring)."""
    reason = cannot_prune(expansion)
    if reason:
        raise ValueError(f"cannot take new tokens out: {reason}")
    keep = _built_on(expansion, set(range(len(expansion.tokens))) - set(drop))
    while True:
        pruned = without_tokens(expansion, sorted(keep))
        gone = sorted(set(range(len(expansion.tokens))) - keep)
        back = {i for i, left in zip(gone, _leaving_new_ids(pruned, [expansion.tokens[i].text for i in gone])) if left}
        if not back:
            return pruned, sorted(keep)
        keep = _built_on(expansion, keep | back)


def without_tokens(expansion: MergeExpansion, keep: list[int]) -> MergeExpansion:
    """The expansion with only the new tokens at indices `keep` (every token a kept one is
    built from among them), their merges alone after the original ones, renumbered from
    new_start."""
    backend = expansion.tokenizer.backend_tokenizer
    strings = [backend.id_to_token(expansion.new_start + i) for i in range(len(expansion.tokens))]
    kept_strings = {strings[i] for i in keep}
    data = json.loads(backend.to_str())
    model = data["model"]
    model["vocab"] = {s: i for s, i in model["vocab"].items() if i < expansion.new_start} | {
        strings[i]: expansion.new_start + k for k, i in enumerate(keep)}
    n_original = len(model["merges"]) - len(expansion.merges)
    merges = [m for m, (left, right) in zip(model["merges"][n_original:], expansion.merges) if left + right in kept_strings]
    model["merges"] = model["merges"][:n_original] + merges
    pruned = replace(
        expansion, tokenizer=tokenizer_from_json(expansion.tokenizer, json.dumps(data, ensure_ascii=False)),
        tokens=[expansion.tokens[i] for i in keep], n_requested=sum(i < expansion.n_requested for i in keep),
        merges=[m for m in expansion.merges if m[0] + m[1] in kept_strings])
    missing = not_emitted(pruned)
    if missing:  # `keep` holds every token a kept one is built from: this is a bug, not bad input
        raise RuntimeError(f"after taking tokens out, {len(missing)} kept tokens are no longer emitted: {missing[:5]}")
    return pruned
