"""Generated snippets: the model writes contexts starting from each new token's phrase.

In-process transformers backend. Prompts are `[BOS] + phrase ids` (no BOS where the
tokenizer has none); samples are cut at EOS, and samples with fewer than
`min_new_tokens` ids after the phrase are dropped and counted.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import torch
from transformers import GenerationConfig

from .config import GeneratedDataSource
from .snippets import MiningStats, bos_prefix, snippet_row
from .tokens import NewToken

log = logging.getLogger("tokdist_ray")


def sampling_config(source: GeneratedDataSource, max_new_tokens: int, tokenizer) -> GenerationConfig:
    """Plain sampling by default. A fresh config, so that a model's own generation
    defaults (repetition penalties, low temperatures) do not leak in."""
    eos = tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=True,
        temperature=source.temperature,
        top_p=source.top_p,
        top_k=source.top_k or None,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
    )


def cut_at_eos(ids: Sequence[int], eos_id: int | None) -> list[int]:
    ids = list(ids)
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id)]
    return ids


@torch.no_grad()
def generate_snippets(
    model,
    tokenizer,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int | dict[str, int] = 100,
    source: GeneratedDataSource | None = None,
    token_indices: Sequence[int] | None = None,
) -> tuple[list[dict], MiningStats]:
    """`snippets_per_token` may be a dict token -> count (a top-up of a shortfall).
    `token_indices` gives each token's index in the run (defaults to its position)."""
    source = source or GeneratedDataSource()
    prefix = bos_prefix(tokenizer)
    config = sampling_config(source, snippet_len, tokenizer)
    device = next(model.parameters()).device
    stats = MiningStats(counts={t.text: 0 for t in tokens})
    rows: list[dict] = []
    start = time.perf_counter()
    for k, token in enumerate(tokens):
        index = token_indices[k] if token_indices is not None else k
        wanted = snippets_per_token[token.text] if isinstance(snippets_per_token, dict) else snippets_per_token
        prompt = prefix + list(token.phrase_ids)
        # seeded per token, so a token's samples do not depend on which others run
        torch.manual_seed(source.seed * 1_000_003 + index)
        done = 0
        while done < wanted:
            n = min(source.batch_size, wanted - done)
            input_ids = torch.tensor([prompt] * n, device=device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config)
            for sample in out[:, len(prompt) :].tolist():
                continuation = cut_at_eos(sample, config.eos_token_id)
                if len(continuation) < source.min_new_tokens:
                    stats.bad_rows += 1
                    continue
                rows.append(snippet_row(token, index, prompt + continuation, len(prefix), "generated"))
                stats.counts[token.text] += 1
            done += n
        log.info("generated %d snippets for %r (%d/%d tokens)", stats.counts[token.text], token.text, k + 1, len(tokens))
    stats.documents = len(rows)
    stats.seconds = time.perf_counter() - start
    return rows, stats
