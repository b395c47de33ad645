"""Bits per byte and compression of held-out text, each model read through its own tokenizer.

Bits per byte (total -log2 likelihood of the text over its UTF-8 bytes) compares models
whose tokenizers differ, because the denominator is the text, not the tokens. The held-out
chunks are therefore cut by documents and bytes, never by tokens: a token budget would hand
the expanded tokenizer, which needs fewer tokens, more text.

Data flow: score the original once with `token_log_probs` and reuse those scores for every
method (`summarise`, `compare_to_original`); score each expanded model on the same chunks.

An expanded model pays for the probability mass it puts on new tokens wherever they do not
occur: with identical tokenisation its bits per byte is above the original's unless the
new tokens' logits are -inf there.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from tokdist_ray.console import StageProgress
from tokdist_ray.data.corpus.chunks import split_document
from tokdist_ray.errors import ConfigError
from tokdist_ray.eval import shards
from tokdist_ray.eval.drift import baseline_rows
from tokdist_ray.eval.metrics import Metric, Part
from tokdist_ray.eval.plots import pyplot, save
from tokdist_ray.export.hf import write_method_rows
from tokdist_ray.training.output_side import VOCAB_SLICE
from tokdist_ray.vocab.models import load_model, load_tokenizer, ties_word_embeddings
from tokdist_ray.vocab.special import start_token

log = logging.getLogger("tokdist_ray")


@dataclass
class ChunkScore:
    text: str
    ids: list[int]  # the chunk's token ids, without the start token
    offsets: list[tuple[int, int]]  # character span of each id in `text`
    bits: list[float]  # -log2 p(id | start token and every id before it)


def heldout_chunks(texts: Iterable[str], chunk_bytes: int = 2000, max_bytes: int | None = None) -> list[str]:
    """Each document split at line breaks, else before whitespace, else between characters,
    into pieces of at most `chunk_bytes` bytes; the pieces of a document concatenate back to
    it. With `max_bytes`, the longest prefix of the chunks holding at most that many bytes
    (documents after it are not read)."""
    if chunk_bytes < 4:
        raise ConfigError(f"chunk_bytes must be at least 4 (one UTF-8 character), got {chunk_bytes}")
    chunks, total = [], 0
    for doc in texts:
        for piece in split_document(doc, chunk_bytes):
            size = len(piece.encode("utf-8"))
            if max_bytes is not None and total + size > max_bytes:
                return chunks
            chunks.append(piece)
            total += size
    return chunks


def _target_nats(hidden: torch.Tensor, head, targets: torch.Tensor) -> torch.Tensor:
    """-ln p(target) at each position under the LM head, its log-softmax taken over slices
    of the vocabulary: for a 128k vocabulary the full fp32 logits of one batch are
    gigabytes."""
    weight, bias = head.weight, getattr(head, "bias", None)
    log_norm = torch.full(targets.shape, float("-inf"), device=hidden.device)
    target_logit = torch.zeros(targets.shape, device=hidden.device)
    hidden = hidden.float()
    for lo in range(0, len(weight), VOCAB_SLICE):
        hi = min(lo + VOCAB_SLICE, len(weight))
        # logits in fp32 from a bf16 model's states and rows (exact products, fp32 sums; a
        # no-op on fp32): bf16 logits, 0.125 apart near 20, would blur the bits per token
        logits = F.linear(hidden, weight[lo:hi].float(), None if bias is None else bias[lo:hi].float())
        log_norm = torch.logaddexp(log_norm, torch.logsumexp(logits, -1))
        inside = (targets >= lo) & (targets < hi)
        picked = logits.gather(-1, (targets - lo).clamp(0, hi - lo - 1)[..., None]).squeeze(-1)
        target_logit = torch.where(inside, picked, target_logit)
    return log_norm - target_logit


@torch.no_grad()
def token_log_probs(model, tokenizer, chunks: Sequence[str], batch_size: int = 8, label: str = "bits per byte") -> list[ChunkScore]:
    """Teacher-forced bits of every token of every chunk, after a start token."""
    if not tokenizer.is_fast:
        raise ConfigError("bits per byte needs a fast tokenizer (token offsets)")
    chunks = list(chunks)
    start = start_token(tokenizer)
    enc = tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=True)
    ids = [[start, *x] for x in enc["input_ids"]]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(map(len, ids), default=0)
    if limit and longest > limit:
        raise ConfigError(
            f"a held-out chunk is {longest} tokens long with its start token, more than the model's "
            f"max_position_embeddings ({limit}); lower chunk_bytes"
        )
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else start
    bits: list[list[float]] = [[] for _ in chunks]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths per batch: little padding
    progress = StageProgress(label, len(order), "chunks")
    for lo in range(0, len(order), batch_size):
        batch = order[lo : lo + batch_size]
        input_ids = torch.full((len(batch), max(len(ids[i]) for i in batch)), pad)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        input_ids, mask = input_ids.to(model.device), mask.to(model.device)
        hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state
        nats = _target_nats(hidden[:, :-1], model.get_output_embeddings(), input_ids[:, 1:])
        nats = (nats / math.log(2)).cpu()
        for row, i in enumerate(batch):
            bits[i] = nats[row, : len(ids[i]) - 1].tolist()
        progress.advance(len(batch))
    return [
        ChunkScore(text, list(x), [tuple(o) for o in offsets], b)
        for text, x, offsets, b in zip(chunks, enc["input_ids"], enc["offset_mapping"], bits)
    ]


def summarise(scores: Sequence[ChunkScore], new_start: int | None = None) -> dict:
    """Bits and tokens per byte; with `new_start`, the bits split between new ids and the others."""
    n_bytes = sum(len(s.text.encode("utf-8")) for s in scores)
    if not n_bytes:
        raise ConfigError("no held-out text to compute bits per byte on")
    n_tokens = sum(len(s.ids) for s in scores)
    words = sum(len(s.text.split()) for s in scores)
    total = sum(b for s in scores for b in s.bits)
    out = {
        "chunks": len(scores),
        "bytes": n_bytes,
        "words": words,
        "tokens": n_tokens,
        "bits": total,
        "bits_per_byte": total / n_bytes,
        "tokens_per_byte": n_tokens / n_bytes,
        "tokens_per_word": n_tokens / words if words else float("nan"),
    }
    if new_start is not None:
        per_new: dict[int, list[float]] = defaultdict(list)
        other = 0.0
        for s in scores:
            for i, b in zip(s.ids, s.bits):
                if i >= new_start:
                    per_new[i].append(b)
                else:
                    other += b
        n_new = sum(len(v) for v in per_new.values())
        out |= {
            "new_tokens": n_new,
            "new_token_share": n_new / n_tokens if n_tokens else 0.0,
            "bits_per_byte_new": sum(map(sum, per_new.values())) / n_bytes,
            "bits_per_byte_other": other / n_bytes,
            "per_new_token": {
                i: {"occurrences": len(v), "mean_bits": sum(v) / len(v)} for i, v in sorted(per_new.items())
            },
        }
    return out


def bits_per_byte(model, tokenizer, chunks: Sequence[str], new_start: int | None = None, batch_size: int = 8) -> dict:
    return summarise(token_log_probs(model, tokenizer, chunks, batch_size), new_start)


def score_chunks(
    model, original_tokenizer, expanded_tokenizer, new_start: int,
    methods: dict[str, tuple[torch.Tensor, torch.Tensor | None]], chunks: Sequence[str], batch_size: int = 8,
    other_models: dict[str, Callable[[], tuple]] | None = None, label: str = "",
) -> dict[str, list[ChunkScore]]:
    """The original model on its own tokenisation, then the model expanded with each
    method's (input rows, output rows or None) on the expanded tokenisation, then each of
    `other_models` (name -> a loader of (model, tokenizer): a model another tool expanded
    from the same original, new ids from new_start) on its own tokenisation, all on the
    same chunks: {"original": scores, name: scores, ...}, each in chunk order.

    `model` itself becomes the expanded model, each method's rows written over the last's:
    no copy of it is made (for an 8B model a copy is 32 GB). A tied model given a method's
    own output rows is untied once (one more [vocab, d] table); later methods without
    them get output rows equal to their input rows, as tied."""
    tied = ties_word_embeddings(model)
    scores = {"original": token_log_probs(model, original_tokenizer, chunks, batch_size, f"bits per byte, original{label}")}
    for name, (input_rows, output_rows) in methods.items():
        write_method_rows(model, new_start, input_rows, output_rows, tied)
        scores[name] = token_log_probs(model, expanded_tokenizer, chunks, batch_size, f"bits per byte, {name}{label}")
    for name, load in (other_models or {}).items():
        other, tokenizer = load()
        scores[name] = token_log_probs(other, tokenizer, chunks, batch_size, f"bits per byte, {name}{label}")
    return scores


def summarise_methods(scores: dict[str, Sequence[ChunkScore]], new_start: int,
                      log: Callable[[str, dict], None] | None = None) -> dict:
    """`score_chunks`' scores (of all the chunks, or of consecutive parts of them
    concatenated in chunk order) as {"methods": {name: summary}, "costliest_new_tokens":
    {name: rows}}; needs no model."""
    original = scores["original"]
    summaries, costliest = {"original": summarise(original)}, {}
    for name, scored in scores.items():
        if name == "original":
            continue
        summaries[name] = summarise(scored, new_start)
        rows = compare_to_original(original, scored, new_start, top_k=None)
        summaries[name]["new_token_spans"] = span_totals(rows)
        costliest[name] = rows[:COSTLIEST_KEPT]
        if log is not None:
            log(name, summaries[name])
    return {"methods": summaries, "costliest_new_tokens": costliest}


def score_methods(
    model, original_tokenizer, expanded_tokenizer, new_start: int,
    methods: dict[str, tuple[torch.Tensor, torch.Tensor | None]], chunks: Sequence[str], batch_size: int = 8,
    other_models: dict[str, Callable[[], tuple]] | None = None, log: Callable[[str, dict], None] | None = None,
) -> dict:
    """`score_chunks`, summarised: {"methods": {name: summary}, "costliest_new_tokens": {name: rows}}."""
    scores = score_chunks(model, original_tokenizer, expanded_tokenizer, new_start, methods, chunks, batch_size,
                          other_models)
    return summarise_methods(scores, new_start, log)


COSTLIEST_KEPT = 20  # rows of compare_to_original kept in eval.json per method


def compare_to_original(
    original: Sequence[ChunkScore], expanded: Sequence[ChunkScore], new_start: int, top_k: int | None = 20
) -> list[dict]:
    """The new tokens that cost the most bits against the original, worst first (the
    `top_k` worst; None: all).

    For each occurrence of a new id, the bits the expanded model spent on it and the bits the
    original spent on the original tokens covering the same characters. Where boundaries do
    not coincide (added tokens firing inside a word, byte pieces of one character) both sides
    are widened to the smallest span that both tokenisations cover whole.
    """
    per_token: dict[int, dict] = {}
    for o, x in zip(original, expanded, strict=True):
        if o.text != x.text:
            raise ValueError("original and expanded scores must be computed on the same chunks")
        o_ends, o_starts = [e for _, e in o.offsets], [s for s, _ in o.offsets]
        x_ends, x_starts = [e for _, e in x.offsets], [s for s, _ in x.offsets]
        for j, token_id in enumerate(x.ids):
            if token_id < new_start:
                continue
            lo, hi = x.offsets[j]
            surface = x.text[lo:hi]
            while True:
                oa, ob = bisect_right(o_ends, lo), bisect_left(o_starts, hi)
                xa, xb = bisect_right(x_ends, lo), bisect_left(x_starts, hi)
                spans = o.offsets[oa:ob] + x.offsets[xa:xb]
                wider = min(s for s, _ in spans), max(e for _, e in spans)
                if wider == (lo, hi):
                    break
                lo, hi = wider
            acc = per_token.setdefault(
                token_id, {"token": surface, "occurrences": 0, "bits_expanded": 0.0, "bits_original": 0.0}
            )
            acc["occurrences"] += 1
            acc["bits_expanded"] += sum(x.bits[xa:xb])
            acc["bits_original"] += sum(o.bits[oa:ob])
    rows = []
    for token_id, acc in per_token.items():
        n = acc["occurrences"]
        rows.append({
            "token_id": token_id,
            "token": acc["token"],
            "occurrences": n,
            "mean_bits_expanded": acc["bits_expanded"] / n,
            "mean_bits_original": acc["bits_original"] / n,
            "difference": (acc["bits_expanded"] - acc["bits_original"]) / n,
            "total_extra_bits": acc["bits_expanded"] - acc["bits_original"],
        })
    rows.sort(key=lambda r: (-r["total_extra_bits"], r["token_id"]))
    return rows[:top_k]


def span_totals(rows: Sequence[dict]) -> dict:
    """compare_to_original's rows (all of them) summed: the bits an expanded model spends
    on its new tokens against the bits the original spends on the same spans. An
    expansion that costs nothing has extra_share 0; the output side's job is to keep it so."""
    expanded = sum(r["mean_bits_expanded"] * r["occurrences"] for r in rows)
    original = sum(r["mean_bits_original"] * r["occurrences"] for r in rows)
    return {"occurrences": sum(r["occurrences"] for r in rows), "bits_expanded": expanded,
            "bits_original": original, "extra_share": (expanded - original) / original if original else 0.0}


