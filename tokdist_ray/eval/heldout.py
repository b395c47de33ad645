"""The evaluate stage on held-out text: the registered metrics (tokdist_ray/eval/__init__.py:
drift, compression, bits per byte, generation; tokdist_ray/eval/metrics.py says what a
metric is), for Token Distillation's rows next to the baselines', scored by workers and
written as eval.json, eval.md and PNG plots."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from tokdist_ray.atomic import write_json
from tokdist_ray.capacity import Capacity, cluster_capacity, free_cpus, wait_for_nodes
from tokdist_ray.config import FileDataSource
from tokdist_ray.console import quiet_worker, worker_env
from tokdist_ray.data.corpus.corpus import documents
from tokdist_ray.eval.drift import baseline_rows
from tokdist_ray.eval.metrics import Evaluation, Part, registered
from tokdist_ray.eval.plots import loss_curve_plot
from tokdist_ray.eval.shards import merge, worker_count
from tokdist_ray.raycluster import node_id, ray_is_running, use_assigned_cpus
from tokdist_ray.vocab.models import load_model, load_tokenizer, ties_word_embeddings

log = logging.getLogger("tokdist_ray")


def evaluate_export(evaluation: Evaluation, out_dir: Path) -> dict:
    """Every registered metric on the held-out text, for Token Distillation's rows and the
    baselines'; eval.json, eval.md and the plots written to `out_dir` here, from the
    workers' results.

    The workers run where models run: on a Ray cluster with GPUs (up, or node types its
    autoscaler can launch: tokdist_ray.capacity), one task per GPU (`shards.worker_count`),
    each loading the model once, each metric's work split between them (`shards.part`);
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
    wanted = capacity.largest_cpu_node()
    return max(1, int(min(wanted, free_cpus(capacity, wanted))) // count)  # torch in the task uses as many threads


def _part_task(evaluation: Evaluation, index: int, count: int) -> dict:
    quiet_worker()
    use_assigned_cpus()
    return score_part(evaluation, index, count)


def score_part(evaluation: Evaluation, index: int = 0, count: int = 1) -> dict:
    """Part `index` of `count` of the evaluation, on this process's accelerator, with one
    copy of the model: each registered metric's share of the work (`Metric.score`).
    `shards.merge` puts the parts together."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # bf16 on a GPU, as the model is served: the states (and so drift and bits per byte)
    # are a bf16 model's, and each method's rows are rounded to bf16 when written into its
    # tables; logits, log-softmax, MSE and the sums over positions stay fp32. On CPU fp32.
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    expansion, trust = evaluation.expansion, evaluation.trust_remote_code
    model = load_model(evaluation.model, dtype=dtype, device=device, trust_remote_code=trust)
    rows = (load_file(evaluation.rows, device=device) if isinstance(evaluation.rows, str)
            else {name: row.to(device) for name, row in evaluation.rows.items()})
    texts = [t for t in documents(FileDataSource(paths=list(evaluation.settings.heldout_paths))) if isinstance(t, str)]
    part = Part(evaluation, index, count, model, ties_word_embeddings(model),
                load_tokenizer(evaluation.model, trust_remote_code=trust), rows,
                {"token_distillation": rows["input"], **baseline_rows(model, expansion.tokens, expansion.new_start,
                                                                  names=evaluation.settings.baselines)},
                texts, device, dtype)
    out = {"part": index, "node": node_id(), "device": device}
    for metric in registered():
        out |= metric.score(part)
    return out


def _write(report: dict, loss_curve: list, out_dir: Path) -> dict:
    """eval.json, eval.md and the plots; the stage's summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = registered()
    on_page = sorted(metrics, key=lambda metric: metric.page)
    text = "\n\n".join(section for metric in on_page for section in metric.sections(report))
    write_json(out_dir / "eval.json", report)
    (out_dir / "eval.md").write_text(text + "\n", encoding="utf-8")
    log.info("held-out evaluation:\n%s", text)
    plots = [path for metric in on_page for path in metric.plots(report, out_dir)] + loss_curve_plot(loss_curve, out_dir)
    summary = {"eval_path": str(out_dir / "eval.json"), "table": text, "plots": plots, "node": report["node"]}
    for metric in metrics:
        summary |= metric.summary(report)
    return summary
