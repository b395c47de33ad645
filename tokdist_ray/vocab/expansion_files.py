"""An expansion on disk: the expanded tokenizer's directory plus expansion.json (the
mode, every new id with its surface text and pieces, the merges, the skipped tokens).
The tokens stage writes it; mining, training, export and evaluation all read it, so
every stage and process uses the one tokenizer that is exported."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.tokens import NewToken

EXPANSION_JSON = "expansion.json"


def expansion_summary(expansion: MergeExpansion) -> dict:
    """What report.json says about the tokenizer: mode, counts, skipped tokens."""
    return {
        "mode": expansion.mode,
        "new_ids": len(expansion.tokens),
        "requested_tokens": expansion.n_requested,
        "intermediate_tokens": [t.text for t in expansion.intermediates],
        "merges_added": len(expansion.merges),
        "added_tokens": expansion.added_tokens,  # unreachable by merges, entered as added tokens
        "unreachable_or_skipped": expansion.skipped,
    }


def save_expansion(expansion: MergeExpansion, directory: str | Path) -> Path:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    expansion.tokenizer.save_pretrained(out)
    record = {
        "mode": expansion.mode,
        "new_start": expansion.new_start,
        "n_requested": expansion.n_requested,
        "tokens": [{"token": t.text, "id": expansion.new_start + i, "pieces": list(t.phrase_ids)}
                   for i, t in enumerate(expansion.tokens)],
        "merges": [list(m) for m in expansion.merges],
        "skipped": expansion.skipped,
        "added_tokens": expansion.added_tokens,
    }
    (out / EXPANSION_JSON).write_text(json.dumps(record, indent=1, ensure_ascii=False), encoding="utf-8")
    return out


def load_expansion(directory: str | Path) -> MergeExpansion:
    path = Path(directory)
    record = json.loads((path / EXPANSION_JSON).read_text(encoding="utf-8"))
    tokens = [NewToken(t["token"], tuple(t["pieces"])) for t in record["tokens"]]
    return MergeExpansion(
        AutoTokenizer.from_pretrained(path), record["mode"], record["new_start"], tokens, record["n_requested"],
        [tuple(m) for m in record["merges"]], record["skipped"], record["added_tokens"],
    )
