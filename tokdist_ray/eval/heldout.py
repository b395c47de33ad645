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

from tokdist_ray.capacity import Capacity, cluster_capacity, wait_for_nodes
from tokdist_ray.config import SNIPPET_SEED, EvalConfig, FileDataSource
from tokdist_ray.console import quiet_worker, worker_env
from tokdist_ray.data.corpus import documents
from tokdist_ray.data.local_mining import mine_snippets
from tokdist_ray.errors import TooFewSnippetsError
from tokdist_ray.eval.bits_per_byte import costliest_table, heldout_chunks, score_chunks
from tokdist_ray.eval.bits_per_byte import markdown_table as bits_table
from tokdist_ray.eval.drift import baseline_rows, compression, drift_sums, leading_texts, markdown_table
from tokdist_ray.eval.generation import compare_generation, heldout_new_token_share, prompts_from
from tokdist_ray.eval.generation import markdown_table as generation_table
from tokdist_ray.eval.plots import write_plots
from tokdist_ray.eval.shards import merge, part, worker_count
from tokdist_ray.raycluster import node_id, ray_is_running
from tokdist_ray.report import write_report
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.export import write_method_rows
from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.models import load_model, load_tokenizer, ties_word_embeddings

log = logging.getLogger("tokdist_ray")


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
    (teacher ids) and by the expanded one with each method's rows; eval.json, eval.md and
    the plots written to `out_dir` here, from the workers' results.

    The workers run where models run: on a Ray cluster with GPUs (up, or node types its
    autoscaler can launch: tokdist_ray.capacity), one task per GPU (`shards.worker_count`),
    each loading the model once, the snippets and chunks split between them (`shards.part`);
    without GPUs one task on the CPUs of the largest node.
    This process loads no weights. Without Ray, one worker here."""
    parts = _on_ray(evaluation) if ray_is_running() else [score_part(evaluation)]
    return _write(merge(parts, evaluation.expansion.new_start), evaluation.loss_curve, out_dir)


def _on_ray(evaluation: Evaluation) -> list[dict]:
    import ray

    capacity = cluster_capacity()  # GPUs an autoscaler can launch count too: a cluster may start with none up
    gpus = capacity.gpu_replicas()
    count = worker_count(evaluation.settings, len(evaluation.expansion.tokens), gpus)
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": _cpus_per_worker(count, capacity)}
    wait_for_nodes("evaluation", {"GPU": 1, "CPU": 1} if gpus else {"CPU": resources["num_cpus"]}, count, capacity)
    log.info("evaluation: %d worker(s), each %s", count, resources)
    task = ray.remote(_part_task).options(**resources, scheduling_strategy="SPREAD",
                                          runtime_env={"env_vars": worker_env()})
    shared = ray.put(evaluation)
    refs = [task.remote(shared, index, count) for index in range(count)]
    try:
        return ray.get(refs)
    except BaseException:
        for ref in refs:  # one worker's error is the evaluation's: stop the others
            ray.cancel(ref)
        raise


def _cpus_per_worker(count: int, capacity: Capacity) -> int:
    import ray

    # no more than is free or a node the autoscaler launches has: CPUs an actor still holds
    # (a pool another stage left alive) would otherwise keep the tasks waiting forever
    free = max(ray.available_resources().get("CPU", 1), capacity.largest_launchable_cpu_node())
    return max(1, int(min(capacity.largest_cpu_node(), free)) // count)  # torch in the task uses as many threads


def _part_task(evaluation: Evaluation, index: int, count: int) -> dict:
    quiet_worker()
    return score_part(evaluation, index, count)


def _other_model(directory: str, trust_remote_code: bool, device: str, dtype: torch.dtype):
    """eval.compare_models' (model, tokenizer), on the worker's device in its dtype."""
    return (load_model(directory, dtype=dtype, device=device, trust_remote_code=trust_remote_code),
            load_tokenizer(directory, trust_remote_code=trust_remote_code))


def _heldout_snippets(evaluation: Evaluation, texts: list[str], log_sample: bool) -> list[dict]:
    """Every held-out snippet drift reads (a seeded sample with eval.max_snippets): the
    same list in every worker."""
    settings = evaluation.settings
    snippets, _ = mine_snippets(texts, evaluation.expansion, evaluation.snippet_len, settings.snippets_per_token)
    if not snippets:
        raise TooFewSnippetsError("none of the new tokens occurs in eval.heldout_paths; point it at held-out text that uses them")
    if settings.max_snippets and len(snippets) > settings.max_snippets:
        keep = sorted(random.Random(evaluation.seed).sample(range(len(snippets)), settings.max_snippets))
        if log_sample:
            log.info("drift: a sample of %d of the %d held-out snippets (eval.max_snippets)", len(keep), len(snippets))
        snippets = [snippets[i] for i in keep]
    return snippets


def score_part(evaluation: Evaluation, index: int = 0, count: int = 1) -> dict:
    """Part `index` of `count` of the evaluation, on this process's accelerator, with one
    copy of the model: drift sums over its run of the held-out snippets, per-chunk bits of
    its run of the chunks for the original and each method; part 0 also compression and
    generation. `shards.merge` puts the parts together."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 on a GPU, as the model is served: the states (and so drift and bits per byte)
    # are a bf16 model's, and each method's rows are rounded to bf16 when written into its
    # tables; logits, log-softmax, MSE and the sums over positions stay fp32. On CPU fp32.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    settings, expansion, trust = evaluation.settings, evaluation.expansion, evaluation.trust_remote_code
    model = load_model(evaluation.model, dtype=dtype, device=device, trust_remote_code=trust)
    tied = ties_word_embeddings(model)
    tokens, new_start = expansion.tokens, expansion.new_start
    rows = (load_file(evaluation.rows, device=device) if isinstance(evaluation.rows, str)
            else {name: row.to(device) for name, row in evaluation.rows.items()})
    texts = [t for t in documents(FileDataSource(paths=list(settings.heldout_paths))) if isinstance(t, str)]
    snippets = _heldout_snippets(evaluation, texts, log_sample=index == 0)
    lo, hi = part(len(snippets), index, count, settings.batch_size)
    label = f", worker {index + 1}/{count}" if count > 1 else ""
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), [s["input_ids"] for s in snippets[lo:hi]])
    methods = {"token_distillation": rows["input"], **baseline_rows(model, tokens, new_start)}
    log.info("drift: %d held-out snippets%s, %d methods", len(examples),
             f" of {len(snippets)}{label}" if count > 1 else "", len(methods))
    out = {"part": index, "node": node_id(), "device": device, "heldout_snippets": len(examples),
           "drift": drift_sums(model, new_start, methods, examples, [s["token"] for s in snippets[lo:hi]],
                               evaluation.target_layer, settings.batch_size, label)}
    original = load_tokenizer(evaluation.model, trust_remote_code=trust)
    if index == 0:
        out["compression"] = compression(original, expansion.tokenizer, leading_texts(texts))
    if settings.bits_per_byte_bytes:
        outputs = baseline_rows(model, tokens, new_start, side="output")
        with_outputs = {name: (inputs, rows.get("output") if name == "token_distillation" else outputs.get(name))
                        for name, inputs in methods.items()}
        chunks = heldout_chunks(texts, settings.chunk_bytes, settings.bits_per_byte_bytes)
        start, stop = part(len(chunks), index, count)
        others = {Path(d).name: partial(_other_model, d, trust, device, dtype) for d in settings.compare_models}
        out["bits"] = score_chunks(model, original, expansion.tokenizer, new_start, with_outputs,
                                   chunks[start:stop], settings.batch_size, others, label) if stop > start else {}
    if index == 0 and settings.generation_steps:
        write_method_rows(model, new_start, rows["input"], rows.get("output"), tied)
        generation = _generation(model, original, expansion, texts, settings, evaluation.seed)
        if generation is not None:
            out["generation"] = generation
    return out


