"""Compression: tokens per byte of held-out text before and after adding the new tokens,
the original and the expanded tokenizer on the same leading texts. No model reads them, so
the first worker alone measures it."""

from __future__ import annotations

from typing import Iterable, Sequence

from tokdist_ray.eval.metrics import Metric, Part

COMPRESSION_SAMPLE_BYTES = 5_000_000  # tokens-per-byte needs no more text than this


def leading_texts(texts: Iterable, max_bytes: int = COMPRESSION_SAMPLE_BYTES) -> list[str]:
    """The first texts (strings only) holding about `max_bytes` of UTF-8."""
    sample, size = [], 0
    for text in texts:
        if size >= max_bytes:
            break
        if isinstance(text, str):
            sample.append(text)
            size += len(text.encode("utf-8"))
    return sample


def compression(original_tokenizer, expanded_tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """Tokens per byte of held-out text before and after adding the new tokens."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    before = sum(len(ids) for ids in original_tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    after = sum(len(ids) for ids in expanded_tokenizer(list(texts), add_special_tokens=False)["input_ids"])
    return {"bytes": n_bytes, "tokens_before": before, "tokens_after": after,
            "tokens_per_byte_before": before / n_bytes, "tokens_per_byte_after": after / n_bytes}


class Compression(Metric):
    name = "compression"

    def score(self, part: Part) -> dict:
        if part.index:
            return {}
        return {"compression": compression(part.original, part.evaluation.expansion.tokenizer, leading_texts(part.texts))}

    def merge(self, parts: list[dict], new_start: int) -> dict:
        return {"compression": parts[0]["compression"]}
