"""New tokens: read them, normalise whitespace markers, tokenise their phrases, filter.

A new token is added to the tokenizer as its surface string (" Krankenwagen", leading
space included). Its *phrase* is the list of original ids the model sees for that string
today; distillation teaches the one new id to stand for the whole phrase.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from transformers import PreTrainedTokenizerBase

from tokdist_ray.config import has_lone_surrogate
from tokdist_ray.errors import NoNewTokensError, TooFewSnippetsError

GPT_BPE_SPACE = "Ġ"  # byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM)
SENTENCEPIECE_SPACE = "▁"  # SentencePiece (Llama 2, Mistral, Gemma)
_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")

# Skip reasons, as written into report.json.
EMPTY = "empty"
DUPLICATE = "duplicate"
SPECIAL = "special_token"
BYTE_TOKEN = "byte_token"
PARTIAL_UTF8 = "partial_utf8"
IN_VOCABULARY = "already_in_vocabulary"
TOO_FEW_SNIPPETS = "too_few_snippets"



def skip_counts(skipped: Sequence[dict]) -> dict[str, int]:
    """How many candidates were skipped for each reason."""
    return dict(Counter(s["reason"] for s in skipped))


@dataclass(frozen=True)
class NewToken:
    text: str  # surface string added to the tokenizer, a leading space written as " "
    phrase_ids: tuple[int, ...]  # the original ids this token replaces


@dataclass
class TokenSelection:
    tokens: list[NewToken]
    skipped: list[dict] = field(default_factory=list)  # {"token": ..., "reason": ...}

    def skip_counts(self) -> dict[str, int]:
        return skip_counts(self.skipped)


def normalise_token(token: str) -> str:
    """Write whitespace markers of either convention as a plain space."""
    return token.replace(GPT_BPE_SPACE, " ").replace(SENTENCEPIECE_SPACE, " ")


def phrase_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The original ids of `text` as it appears mid-document.

    Tokenising the bare string goes wrong for SentencePiece tokenizers, which prepend a
    space marker at the start of input, and tells nothing about BOS handling. So we
    tokenise it after a newline (which no pre-tokenizer merges with a following word or
    space) and drop the newline's ids. BOS/EOS never enter: add_special_tokens=False.
    """
    context = tokenizer("\n", add_special_tokens=False)["input_ids"]
    ids = tokenizer("\n" + text, add_special_tokens=False)["input_ids"]
    if ids[: len(context)] == context and len(ids) > len(context):
        return ids[len(context) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def read_token_file(path: str | Path) -> list[str]:
    """Tokens from a JSON list or a text file with one token per line.

    Leading spaces in a text file are part of the token (" Krankenwagen"); only the line
    break is removed. `Ġ`/`▁` markers are accepted as well. A UTF-8 byte order mark is
    not part of the first token.
    """
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"token file {path} {problem}; pass a .txt (one token per line) or .json list")
    text = _utf8_text(path)
    if path.suffix != ".json":
        return _lines(text)
    tokens = json.loads(text)
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path} must hold a JSON list of strings, e.g. [\" Krankenwagen\", \" Schmetterling\"]")
    _refuse_lone_surrogates(path, tokens)
    return tokens


def _utf8_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problem = f"line {line} is not UTF-8 (byte 0x{data[e.start]:02x})"
        raise ValueError(f"{path}: {problem}; save the file as UTF-8") from None


def _lines(text: str) -> list[str]:
    """One token per line, split at LF (and CR LF) only: str.splitlines() also splits at
    U+0085, U+2028, vertical tab, form feed and more, which may be part of a token."""
    lines = text.split("\n")
    if lines[-1] == "":  # the last line's line break ends it, it starts no empty token
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def _refuse_lone_surrogates(path: Path, tokens: list[str]) -> None:
    """A JSON escape can name half of a surrogate pair alone; the run failed on it only
    after it had started."""
    for i, token in enumerate(tokens, 1):
        if has_lone_surrogate(token):
            raise ValueError(
                f"{path}: entry {i} ({token!r}) holds a lone surrogate (half of a \\uXXXX\\uXXXX pair), "
                "which is no character; write the character itself, or both halves of its pair"
            )


def split_token_string(tokens: str) -> list[str]:
    """The reference CLI's `--new_tokens " Krankenwagen, Schmetterling"`: comma separated,
    spaces kept, so both tokens here start with a space."""
    return tokens.split(",")


