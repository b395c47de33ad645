"""The job: select tokens and expand the tokenizer -> mine and/or generate snippets ->
distill -> export -> evaluate.

Every stage writes under `run_dir` and records a fingerprint of its inputs in
`run_dir/stages/<stage>.json` when it finishes. A rerun with the same inputs skips the
finished stages, and a distillation that was stopped resumes from its last checkpoint,
so a failed job resubmitted continues where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.console import StageProgress
from tokdist_ray.data.budget import quota_summary, snippet_quota
from tokdist_ray.errors import TokdistError
from tokdist_ray.fingerprint import fingerprint
from tokdist_ray.job.checks import check_job
from tokdist_ray.job.config import GGUF_OPTIONS, JobConfig, config_dict
from tokdist_ray.job.inputs import content_digest, corpus_files, heldout_files, model_files
from tokdist_ray.job.lock import RunDirLock
from tokdist_ray.job.shared_run_dir import check_run_dir_shared
from tokdist_ray.raycluster import connect, joins_cluster
from tokdist_ray.report import read_report, write_report
from tokdist_ray.stages import collect_snippets, expand_tokens, fit_text, split_by_snippets
from tokdist_ray.training.run_manifest import NOT_IN_RUN_IDENTITY
from tokdist_ray.vocab.expansion_files import expansion_summary, load_expansion, save_expansion
from tokdist_ray.vocab.gguf_export import GGUF_FILE, GgufOptions
from tokdist_ray.vocab.merges import MergeExpansion
from tokdist_ray.vocab.models import load_tokenizer
from tokdist_ray.vocab.selection import frequent_fragmented_words
from tokdist_ray.vocab.tokens import read_token_file

log = logging.getLogger("tokdist_ray")
STAGES = ("tokens", "snippets", "distill", "evaluate")
GENERATED_PARTS = "snippets_generated"  # sorts after snippets.parquet, so training reads mined rows first


# ------------------------------------------------------------------ stage bookkeeping
def _key(*parts) -> str:
    return fingerprint(parts)


class StageLedger:
    """Which stages finished, with which inputs, how long they took.

    A record is written whole (temp file, then rename) once its stage has finished, and
    names the files under run_dir relative to it, so a run_dir moved or copied elsewhere
    reads its own files. A record that cannot be read is set aside and its stage reruns."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.dir = run_dir / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def done(self, stage: str, key: str) -> dict | None:
        record = self._read(stage)
        return record if record is not None and record.get("fingerprint") == key else None

    def outputs(self, stage: str) -> dict:
        """A finished stage's outputs, whatever its inputs were."""
        record = self._read(stage)
        if record is None:
            raise TokdistError(f"stage {stage} has not run yet in {self.run_dir}; run it first (tokdist-ray {stage})")
        return record["outputs"]

    def run(self, stage: str, key: str, work: Callable[[], dict]) -> dict:
        record = self.done(stage, key)
        if record is not None:
            log.info("stage %s: already done with the same inputs, reusing %s", stage, self.dir / f"{stage}.json")
            self.skipped.append(stage)
            self.timings[stage] = 0.0
            return record["outputs"]
        log.info("stage %s: running", stage)
        start = time.perf_counter()
        outputs = work()
        self.timings[stage] = round(time.perf_counter() - start, 3)
        record = {"fingerprint": key, "seconds": self.timings[stage], "outputs": self.portable(outputs)}
        write_report(self.dir / f"{stage}.json", record)
        return outputs

    def portable(self, outputs: dict) -> dict:
        """`outputs` with the files under run_dir named relative to it."""
        return {k: _relative(v, self.run_dir) if k in PATH_OUTPUTS else v for k, v in outputs.items()}

    def _read(self, stage: str) -> dict | None:
        path = self.dir / f"{stage}.json"
        if not path.is_file():
            return None
        try:
            record = read_report(path)
            outputs = record["outputs"]
        except (ValueError, KeyError, TypeError) as e:  # cut short by a kill, or edited by hand
            aside = path.with_name(f"{path.name}.unreadable")
            path.replace(aside)
            log.warning("stage %s: its record %s is unreadable (%s); set it aside as %s, the stage runs again",
                        stage, path, type(e).__name__, aside.name)
            return None
        record["outputs"] = {k: str(self.run_dir / v) if k in PATH_OUTPUTS else v for k, v in outputs.items()}
        return record


