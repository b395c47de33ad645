"""Pre-initialisation of new rows from their subtokens' rows.

- "fvt": the plain mean of the subtoken rows (Fast Vocabulary Transfer).
- "adapti-vocab": exponentially weighted mean (AdaptiVocab): input rows weigh later
  subtokens more (weights exp(2i)), output rows earlier ones (exp(-2i)).
"""

from __future__ import annotations

import logging
from typing import Literal, Sequence

import torch

from tokdist_ray.config import OutputEmbeddingInit, pre_init_strategy
from tokdist_ray.errors import ConfigError
from tokdist_ray.training.step import NewRows
from tokdist_ray.vocab.models import ties_word_embeddings

log = logging.getLogger("tokdist_ray")
PreInitStrategy = Literal["fvt", "adapti-vocab"]
_CHUNK = 2048


def _weights(lengths: torch.Tensor, width: int, strategy: str, side: str) -> torch.Tensor:
    """[n, width] weights per subtoken slot, zero on padding, rows summing to one."""
    slot = torch.arange(1, width + 1, dtype=torch.float64)
    valid = slot[None, :] <= lengths[:, None]
    if pre_init_strategy(strategy) == "fvt":
        w = valid.double()
    else:  # adapti-vocab
        sign = 2.0 if side == "input" else -2.0
        # subtract the largest exponent per row so long phrases cannot overflow
        logits = (sign * slot)[None, :].expand(len(lengths), -1).masked_fill(~valid, float("-inf"))
        w = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    return w / w.sum(dim=1, keepdim=True)


@torch.no_grad()
def pre_init_rows(
    table: torch.Tensor,
    phrases: Sequence[Sequence[int]],
    strategy: PreInitStrategy = "fvt",
    side: Literal["input", "output"] = "input",
) -> torch.Tensor:
    """Initial rows [n_new, d] (fp32) for new tokens from an embedding `table`."""
    if side not in ("input", "output"):
        raise ValueError("side must be 'input' or 'output'")
    width = max(len(p) for p in phrases)
    index = torch.zeros(len(phrases), width, dtype=torch.long)
    for row, phrase in enumerate(phrases):
        index[row, : len(phrase)] = torch.as_tensor(phrase, dtype=torch.long)
    lengths = torch.tensor([len(p) for p in phrases])
    weights = _weights(lengths, width, strategy, side).to(device=table.device, dtype=torch.float32)
    index = index.to(table.device)
    # in chunks: [n, width, d] in fp32 for a whole vocabulary expansion would be gigabytes
    chunks = [
        torch.einsum("nw,nwd->nd", weights[i : i + _CHUNK], table[index[i : i + _CHUNK]].float())
        for i in range(0, len(phrases), _CHUNK)
    ]
    return torch.cat(chunks)


def initial_rows(
    model, phrases: Sequence[Sequence[int]], policy: OutputEmbeddingInit, strategy: PreInitStrategy, untie: bool = False
) -> NewRows:
    """The new rows before training: input rows pre-initialised from the subtokens; an
    untied model's output rows zero, the subtoken mean, the first piece's output row, or
    pre-initialised and trained.

    The first piece's row gives the new token the logit of its first piece, the
    log-probability of the phrase's first step, an upper bound on the phrase's own; the
    subtoken mean mixes in the logits of pieces that do not come next, and rows trained
    on a few snippets each fit those contexts and generalise worse (bench/README.md,
    "Language shift").
    A tied model has no output rows of its own unless `untie`: then they start from its
    one table as an untied model's would (`untie_word_embeddings` exports them apart)."""
    inputs = pre_init_rows(model.get_input_embeddings().weight, phrases, strategy, "input")
    if ties_word_embeddings(model) and not untie:
        if policy is not OutputEmbeddingInit.ZERO and policy is not OutputEmbeddingInit.SUBTOKEN_MEAN:
            log.info("tied embeddings: output rows are the input rows in training (the output fit, or "
                     "untie_word_embeddings=True, sets them apart)")
        return NewRows(inputs)
    head = model.get_output_embeddings()
    if head is None:
        raise ConfigError(f"untie_word_embeddings: {type(model).__name__} has no output embeddings")
    if policy is OutputEmbeddingInit.ZERO:
        return NewRows(inputs, torch.zeros_like(inputs))
    if policy is OutputEmbeddingInit.SUBTOKEN_MEAN:
        return NewRows(inputs, pre_init_rows(head.weight, phrases, "fvt", "output"))
    if policy is OutputEmbeddingInit.FIRST_PIECE:
        return NewRows(inputs, head.weight[torch.tensor([p[0] for p in phrases], device=head.weight.device)].float())
    return NewRows(inputs, pre_init_rows(head.weight, phrases, strategy, "output"), train_output=True)
