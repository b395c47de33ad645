"""The job: the stages of job.config.STAGES on Ray, each recorded under `run_dir`.

Every stage writes under `run_dir` and records a fingerprint of its inputs in
`run_dir/stages/<stage>.json` when it finishes (ledger.py). A rerun with the same inputs
skips the finished stages, and a distillation that was stopped resumes from its last
checkpoint, so a failed job resubmitted continues where it stopped. Fingerprints chain:
an edited input, or a new setting, reruns exactly the stages it feeds (a new output-fit
setting refits and exports, a new out_path exports again, a new held-out text evaluates
again).
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from tokdist_ray.atomic import write_json
from tokdist_ray.config import PRUNING
from tokdist_ray.fingerprint import fingerprint
from tokdist_ray.job.checks import check_job
from tokdist_ray.job.config import GGUF_OPTIONS, STAGES, JobConfig, config_dict
from tokdist_ray.job.inputs import content_digest, corpus_files, heldout_files, model_files
from tokdist_ray.job.ledger import StageLedger
from tokdist_ray.job.lock import RunDirLock
from tokdist_ray.job.shared_run_dir import check_shared
from tokdist_ray.job.stages import (
    distill_rows,
    evaluate_rows,
    export_model,
    fitted_rows,
    gather_snippets,
    output_fit,
    prune_vocabulary,
    select_tokens,
)
from tokdist_ray.raycluster import connect, joins_cluster
from tokdist_ray.training.run_manifest import NOT_IN_RUN_IDENTITY
from tokdist_ray.vocab.expansion_files import load_expansion
from tokdist_ray.vocab.models import load_tokenizer

log = logging.getLogger("tokdist_ray")
# what the fit stage writes: a fit recorded before it measured token values (pruning reads them), or
# before its check read held-back text only, runs again
FIT_RECORD_FORMAT = "with token values from held-back chunks; checked on held-back text"


def _key(*parts) -> str:
    return fingerprint(parts)


def distill_keys(settings: dict, upstream: str) -> tuple[str, str]:
    """(the distill stage's fingerprint, the digest its checkpoint run is named by).

    The run digest covers what a resumed run must share (run_manifest checks it again),
    so new settings get a run of their own. A new time_budget_s reruns the stage on the
    same run (it trains on from the last checkpoint); log_every and checkpoint/restart
    options change nothing."""
    training = {k: v for k, v in settings["training"].items() if k not in NOT_IN_RUN_IDENTITY}
    operational = ("resume", "max_failures", "checkpoint_every", "checkpoint_every_s", "checkpoint_upload",
                   "keep_checkpoints")
    distributed = {k: v for k, v in settings["distributed"].items() if k not in operational}
    output = {k: v for k, v in settings["output"].items() if k not in GGUF_OPTIONS}
    run = _key(upstream, training, output, distributed)
    return _key(run, settings["training"]["time_budget_s"]), run


# ------------------------------------------------------------------ the job
def run_job(config: JobConfig, stages: tuple[str, ...] = STAGES) -> dict:
    """Run (or continue) the job; returns the job report, also written to run_dir/job.json.
    One job at a time per run_dir: a second one is refused while the first runs."""
    check_job(config, exports="export" in stages)
    run_dir = Path(config.run_dir).expanduser().resolve()
    with RunDirLock(run_dir):
        return _run_stages(config, stages, run_dir)


def stage_keys(config: JobConfig, settings: dict) -> dict[str, str]:
    """Each stage's fingerprint before it runs: its settings and what its input files hold
    (job/inputs.py), chained, so an edited input reruns exactly the stages it feeds. The
    evaluation's key also takes the rows it scores, known once the fit ends."""
    corpus = corpus_files(config.data.corpus)
    from_corpus = [settings["data"], corpus] if config.tokens.from_corpus else None
    tokens = _key(settings["model"], model_files(config.model), settings["tokens"],
                  content_digest(config.tokens.file), model_files(config.tokens.target_tokenizer), from_corpus)
    snippets = _key(tokens, settings["data"], corpus, settings["snippets"], settings["generation"])
    distill, run = distill_keys(settings, snippets)
    fitting = {k: v for k, v in settings["output_fit"].items() if k not in PRUNING}
    fit = _key(distill, fitting, FIT_RECORD_FORMAT)
    kept = _key(fit, {k: settings["output_fit"][k] for k in PRUNING})  # a new pruning threshold refits nothing
    export = [settings["out_path"]]
    if settings["output"]["gguf"]:
        export.append({k: settings["output"][k] for k in GGUF_OPTIONS})
    scored = {k: v for k, v in settings["eval"].items() if k != "num_workers"}  # how many share it: same result
    return {"tokens": tokens, "snippets": snippets, "distill": distill, "run": run, "fit": fit,
            "export": _key(kept, *export), "evaluate": _key(kept, scored, heldout_files(config.eval.heldout_paths))}


def _run_stages(config: JobConfig, stages: tuple[str, ...], run_dir: Path) -> dict:
    ledger = StageLedger(run_dir)
    settings = config_dict(config)
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    start = time.perf_counter()
    keys = stage_keys(config, settings)
    if joins_cluster():  # before any work: a node-local run_dir would fail stages later
        connect()
        check_shared("run_dir", run_dir)
        if config.out_path:  # the export task writes it on whichever node it runs
            check_shared("out_path", Path(config.model_dir).expanduser().resolve())

    if config.tokens.from_corpus:
        connect()  # pre-token counts run on Ray Data
    picked = ledger.run("tokens", keys["tokens"], lambda: select_tokens(config, tokenizer, run_dir))
    expansion = load_expansion(picked["tokenizer_path"])
    outputs = {"tokens": picked}
    connect()  # after a token list is checked, which needs no Ray: a bad one fails at once

    fits = any(stage in stages for stage in ("fit", "export", "evaluate"))
    if "snippets" in stages or "distill" in stages or fits:
        outputs["snippets"] = snippets = ledger.run("snippets", keys["snippets"],
                                                    lambda: gather_snippets(config, expansion, run_dir))
    if "distill" in stages or fits:
        # the fit runs on the distillation's workers: with a distillation that runs anyway,
        # else on the finished run, resumed to fit
        fit = output_fit(config, snippets, expansion) if fits and ledger.done("fit", keys["fit"]) is None else None
        outputs["distill"] = distilled = ledger.run(
            "distill", keys["distill"], lambda: distill_rows(config, expansion, snippets, run_dir, keys["run"], fit))
        fitted_with_distill = "distill" not in ledger.skipped
    if fits:
        def fit_stage() -> dict:
            if fit is not None and not fitted_with_distill:
                distill_rows(config, expansion, snippets, run_dir, keys["run"], fit)
            return fitted_rows(distilled["rows_dir"], fit)

        outputs["fit"] = fitted = ledger.run("fit", keys["fit"], fit_stage)
        if fit is not None and fitted_with_distill:  # the fit ran in the distillation's launch: its time is the fit's
            seconds = fitted["summary"].get("seconds", 0.0)
            ledger.timings["fit"], ledger.timings["distill"] = seconds, round(ledger.timings["distill"] - seconds, 3)
    if "export" in stages or "evaluate" in stages:
        pruning, kept = prune_vocabulary(config, expansion, fitted, run_dir)
        outputs["fit"] = {**fitted, "summary": kept["summary"]}  # job.json: the pruning, not every token's values
    if "export" in stages:
        outputs["export"] = ledger.run("export", keys["export"],
                                       lambda: export_model(config, pruning, snippets, distilled, kept))
    if "evaluate" in stages and config.eval.heldout_paths:
        rows = Path(kept["rows_path"]).read_bytes()  # rows distilled or fitted anew are evaluated anew
        key = _key(keys["evaluate"], hashlib.sha256(rows).hexdigest())
        outputs["evaluate"] = ledger.run("evaluate", key,
                                         lambda: evaluate_rows(config, pruning.expansion, distilled, kept, run_dir))

    report = {
        "run_dir": str(run_dir),
        "wall_seconds": round(time.perf_counter() - start, 3),
        "stage_seconds": ledger.timings,
        "stages_reused": ledger.skipped,
        "outputs": outputs,
        "config": settings,
    }
    write_json(run_dir / "job.json", report)
    log.info("job finished in %.1fs: %s", report["wall_seconds"], ledger.timings)
    return report
