"""Export: the expanded model and tokenizer as a Hugging Face directory, plus report.json.

New ids start at len(tokenizer); the embedding tables grow only if they have no spare
(padding) rows there. Rows below len(tokenizer) are copied bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokdist_ray.atomic import write_json
from tokdist_ray.vocab.models import ties_word_embeddings


@torch.no_grad()
def untie_word_embeddings(model):
    """Give a tied model its own output table (in place): a copy of the input table, bit
    for bit, so only the rows written later differ. Costs one more [vocab, d] table."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings to untie")
    head.weight = nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False  # or save/reload and resize would tie them again
    return model


@torch.no_grad()
def expand_model(model, new_start: int, input_rows: torch.Tensor, output_rows: torch.Tensor | None = None):
    """Write the new rows into `model` (in place) at ids new_start.., growing its tables
    only when needed. A tied model given output rows is untied first (see
    `untie_word_embeddings`); without them it takes only the input rows."""
    n_new = len(input_rows)
    needed = new_start + n_new
    if model.get_input_embeddings().weight.shape[0] < needed:
        model.resize_token_embeddings(needed, mean_resizing=False)
    if output_rows is not None and ties_word_embeddings(model):
        untie_word_embeddings(model)
    emb = model.get_input_embeddings().weight
    emb[new_start:needed] = input_rows.to(emb.dtype)
    if not ties_word_embeddings(model):
        head = model.get_output_embeddings().weight
        head[new_start:needed] = (output_rows if output_rows is not None else torch.zeros_like(input_rows)).to(head.dtype)
    return model


def write_method_rows(model, new_start: int, input_rows: torch.Tensor, output_rows: torch.Tensor | None, tied: bool):
    """`expand_model` for one method of several written into one model in turn: a model
    that was `tied` and got untied for an earlier method's own output rows takes this
    method's input rows as its output rows, as the tied model would."""
    if output_rows is None and tied and not ties_word_embeddings(model):
        output_rows = input_rows
    return expand_model(model, new_start, input_rows, output_rows)


def save_expanded(model, tokenizer, out_path: str | Path, report: dict | None = None) -> Path:
    """Save as safetensors only (never pickle) with the tokenizer and report.json."""
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if report is not None:
        write_json(out / "report.json", report)
    return out