# outputs that name files: kept relative to run_dir in stage records (absolute stays absolute)
PATH_OUTPUTS = ("tokenizer_path", "tokens_path", "snippets_path", "model_dir", "rows_path", "report_path", "gguf_path")


def _relative(path: str, run_dir: Path) -> str:
    return str(Path(path).relative_to(run_dir)) if Path(path).is_relative_to(run_dir) else path


# ------------------------------------------------------------------ stages
def corpus_source(config: JobConfig) -> FileDataSource | HFDataSource | None:
    data = config.data
    if data.source == "files":
        return FileDataSource(paths=list(data.paths), text_column=data.text_column, max_docs=data.max_docs)
    if data.source == "hf":
        return HFDataSource(
            dataset_path=data.dataset_path, name=data.name, split=data.split, max_docs=data.max_docs,
            revision=data.revision, text_column=data.text_column,
        )
    return None


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
        from tokdist_ray.data.pre_token_counts import count_pre_tokens
        from tokdist_ray.vocab.bpe_training import continue_bpe

        counts = count_pre_tokens(corpus_source(config), tokenizer, num_workers=config.data.num_workers)
        log.info("continued BPE: %d distinct pre-tokens counted; learning %d merges", len(counts), spec.from_corpus)
        merges = StageProgress("continued BPE", spec.from_corpus, "merges", every_s=10.0)
        learned = continue_bpe(tokenizer, counts, spec.from_corpus, min_count=spec.min_count, max_chars=spec.max_chars,
                               progress=lambda i, _: merges.reached(i))
        return [t.text for t in learned], {t.text: t.count for t in learned}
    from tokdist_ray.data.corpus import documents

    texts = (t for t in documents(corpus_source(config)) if isinstance(t, str))
    chosen = frequent_fragmented_words(tokenizer, texts, spec.from_corpus, min_pieces=spec.min_pieces,
                                       min_count=spec.min_count)
    return [word for word, _ in chosen], dict(chosen)


