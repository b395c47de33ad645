"""The job's stages, each a function of the job config and the files earlier stages wrote
under `run_dir` (job/pipeline.py runs them in order, with fingerprints): the work runs on
Ray (Ray Data, Ray Train, Ray tasks), the driver holds no model weights."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq

from tokdist_ray.atomic import read_json, write_json
from tokdist_ray.config import FileDataSource, output_emb_policy
from tokdist_ray.console import StageProgress, worker_env
from tokdist_ray.data.budget import quota_summary, snippet_quota
from tokdist_ray.errors import user_errors_from_ray
from tokdist_ray.export.gguf import GGUF_FILE, GgufOptions
from tokdist_ray.export.model import save_model
from tokdist_ray.job.config import JobConfig
from tokdist_ray.report import expansion_report
from tokdist_ray.stages import Pruning, collect_snippets, expand_tokens, fit_text, prune_tokens, split_by_snippets
from tokdist_ray.training.distilled_rows import DISTILLED_ROWS, FIT_RECORD, FITTED_ROWS, TRAINING_RECORD
from tokdist_ray.training.fit_hook import OutputFit
from tokdist_ray.training.output_fit import NOT_FITTED
from tokdist_ray.vocab.expansion_files import expansion_summary, save_expansion
from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.models import load_tokenizer
from tokdist_ray.vocab.selection import frequent_fragmented_words
from tokdist_ray.vocab.tokens import read_token_file
from tokdist_ray.vocab.weights import read_rows, write_rows

log = logging.getLogger("tokdist_ray")
GENERATED_PARTS = "snippets_generated"  # sorts after snippets.parquet, so training reads mined rows first


def candidate_tokens(config: JobConfig, tokenizer) -> tuple[list[str] | object, dict[str, int]]:
    """(the candidates, as strings or a target tokenizer; their corpus counts when chosen
    from the corpus)."""
    spec = config.tokens
    if spec.list is not None:
        return spec.list, {}
    if spec.file:
        return read_token_file(spec.file), {}
    if spec.target_tokenizer:
        return load_tokenizer(spec.target_tokenizer, trust_remote_code=config.trust_remote_code), {}
    if spec.selection == "bpe":
        from tokdist_ray.data.mining.pre_token_counts import count_pre_tokens
        from tokdist_ray.vocab.bpe_training import continue_bpe

        counts = count_pre_tokens(config.data.corpus, tokenizer, num_workers=config.data.num_workers)
        log.info("continued BPE: %d distinct pre-tokens counted; learning %d merges", len(counts), spec.from_corpus)
        merges = StageProgress("continued BPE", spec.from_corpus, "merges", every_s=10.0)
        learned = continue_bpe(tokenizer, counts, spec.from_corpus, min_count=spec.min_count, max_chars=spec.max_chars,
                               progress=lambda i, _: merges.reached(i))
        return [t.text for t in learned], {t.text: t.count for t in learned}
    from tokdist_ray.data.corpus.corpus import documents

    texts = (t for t in documents(config.data.corpus) if isinstance(t, str))
    chosen = frequent_fragmented_words(tokenizer, texts, spec.from_corpus, min_pieces=spec.min_pieces,
                                       min_count=spec.min_count)
    return [word for word, _ in chosen], dict(chosen)


def select_tokens(config: JobConfig, tokenizer, run_dir: Path) -> dict:
    """Choose the tokens, expand the tokenizer, save it: every later stage uses it."""
    candidates, counts = candidate_tokens(config, tokenizer)
    expansion = expand_tokens(tokenizer, candidates, config.tokens.tokenizer_mode)
    save_expansion(expansion, run_dir / "tokenizer")
    path = run_dir / "tokens.json"
    summary = expansion_summary(expansion)
    write_json(path, {
        **summary,
        "tokens": [{"token": t.text, "id": expansion.new_start + i, "pieces": list(t.phrase_ids),
                    "pieces_text": [tokenizer.decode([p]) for p in t.phrase_ids],
                    **({"corpus_count": counts[t.text]} if t.text in counts else {})}
                   for i, t in enumerate(expansion.tokens)],
        "expected_compression": _expected_compression(config, tokenizer, expansion),
    })
    return {"tokenizer_path": str(run_dir / "tokenizer"), "tokens_path": str(path),
            "count": len(expansion.tokens), "skipped": expansion.skipped, "mode": expansion.mode}


def _expected_compression(config: JobConfig, tokenizer, expansion: MergeExpansion) -> dict | None:
    """Tokens per byte before and after on the held-out text, when there is some."""
    if not config.eval.heldout_paths:
        return None
    from tokdist_ray.data.corpus.corpus import documents
    from tokdist_ray.eval.compression import compression, leading_texts

    sample = leading_texts(documents(FileDataSource(paths=list(config.eval.heldout_paths))))
    return compression(tokenizer, expansion.tokenizer, sample)


def corpus_counts(run_dir: Path) -> dict[str, int]:
    """Each new token's corpus count, where the tokens stage chose it from the corpus."""
    tokens = read_json(run_dir / "tokens.json")["tokens"]
    return {t["token"]: t["corpus_count"] for t in tokens if "corpus_count" in t}