def target_tokenizer_candidates(target: PreTrainedTokenizerBase) -> tuple[list[str], list[dict]]:
    """All tokens of a target tokenizer as surface strings, in id order (a full vocabulary
    expansion). Returns (candidates, skipped) where skipped holds special tokens, byte
    tokens and byte-level pieces that are not whole UTF-8 characters."""
    special = set(target.all_special_tokens) | {
        t.content for t in target.added_tokens_decoder.values() if t.special
    }
    decoder = target.backend_tokenizer.decoder if target.is_fast else None
    byte_level = decoder is not None and type(decoder).__name__ == "ByteLevel"
    candidates, skipped = [], []
    for token, _ in sorted(target.get_vocab().items(), key=lambda kv: kv[1]):
        if token in special:
            skipped.append({"token": token, "reason": SPECIAL})
        elif _BYTE_TOKEN.match(token):
            skipped.append({"token": token, "reason": BYTE_TOKEN})
        elif byte_level:
            text = decoder.decode([token])
            if "\ufffd" in text:
                skipped.append({"token": token, "reason": PARTIAL_UTF8})
            else:
                candidates.append(text)
        else:
            candidates.append(token)
    return candidates, skipped


def select_new_tokens(
    tokenizer: PreTrainedTokenizerBase,
    candidates: Iterable[str] | PreTrainedTokenizerBase,
) -> TokenSelection:
    """Normalise and filter candidates against the source tokenizer.

    Every candidate ends up either as a NewToken or in `skipped` with its reason, so the
    report accounts for all of them. Raises NoNewTokensError if none is left.
    """
    skipped: list[dict] = []
    if isinstance(candidates, PreTrainedTokenizerBase):
        candidates, skipped = target_tokenizer_candidates(candidates)
    candidates = list(candidates)
    if not candidates and not skipped:
        raise NoNewTokensError("the new token list is empty; pass at least one token, e.g. [\" Krankenwagen\"]")

    special = set(tokenizer.all_special_tokens)
    seen: set[str] = set()
    tokens: list[NewToken] = []
    for raw in candidates:
        text = normalise_token(raw)
        reason = None
        if not text.strip():
            reason = EMPTY
        elif text in seen:
            reason = DUPLICATE
        elif raw in special or text in special:
            reason = SPECIAL
        elif _BYTE_TOKEN.match(text):
            reason = BYTE_TOKEN
        else:
            ids = phrase_ids(tokenizer, text)
            if len(ids) <= 1:
                reason = IN_VOCABULARY
        if reason:
            skipped.append({"token": raw, "reason": reason})
            continue
        seen.add(text)
        tokens.append(NewToken(text=text, phrase_ids=tuple(ids)))

    if not tokens:
        counts = skip_counts(skipped)
        raise NoNewTokensError(
            f"no new tokens left after filtering {len(skipped)} candidates ({counts}); "
            "every token was empty, duplicated, special, a byte token or already a single token "
            "in the model's vocabulary. Pass words the tokenizer splits into several pieces."
        )
    return TokenSelection(tokens=tokens, skipped=skipped)


def tokens_from_spec(spec: str | Sequence[str] | PreTrainedTokenizerBase) -> list[str] | PreTrainedTokenizerBase:
    """Accept what users pass on the command line or in a config: a list, a path to a
    .txt/.json file, a comma-separated string, or a tokenizer object."""
    if isinstance(spec, PreTrainedTokenizerBase) or isinstance(spec, (list, tuple)):
        return spec if isinstance(spec, PreTrainedTokenizerBase) else list(spec)
    if Path(spec).suffix in (".txt", ".json") or Path(spec).is_file():
        return read_token_file(spec)
    return split_token_string(spec)


def not_distilled_note(entries: Sequence[dict], minimum: int, strategy: str) -> str:
    """For the console: the tokens left undistilled (the first few), in one line."""
    first = ", ".join(f"{e['token']!r} {e['snippets']}" for e in entries[:8])
    have = "no snippet" if minimum == 1 else f"fewer than {minimum} snippets"
    return (f"{len(entries)} new tokens have {have} and keep their {strategy} rows, "
            f"not distilled ({first}{', ...' if len(entries) > 8 else ''})")


def tokens_to_distill(
    tokens: Sequence[NewToken], snippet_counts: dict[str, int], minimum: int
) -> tuple[list[NewToken], list[dict]]:
    """(tokens with at least `minimum` snippets, entries for the others). The others stay
    in the tokenizer, which emits them, and keep their pre-initialised rows (they are
    still trained where they occur in other tokens' snippets). Raises
    TooFewSnippetsError when none is left."""
    kept = [t for t in tokens if snippet_counts.get(t.text, 0) >= minimum]
    skipped = [
        {"token": t.text, "reason": TOO_FEW_SNIPPETS, "snippets": snippet_counts.get(t.text, 0)}
        for t in tokens if snippet_counts.get(t.text, 0) < minimum
    ]
    if not kept:
        raise TooFewSnippetsError(
            f"none of the {len(tokens)} new tokens has {minimum} snippet(s) in the data; use a larger or more "
            "in-domain corpus, raise max_docs, or fill the shortfall with generated snippets "
            "(top_up_with_generation=True in the API, data.top_up_with_generation: true in a job)"
        )
    return kept, skipped
