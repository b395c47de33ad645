"""Export: the expanded model and tokenizer as a Hugging Face directory, plus report.json.

New tokens are added as non-normalised added tokens, so each new token string encodes to
its one new id. New ids start at len(tokenizer); the embedding tables grow only if they
have no spare (padding) rows there. Rows below len(tokenizer) are copied bit for bit.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import AddedToken

from tokdist_ray.report import write_report
from tokdist_ray.vocab.tokens import NewToken


def expand_tokenizer(tokenizer, tokens: Sequence[NewToken]):
    """A copy of `tokenizer` with the new tokens; checks they got consecutive new ids."""
    expanded = copy.deepcopy(tokenizer)
    start = len(tokenizer)
    expanded.add_tokens([AddedToken(t.text, normalized=False, special=False) for t in tokens])
    ids = expanded.convert_tokens_to_ids([t.text for t in tokens])
    if ids != list(range(start, start + len(tokens))):
        raise RuntimeError(f"new tokens did not receive consecutive ids from {start}; got {ids[:5]}...")
    return expanded


@torch.no_grad()
def expand_model(model, new_start: int, input_rows: torch.Tensor, output_rows: torch.Tensor | None = None):
    """Write the new rows into `model` (in place) at ids new_start.., growing its tables
    only when needed. Tied models take only input rows."""
    n_new = len(input_rows)
    tied = model.get_output_embeddings() is None or (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    if tied and output_rows is not None:
        raise ValueError("a tied model has no separate output rows to set")
    needed = new_start + n_new
    if model.get_input_embeddings().weight.shape[0] < needed:
        model.resize_token_embeddings(needed, mean_resizing=False)
    emb = model.get_input_embeddings().weight
    emb[new_start:needed] = input_rows.to(emb.dtype)
    if not tied:
        head = model.get_output_embeddings().weight
        head[new_start:needed] = (output_rows if output_rows is not None else torch.zeros_like(input_rows)).to(head.dtype)
    return model


def save_expanded(model, tokenizer, out_path: str | Path, report: dict | None = None) -> Path:
    """Save as safetensors only (never pickle) with the tokenizer and report.json."""
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if report is not None:
        write_report(out / "report.json", report)
    return out