def gather_snippets(config: JobConfig, expansion: MergeExpansion, run_dir: Path) -> dict:
    """Mine and/or generate on Ray, then write the snippets that training reads: the mined
    ones from here, the generated ones from Ray Data's workers (so `run_dir` must be on
    storage every node sees, as training needs anyway)."""
    from tokdist_ray.data.generation.ray_backend import generate_snippets_on_ray
    from tokdist_ray.data.mining.mining import mine_corpus

    source, snippet = config.data.corpus, config.snippets
    quota = snippet_quota(snippet.budget, [t.text for t in expansion.tokens], snippet.snippets_per_token,
                          snippet.min_snippets_per_token,
                          corpus_counts(run_dir) if snippet.budget == "by_frequency" else None)
    mine = None if source is None else partial(
        mine_corpus, source, expansion, snippet.snippet_len, quota, str(run_dir / "mining"),
        snippet.seed, config.data.num_workers, top_up=config.data.top_up_with_generation,
        count_bystanders=snippet.count_bystanders)

    def generate(tokens, counts, indices):
        return generate_snippets_on_ray(config.model, expansion, tokens, snippet.snippet_len, counts,
                                        config.generation, token_indices=indices)

    snippets = collect_snippets(expansion, quota, mine, generate, config.data.top_up_with_generation)
    snippets.report["quota"] = {"budget": snippet.budget, **quota_summary(quota)}
    out = run_dir / "snippets"
    out.mkdir(parents=True, exist_ok=True)
    # Training reads every parquet file here in sorted path order: the mined rows
    # (snippets.parquet), then the generated parts, which Ray Data's workers write
    # themselves (snippets_generated/part-*.parquet, named in the snippets' order).
    shutil.rmtree(out / GENERATED_PARTS, ignore_errors=True)  # a rerun's parts replace the last run's
    pq.write_table(snippets.table, out / "snippets.parquet")
    if snippets.generated is not None:
        snippets.generated.write(str(out / GENERATED_PARTS))
    write_json(run_dir / "snippets_report.json", snippets.report)
    return {"snippets_path": str(out), "report": snippets.report}


def output_fit(config: JobConfig, snippets: dict, expansion: MergeExpansion) -> OutputFit | None:
    """The fit the pipeline hands the distillation's workers; None with the fit off or
    without corpus text (stages.fit_text)."""
    texts = fit_text(config.data.corpus, config.output_fit, snippets["report"], expansion)
    return OutputFit(config.output_fit, tuple(texts)) if texts else None


def distill_rows(config: JobConfig, expansion: MergeExpansion, snippets: dict, run_dir: Path, run_key: str,
                 fit: OutputFit | None = None) -> dict:
    """Distill on Ray Train, and with `fit` fit the output rows on the same workers after it.
    Checkpoints live under `<run_name>-<run_key>`: a stopped run with the same settings
    resumes, a finished one only runs `fit` again, and a run with new settings starts its
    own folder, leaving earlier runs as they were."""
    from tokdist_ray.training.ray_trainer import distill_distributed
    from tokdist_ray.training.run_manifest import RunDirectory

    distilled, not_distilled = split_by_snippets(expansion.tokens, snippets["report"]["snippets_per_token"],
                                                 config.snippets.min_snippets_per_token, config.output.pre_init_strategy)
    dist = config.distributed
    storage = dist.storage_path or str((run_dir / "checkpoints").resolve())
    run_name = f"{dist.run_name}-{run_key[:8]}"
    run = RunDirectory(storage, run_name)
    state, step = run.state, run.resume_step()
    if state == "new":
        plan = "a new run (no run with these settings yet)"
    elif step is None:
        plan = f"the run with these settings {state} with no checkpoint to resume from; starting it again from step 0"
    else:
        plan = f"the run with these settings {state}; continuing from its checkpoint at step {step}" + (
            ", then fitting its output rows" if state == "finished" and fit is not None else "")
    log.info("distillation checkpoints: %s/%s: %s", storage, run_name, plan)
    dist = dataclasses.replace(dist, storage_path=storage, run_name=run_name, resume=state != "new")
    output = config.output
    result = distill_distributed(
        config.model, snippets["snippets_path"], expansion, run_dir / "rows", config.training, dist,
        output.emb_policy, output.pre_init_strategy, distilled=[t.text for t in distilled],
        snippet_len=config.snippets.snippet_len, output_fit=fit,
    )
    return {"rows_dir": str(result.rows_dir), "tokens_not_distilled": not_distilled}