def _generation(expanded, original_tokenizer, expansion: MergeExpansion, texts: list[str], settings: EvalConfig,
                seed: int) -> dict | None:
    """The original against the `expanded` model (Token Distillation's rows written) on
    held-out prompts; None, with a warning, when no held-out text is long enough for one."""
    # from chunks, not documents: a corpus file may be one document
    chunks = heldout_chunks(texts, max(settings.chunk_bytes, 2 * settings.prompt_bytes))
    prompts = prompts_from(chunks, settings.generation_prompts, settings.prompt_bytes)
    if not prompts:
        log.warning("generation: skipped; no held-out text holds eval.prompt_bytes (%d bytes) for a prompt",
                    settings.prompt_bytes)
        return None
    log.info("generation: %d held-out prompts, %d decode steps each, greedy and sampled, original and expanded",
             len(prompts), settings.generation_steps)
    new_start = expansion.new_start
    return {
        "decode_steps_per_prompt": settings.generation_steps,
        "heldout_new_token_share": heldout_new_token_share(expansion.tokenizer, leading_texts(texts), new_start),
        **compare_generation(expanded, original_tokenizer, expansion.tokenizer, new_start, prompts,
                             settings.generation_steps, seed),
    }


def _write(report: dict, loss_curve: list, out_dir: Path) -> dict:
    """eval.json, eval.md and the plots; the stage's summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results, sections = report["methods"], []
    if "bits_per_byte" in report:
        sections.append("## Bits per byte on held-out text, each model on its own tokenizer\n\n"
                        + bits_table(report["bits_per_byte"]["methods"]))
        sections.append("## New tokens that cost Token Distillation the most bits against the original's pieces\n\n"
                        + costliest_table(report["bits_per_byte"]["costliest_new_tokens"]["token_distillation"][:10]))
    if "generation" in report:
        sections.append("## Generation from held-out prompts, the same decode steps (expanded: Token Distillation's rows)"
                        "\n\n" + generation_table(report["generation"]))
    sections.append("## Drift from the original at aligned positions (lower is better)\n\n" + markdown_table(results))
    write_report(out_dir / "eval.json", report)
    text = "\n\n".join(sections)
    (out_dir / "eval.md").write_text(text + "\n", encoding="utf-8")
    log.info("held-out evaluation:\n%s", text)
    plots = write_plots(results, loss_curve, out_dir,
                        report.get("bits_per_byte", {}).get("methods"), report.get("generation"))
    return {"eval_path": str(out_dir / "eval.json"), "table": text, "plots": plots, "node": report["node"],
            "relative_to_fvt": report["relative_to_fvt"]["token_distillation"]}