def markdown_table(results: dict[str, dict], original: str = "original") -> str:
    """One row per method (summaries from `summarise`), the original first."""
    base = results[original]["bits_per_byte"]
    lines = [
        "| method | tokens/byte | tokens/word | new-token share | bits/byte | Δ bits/byte | Δ bits/byte (%) "
        "| bits/byte on new tokens | bits/byte on other tokens | extra bits on new tokens vs original's on their spans |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [original, *(n for n in results if n != original)]:
        r = results[name]
        delta = r["bits_per_byte"] - base
        split = [f"{r[k]:.4f}" if k in r else "–" for k in ("bits_per_byte_new", "bits_per_byte_other")]
        share = f"{100 * r['new_token_share']:.1f}%" if "new_token_share" in r else "–"
        spans = f"{100 * r['new_token_spans']['extra_share']:+.1f}%" if "new_token_spans" in r else "–"
        lines.append(
            f"| {name} | {r['tokens_per_byte']:.4f} | {r['tokens_per_word']:.3f} | {share} | {r['bits_per_byte']:.4f} | "
            f"{delta:+.4f} | {100 * delta / base:+.2f}% | {split[0]} | {split[1]} | {spans} |"
        )
    return "\n".join(lines)


def costliest_table(rows: Sequence[dict]) -> str:
    """compare_to_original's rows as markdown: bits per occurrence, expanded and original."""
    lines = ["| token | occurrences | bits (expanded) | bits (original pieces) | extra bits in all |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {repr(r['token']).replace('|', chr(92) + '|')} | {r['occurrences']} | {r['mean_bits_expanded']:.2f} | {r['mean_bits_original']:.2f} | "
              f"{r['total_extra_bits']:+.1f} |" for r in rows]
    return "\n".join(lines)


def plot_against_compression(methods: dict, out_dir: Path) -> str:
    """Each model's bits per byte against its tokens per byte (`methods`: {name: `summarise`})."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name, summary in methods.items():
        ax.scatter(summary["tokens_per_byte"], summary["bits_per_byte"], label=name)
    ax.set_xlabel("tokens per byte (lower: better compression)")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("Held-out text, each model on its own tokenizer")
    ax.legend(fontsize="small")
    return save(fig, out_dir / "compression_vs_bits.png")


def _other_model(directory: str, trust_remote_code: bool, device: str, dtype: torch.dtype):
    """eval.compare_models' (model, tokenizer), on the worker's device in its dtype."""
    return (load_model(directory, dtype=dtype, device=device, trust_remote_code=trust_remote_code),
            load_tokenizer(directory, trust_remote_code=trust_remote_code))


class BitsPerByte(Metric):
    """Each worker scores its run of consecutive held-out chunks (every worker cuts the same
    ones) with every model; the per-chunk scores, concatenated in chunk order, are
    summarised once. Writes each method's rows into the worker's model in turn."""

    name = "bits_per_byte"

    def score(self, part: Part) -> dict:
        evaluation, settings = part.evaluation, part.evaluation.settings
        if not settings.bits_per_byte_bytes:
            return {}
        expansion, new_start = evaluation.expansion, evaluation.expansion.new_start
        outputs = baseline_rows(part.model, expansion.tokens, new_start, side="output", names=settings.baselines)
        methods = {name: (inputs, part.rows.get("output") if name == "token_distillation" else outputs.get(name))
                   for name, inputs in part.methods.items()}
        chunks = heldout_chunks(part.texts, settings.chunk_bytes, settings.bits_per_byte_bytes)
        start, stop = shards.part(len(chunks), part.index, part.count)
        others = {Path(d).name: partial(_other_model, d, evaluation.trust_remote_code, part.device, part.dtype)
                  for d in settings.compare_models}
        return {"bits": score_chunks(part.model, part.original, expansion.tokenizer, new_start, methods,
                                     chunks[start:stop], settings.batch_size, others, part.label) if stop > start else {}}

    def merge(self, parts: list[dict], new_start: int) -> dict:
        if "bits" not in parts[0]:
            return {}
        scores: dict[str, list] = {}
        for p in parts:
            for name, scored in p["bits"].items():
                scores.setdefault(name, []).extend(scored)
        chunks = scores.get("original", [])
        log.info("bits per byte: %d held-out chunks, %d bytes, %d methods", len(chunks),
                 sum(len(c.text.encode("utf-8")) for c in chunks), len(scores))
        return {"bits_per_byte": summarise_methods(
            scores or {"original": []}, new_start,
            log=lambda name, summary: log.info("  %s: %.4f bits/byte", name, summary["bits_per_byte"]))}

    def work(self, part: dict) -> dict:
        return {"chunks": len(part.get("bits", {}).get("original", []))}

    def sections(self, report: dict) -> list[str]:
        if "bits_per_byte" not in report:
            return []
        bits = report["bits_per_byte"]
        return ["## Bits per byte on held-out text, each model on its own tokenizer\n\n" + markdown_table(bits["methods"]),
                "## New tokens that cost Token Distillation the most bits against the original's pieces\n\n"
                + costliest_table(bits["costliest_new_tokens"]["token_distillation"][:10])]

    def plots(self, report: dict, out_dir: Path) -> list[str]:
        methods = report.get("bits_per_byte", {}).get("methods")
        return [plot_against_compression(methods, out_dir)] if methods else []
