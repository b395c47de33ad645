"""The special tokens a text is read after."""

from __future__ import annotations

from tokdist_ray.errors import ConfigError


def start_token(tokenizer) -> int:
    """The id every scored or prompted text starts with. A fixed first token conditions
    the first real token, as at training time; tokenizers without a BOS (Qwen) start
    documents after an EOS."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ConfigError("the tokenizer has neither a BOS nor an EOS token to start each held-out chunk with")
    return start