def _tokens_stage(config: JobConfig, tokenizer, run_dir: Path) -> dict:
    """Choose the tokens, expand the tokenizer, save it: every later stage uses it."""
    candidates, counts = candidate_tokens(config, tokenizer)
    expansion = expand_tokens(tokenizer, candidates, config.tokens.tokenizer_mode)
    save_expansion(expansion, run_dir / "tokenizer")
    path = run_dir / "tokens.json"
    summary = expansion_summary(expansion)
    write_report(path, {
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
    from tokdist_ray.data.corpus import documents
    from tokdist_ray.eval.drift import compression, leading_texts

    sample = leading_texts(documents(FileDataSource(paths=list(config.eval.heldout_paths))))
    return compression(tokenizer, expansion.tokenizer, sample)


def _corpus_counts(run_dir: Path) -> dict[str, int]:
    """Each new token's corpus count, where the tokens stage chose it from the corpus."""
    tokens = read_report(run_dir / "tokens.json")["tokens"]
    return {t["token"]: t["corpus_count"] for t in tokens if "corpus_count" in t}


def _snippets_stage(config: JobConfig, expansion: MergeExpansion, run_dir: Path) -> dict:
    """Mine and/or generate on Ray, then write the snippets that training reads: the mined
    ones from here, the generated ones from Ray Data's workers (so `run_dir` must be on
    storage every node sees, as training needs anyway)."""
    from tokdist_ray.data.generation.ray_backend import generate_snippets_on_ray
    from tokdist_ray.data.mining import mine_corpus

    source, snippet = corpus_source(config), config.snippets
    quota = snippet_quota(snippet.budget, [t.text for t in expansion.tokens], snippet.snippets_per_token,
                          snippet.min_snippets_per_token,
                          _corpus_counts(run_dir) if snippet.budget == "by_frequency" else None)
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
    write_report(run_dir / "snippets_report.json", snippets.report)
    return {"snippets_path": str(out), "report": snippets.report}


def distill_keys(settings: dict, upstream: str) -> tuple[str, str]:
    """(the distill stage's fingerprint, the digest its checkpoint run is named by).

    The run digest covers what a resumed run must share (run_manifest checks it again),
    so new settings get a run of their own. A new time_budget_s, out_path or GGUF option
    reruns the stage on the same run (a longer budget trains on from the last checkpoint,
    new output_fit settings fit the rows again, a new out_path or GGUF option exports again); log_every and checkpoint/restart
    options change nothing."""
    training = {k: v for k, v in settings["training"].items() if k not in NOT_IN_RUN_IDENTITY}
    operational = ("resume", "max_failures", "checkpoint_every", "checkpoint_every_s", "checkpoint_upload",
                   "keep_checkpoints")
    distributed = {k: v for k, v in settings["distributed"].items() if k not in operational}
    output = {k: v for k, v in settings["output"].items() if k not in GGUF_OPTIONS}
    run = _key(upstream, training, output, distributed)
    # the output fit follows training: new fit settings fit and export again, from the same run
    export = [settings["training"]["time_budget_s"], settings["out_path"], settings.get("output_fit")]
    if settings["output"].get("gguf"):  # off, the keys stay those of runs from before the option
        export.append({k: settings["output"][k] for k in GGUF_OPTIONS})
    return _key(run, *export), run


def _distill_stage(config: JobConfig, expansion: MergeExpansion, snippets: dict, run_dir: Path, run_key: str) -> dict:
    """Distill on Ray Train. Checkpoints live under `<run_name>-<run_key>`: a stopped run
    with the same settings resumes, and a run with new settings starts its own folder,
    leaving earlier runs as they were."""
    import dataclasses

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
            ", then exporting" if state == "finished" else "")
    log.info("distillation checkpoints: %s/%s: %s", storage, run_name, plan)
    dist = dataclasses.replace(dist, storage_path=storage, run_name=run_name, resume=state != "new")
    output = config.output
    texts = fit_text(corpus_source(config), config.output_fit, snippets["report"])
    result = distill_distributed(
        config.model, snippets["snippets_path"], expansion, config.model_dir, config.training, dist,
        output.emb_policy, output.pre_init_strategy, distilled=[t.text for t in distilled],
        not_distilled=not_distilled, snippets_report=snippets["report"], snippet_len=config.snippets.snippet_len,
        gguf=GgufOptions(output.gguf_dtype, output.gguf_pre) if output.gguf else None,
        output_fit=config.output_fit, fit_text=texts,
    )
    gguf_path = {"gguf_path": str(result.out_dir / GGUF_FILE)} if output.gguf else {}
    return {"model_dir": str(result.out_dir), "rows_path": str(result.rows_path),
            "report_path": str(result.report_path), "tokens_not_distilled": not_distilled, **gguf_path}


def _evaluate_stage(config: JobConfig, expansion: MergeExpansion, distilled: dict, run_dir: Path) -> dict:
    from tokdist_ray.eval.heldout import Evaluation, evaluate_export

    loss_curve = read_report(distilled["report_path"])["training"]["loss_curve"]
    evaluation = Evaluation(config.model, expansion, distilled["rows_path"], config.eval, loss_curve,
                            config.snippets.snippet_len, config.training.target_layer, config.snippets.seed,
                            config.trust_remote_code)
    return evaluate_export(evaluation, run_dir / "eval")


# ------------------------------------------------------------------ the job
def run_job(config: JobConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run (or continue) the job; returns the job report, also written to run_dir/job.json.
    One job at a time per run_dir: a second one is refused while the first runs."""
    check_job(config, exports="distill" in stages)
    run_dir = Path(config.run_dir).expanduser().resolve()
    with RunDirLock(run_dir):
        return _run_stages(config, stages, run_dir)


def stage_keys(config: JobConfig, settings: dict) -> dict[str, str]:
    """Each stage's fingerprint before it runs: its settings and what its input files hold
    (job/inputs.py), chained, so an edited input reruns exactly the stages it feeds. The
    evaluation's key also takes the rows it scores, known once distillation ends."""
    corpus = corpus_files(corpus_source(config))
    from_corpus = [settings["data"], corpus] if config.tokens.from_corpus else None
    tokens = _key(settings["model"], model_files(config.model), settings["tokens"],
                  content_digest(config.tokens.file), model_files(config.tokens.target_tokenizer), from_corpus)
    snippets = _key(tokens, settings["data"], corpus, settings["snippets"], settings["generation"])
    distill, run = distill_keys(settings, snippets)
    # the evaluation scores the rows, not the files they are exported as: a GGUF asked for later re-exports
    # the run (a new distill key) but leaves the evaluation's key as it was
    trained = distill_keys({**settings, "output": {**settings["output"], "gguf": False}}, snippets)[0]
    scored = {k: v for k, v in settings["eval"].items() if k != "num_workers"}  # how many share it: same result
    evaluate = _key(trained, scored, heldout_files(config.eval.heldout_paths))
    return {"tokens": tokens, "snippets": snippets, "distill": distill, "run": run, "evaluate": evaluate}


def _run_stages(config: JobConfig, stages: tuple[str, ...], run_dir: Path) -> dict:
    ledger = StageLedger(run_dir)
    settings = config_dict(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    start = time.perf_counter()
    keys = stage_keys(config, settings)
    if joins_cluster():  # before any work: a node-local run_dir would fail stages later
        connect()
        check_run_dir_shared(run_dir)

    if config.tokens.from_corpus:
        connect()  # pre-token counts run on Ray Data
    picked = ledger.run("tokens", keys["tokens"], lambda: _tokens_stage(config, tokenizer, run_dir))
    expansion = load_expansion(picked["tokenizer_path"])
    outputs = {"tokens": picked}
    connect()  # after a token list is checked, which needs no Ray: a bad one fails at once

    if "snippets" in stages or "distill" in stages:
        outputs["snippets"] = ledger.run("snippets", keys["snippets"],
                                         lambda: _snippets_stage(config, expansion, run_dir))
    if "distill" in stages:
        snippets = outputs["snippets"]
        outputs["distill"] = ledger.run(
            "distill", keys["distill"], lambda: _distill_stage(config, expansion, snippets, run_dir, keys["run"]))
    if "evaluate" in stages and config.eval.heldout_paths:
        distilled = outputs.get("distill") or ledger.outputs("distill")
        rows = Path(distilled["rows_path"]).read_bytes()  # a re-distilled model is evaluated anew
        exported = {k: v for k, v in ledger.portable(distilled).items() if k != "gguf_path"}
        key = _key(keys["evaluate"], exported, hashlib.sha256(rows).hexdigest())
        outputs["evaluate"] = ledger.run("evaluate", key, lambda: _evaluate_stage(config, expansion, distilled, run_dir))

    report = {
        "run_dir": str(run_dir),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "stage_seconds": ledger.timings,
        "stages_reused": ledger.skipped,
        "outputs": outputs,
        "config": settings,
    }
    write_report(run_dir / "job.json", report)
    log.info("job finished in %.1fs: %s", report["wall_seconds"], ledger.timings)
    return report