def fitted_rows(rows_dir: str, fit: OutputFit | None) -> dict:
    """The fit stage's outputs once its rows are written: the fitted rows, or with no fit
    the distilled ones as they are."""
    if fit is None:
        return {"rows_path": str(Path(rows_dir) / DISTILLED_ROWS), "summary": dict(NOT_FITTED)}
    return {"rows_path": str(Path(rows_dir) / FITTED_ROWS), "summary": read_json(Path(rows_dir) / FIT_RECORD)}


def prune_vocabulary(config: JobConfig, expansion: MergeExpansion, fitted: dict, run_dir: Path) -> tuple[Pruning, dict]:
    """The fitted rows and the expansion that export and evaluation read: with
    output_fit.prune, without the tokens that do not pay (stages.prune_tokens), written
    under run_dir/pruned; and `fitted` with that rows path and the pruning in its summary.
    Cheap (no model), so it runs whenever they do: a new max_bits_per_saved_id needs no refit."""
    pruning = prune_tokens(expansion, read_rows(fitted["rows_path"]), fitted["summary"], config.output_fit)
    summary = pruning.fit_summary(fitted["summary"])
    if pruning.expansion is expansion:
        return pruning, {**fitted, "summary": summary}
    out = run_dir / "pruned"
    save_expansion(pruning.expansion, out / "tokenizer")
    write_rows(out / FITTED_ROWS, pruning.rows)
    return pruning, {**fitted, "rows_path": str(out / FITTED_ROWS), "summary": summary}


def export_model(config: JobConfig, pruning: Pruning, snippets: dict, distilled: dict, fitted: dict) -> dict:
    """Write the expanded model (export.model.save_model: streamed, shard by shard) in a Ray task,
    so the driver holds no weights, with report.json from the records of the earlier stages."""
    import ray

    from tokdist_ray.export.model import ROWS

    expansion = pruning.expansion
    record = pruning.training_record(read_json(Path(distilled["rows_dir"]) / TRAINING_RECORD))
    report = expansion_report(
        config.model, expansion, record,
        settings={"output_emb_policy": output_emb_policy(config.output.emb_policy).value,
                  "pre_init_strategy": config.output.pre_init_strategy, "training": dict(vars(config.training))},
        not_distilled=distilled["tokens_not_distilled"], snippets=snippets["report"], output_fit=fitted["summary"],
    )
    output = config.output
    gguf = GgufOptions(output.gguf_dtype, output.gguf_pre) if output.gguf else None
    out = Path(config.model_dir).expanduser().resolve()

    def export() -> None:
        save_model(config.model, expansion, read_rows(fitted["rows_path"]), out, report, gguf=gguf)

    with user_errors_from_ray():  # a full disk, say: its one line, not Ray's traceback
        ray.get(ray.remote(num_cpus=1, runtime_env={"env_vars": worker_env()})(export).remote())
    return {"model_dir": str(out), "rows_path": str(out / ROWS), "report_path": str(out / "report.json"),
            **({"gguf_path": str(out / GGUF_FILE)} if gguf is not None else {})}


def evaluate_rows(config: JobConfig, expansion: MergeExpansion, distilled: dict, fitted: dict, run_dir: Path) -> dict:
    from tokdist_ray.eval.heldout import Evaluation, evaluate_export

    loss_curve = read_json(Path(distilled["rows_dir"]) / TRAINING_RECORD)["training"]["loss_curve"]
    evaluation = Evaluation(config.model, expansion, fitted["rows_path"], config.eval, loss_curve,
                            config.snippets.snippet_len, config.training.target_layer, config.snippets.seed,
                            config.trust_remote_code)
    return evaluate_export(evaluation, run_dir / "eval")
