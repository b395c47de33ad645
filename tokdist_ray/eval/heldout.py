"""The evaluate stage: held-out drift of an expanded model next to the baselines, written
as eval.json, eval.md and PNG plots (plots.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file

from tokdist_ray.config import FileDataSource
from tokdist_ray.data.corpus import documents
from tokdist_ray.data.local_mining import mine_snippets
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.eval.drift import baseline_rows, compression, drift, markdown_table, relative_to
from tokdist_ray.eval.plots import write_plots
from tokdist_ray.report import write_report
from tokdist_ray.training.batching import merge_snippets
from tokdist_ray.vocab.alignment import PhraseMerger
from tokdist_ray.vocab.export import expand_tokenizer
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")
COMPRESSION_SAMPLE_BYTES = 5_000_000  # tokens-per-byte needs no more text than this


def evaluate_export(config, tokens: Sequence[NewToken], distilled: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped = {entry["token"] for entry in distilled["tokens_skipped"]}
    tokens = [t for t in tokens if t.text not in skipped]
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    model = load_model(config.model, dtype=torch.float32, trust_remote_code=config.trust_remote_code)
    new_start = len(tokenizer)
    rows = load_file(distilled["rows_path"])["input"]
    texts = [t for t in documents(FileDataSource(paths=list(config.eval.heldout_paths))) if isinstance(t, str)]
    snippets, _ = mine_snippets(texts, tokenizer, tokens, config.snippets.snippet_len, config.eval.snippets_per_token)
    if not snippets:
        raise TooFewSnippetsError("none of the new tokens occurs in eval.heldout_paths; point it at held-out text that uses them")
    merger = PhraseMerger.for_tokens(tokens, new_start)
    examples = merge_snippets(merger, [s["input_ids"] for s in snippets])
    methods = {"token_distillation": rows, **baseline_rows(model, tokens, new_start)}
    results = drift(model, new_start, methods, examples, [s["token"] for s in snippets],
                    config.training.target_layer, config.eval.batch_size)
    sample, size = [], 0
    for text in texts:
        if size >= COMPRESSION_SAMPLE_BYTES:
            break
        sample.append(text)
        size += len(text.encode("utf-8"))
    report = {
        "heldout_snippets": len(examples),
        "methods": results,
        "relative_to_fvt": relative_to(results),
        "compression": compression(tokenizer, expand_tokenizer(tokenizer, tokens), sample),
    }
    write_report(out_dir / "eval.json", report)
    table = markdown_table(results)
    (out_dir / "eval.md").write_text(table + "\n", encoding="utf-8")
    log.info("held-out drift (lower is better):\n%s", table)
    plots = write_plots(results, Path(distilled["report_path"]), out_dir)
    return {"eval_path": str(out_dir / "eval.json"), "table": table, "plots": plots,
            "relative_to_fvt": report["relative_to_fvt"]["token_distillation"]}
