"""The evaluate stage, on held-out text: bits per byte and compression, each model on its
own tokenizer (bits_per_byte.py), drift at aligned positions (drift.py), for Token
Distillation's rows next to the baselines', and generation speed of the original against
the expanded model (generation.py); written as eval.json, eval.md and PNG plots."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file

from tokdist_ray.config import SNIPPET_SEED, EvalConfig, FileDataSource
from tokdist_ray.console import quiet_worker, worker_env
from tokdist_ray.data.corpus import documents
from tokdist_ray.data.local_mining import mine_snippets
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.eval.bits_per_byte import costliest_table, heldout_chunks, score_methods
from tokdist_ray.eval.bits_per_byte import markdown_table as bits_table
from tokdist_ray.eval.drift import (
    baseline_rows,
    compression,
    drift,
    leading_texts,
    markdown_table,
    relative_to,
)
from tokdist_ray.eval.generation import compare_generation, heldout_new_token_share, prompts_from
from tokdist_ray.eval.generation import markdown_table as generation_table
from tokdist_ray.eval.plots import write_plots
from tokdist_ray.raycluster import node_id, ray_is_running
from tokdist_ray.report import write_report
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.export import write_method_rows
from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.models import load_model, load_tokenizer, ties_word_embeddings

log = logging.getLogger("tokdist_ray")


def _other_model(directory: str, trust_remote_code: bool):
    return (load_model(directory, dtype=torch.float32, trust_remote_code=trust_remote_code),
            load_tokenizer(directory, trust_remote_code=trust_remote_code))


@dataclass(frozen=True)
class Evaluation:
    """What the held-out evaluation of one expansion reads."""

    model: str  # the original model, as load_model names it
    expansion: MergeExpansion
    rows: str | dict  # new_rows.safetensors, or its tensors: "input" and, for untied models, "output"
    settings: EvalConfig
    loss_curve: list  # the training's, for the plot
    snippet_len: int = 50
    target_layer: int = -1
    seed: int = SNIPPET_SEED  # of the drift sample
    trust_remote_code: bool = False


def evaluate_export(evaluation: Evaluation, out_dir: Path) -> dict:
    """Held-out snippets mined with the expanded tokenizer, read by the original model
    (teacher ids) and by the expanded one with each method's rows.

    Runs where models run: on a Ray cluster, as one task on a GPU when the cluster has
    one, else on the CPUs of its largest node, writing to `out_dir` (a shared path, like
    the model the distill stage exports); this process loads no weights. Without Ray, here."""
    if not ray_is_running():
        return _evaluate(evaluation, out_dir)
    import ray

    task = ray.remote(_evaluate_task).options(**_task_resources(), runtime_env={"env_vars": worker_env()})
    return ray.get(task.remote(evaluation, str(out_dir)))


def _task_resources() -> dict:
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return {"num_gpus": 1, "num_cpus": 1}
    nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return {"num_cpus": max(1, int(max(nodes, default=1)))}  # torch in the task uses as many threads


def _evaluate_task(evaluation: Evaluation, out_dir: str) -> dict:
    quiet_worker()
    return _evaluate(evaluation, Path(out_dir))


def _evaluate(evaluation: Evaluation, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings, expansion, trust = evaluation.settings, evaluation.expansion, evaluation.trust_remote_code
    model = load_model(evaluation.model, dtype=torch.float32, device=device, trust_remote_code=trust)
    tied = ties_word_embeddings(model)
    tokens, new_start = expansion.tokens, expansion.new_start
    rows = (load_file(evaluation.rows, device=device) if isinstance(evaluation.rows, str)
            else {name: row.to(device) for name, row in evaluation.rows.items()})
    texts = [t for t in documents(FileDataSource(paths=list(settings.heldout_paths))) if isinstance(t, str)]
    snippets, _ = mine_snippets(texts, expansion, evaluation.snippet_len, settings.snippets_per_token)
    if not snippets:
        raise TooFewSnippetsError("none of the new tokens occurs in eval.heldout_paths; point it at held-out text that uses them")
    if settings.max_snippets and len(snippets) > settings.max_snippets:
        keep = sorted(random.Random(evaluation.seed).sample(range(len(snippets)), settings.max_snippets))
        log.info("drift: a sample of %d of the %d held-out snippets (eval.max_snippets)", len(keep), len(snippets))
        snippets = [snippets[i] for i in keep]
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), [s["input_ids"] for s in snippets])
    methods = {"token_distillation": rows["input"], **baseline_rows(model, tokens, new_start)}
    log.info("drift: %d held-out snippets, %d methods", len(examples), len(methods))
    results = drift(model, new_start, methods, examples, [s["token"] for s in snippets],
                    evaluation.target_layer, settings.batch_size)
    original = load_tokenizer(evaluation.model, trust_remote_code=trust)
    report = {
        "node": node_id(),
        "device": device,
        "heldout_snippets": len(examples),
        "methods": results,
        "relative_to_fvt": relative_to(results),
        "compression": compression(original, expansion.tokenizer, leading_texts(texts)),
    }
    sections = []
    if settings.bits_per_byte_bytes:
        outputs = baseline_rows(model, tokens, new_start, side="output")
        with_outputs = {name: (inputs, rows.get("output") if name == "token_distillation" else outputs.get(name))
                        for name, inputs in methods.items()}
        chunks = heldout_chunks(texts, settings.chunk_bytes, settings.bits_per_byte_bytes)
        log.info("bits per byte: %d held-out chunks, %d bytes, %d methods", len(chunks),
                 sum(len(c.encode("utf-8")) for c in chunks), len(with_outputs) + 1)
        others = {Path(d).name: partial(_other_model, d, trust) for d in settings.compare_models}
        report["bits_per_byte"] = score_methods(
            model, original, expansion.tokenizer, new_start, with_outputs, chunks, settings.batch_size, others,
            log=lambda name, summary: log.info("  %s: %.4f bits/byte", name, summary["bits_per_byte"]))
        sections.append("## Bits per byte on held-out text, each model on its own tokenizer\n\n"
                        + bits_table(report["bits_per_byte"]["methods"]))
        sections.append("## New tokens that cost Token Distillation the most bits against the original's pieces\n\n"
                        + costliest_table(report["bits_per_byte"]["costliest_new_tokens"]["token_distillation"][:10]))
    if settings.generation_steps:
        # from chunks, not documents: a corpus file may be one document
        prompts = prompts_from(heldout_chunks(texts, settings.chunk_bytes), settings.generation_prompts,
                               settings.prompt_bytes)
        log.info("generation: %d held-out prompts, %d decode steps each, greedy and sampled, original and expanded",
                 len(prompts), settings.generation_steps)
        write_method_rows(model, new_start, rows["input"], rows.get("output"), tied)
        report["generation"] = {
            "decode_steps_per_prompt": settings.generation_steps,
            "heldout_new_token_share": heldout_new_token_share(expansion.tokenizer, leading_texts(texts), new_start),
            **compare_generation(model, original, expansion.tokenizer, new_start, prompts, settings.generation_steps,
                                 evaluation.seed),
        }
        sections.append("## Generation from held-out prompts, the same decode steps (expanded: Token Distillation's rows)"
                        "\n\n" + generation_table(report["generation"]))
    sections.append("## Drift from the original at aligned positions (lower is better)\n\n" + markdown_table(results))
    write_report(out_dir / "eval.json", report)
    text = "\n\n".join(sections)
    (out_dir / "eval.md").write_text(text + "\n", encoding="utf-8")
    log.info("held-out evaluation:\n%s", text)
    plots = write_plots(results, evaluation.loss_curve, out_dir,
                        report.get("bits_per_byte", {}).get("methods"), report.get("generation"))
    return {"eval_path": str(out_dir / "eval.json"), "table": text, "plots": plots, "node": report["node"],
            "relative_to_fvt": report["relative_to_fvt"]["token_distillation"]}
