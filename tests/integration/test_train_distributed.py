"""Distributed distillation on Ray Train (CPU, gloo, 2 workers, tiny models).

Every distributed run is compared with `training.loop.train_local` on the same global batches:
new rows and the per-step loss curve must match within fp32 round-off.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers import WORDS
from tokdist_ray.config import DistillationConfig, DistributedConfig, OutputEmbeddingInit, OutputFitConfig
from tokdist_ray.data.mining.local_mining import mine_snippets
from tokdist_ray.data.snippets import snippets_to_table
from tokdist_ray.errors import RunConflictError
from tokdist_ray.export.model import save_model
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.training.distilled_rows import read_distilled, read_fitted
from tokdist_ray.training.fit_hook import OutputFit
from tokdist_ray.training.loop import train_local
from tokdist_ray.training.ray_trainer import distill_distributed
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.training.step import TokenDistiller
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model

WORKERS = 2
# per-worker batch 2 x 2 workers: 13 snippets make batches of 4, 4, 4, 1 (rank 1 idles in the last)
TRAINING = DistillationConfig(
    epochs=2, batch_size=2, learning_rate=5e-2, mixed_precision=False, seed=3,
    lr_schedule="linear", warmup_ratio=0.25, log_every=1,
)
POLICY = OutputEmbeddingInit.SUBTOKEN_MEAN
DOCUMENTS = [
    f"{lead} the{word} {tail}"
    for lead, tail in [
        ("In the morning", "waited near the station."),
        ("After school", "was seen by the river."),
        ("Late at night", "passed the old library."),
        ("On Monday", "stopped at the market square."),
        ("During the storm", "stayed in the garden."),
        ("Before lunch", "crossed the bridge in the valley."),
        ("In summer", "came back to the hill."),
    ]
    for word in WORDS
]
ROWS_TOLERANCE = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """(model_dir, expansion, snippets_dir): an untied tiny model, 2 new words (and the
    intermediates their merges need), 13 snippets in 2 files."""
    model_dir = tiny_model_dir(tied=False, bos=True)
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(model_dir), WORDS)
    rows, _ = mine_snippets(DOCUMENTS, expansion, snippet_len=16, snippets_per_token=7)
    rows = rows[:13]
    assert len(rows) == 13
    snippets_dir = tmp_path_factory.mktemp("snippets")
    pq.write_table(snippets_to_table(rows[:6]), snippets_dir / "part-0.parquet")
    pq.write_table(snippets_to_table(rows[6:]), snippets_dir / "part-1.parquet")
    return model_dir, expansion, snippets_dir


@pytest.fixture(scope="module")
def reference(setup):
    """Factory: train_local on the same snippets with the global batch -> (rows, history)."""
    made = {}

    def make(training: DistillationConfig = TRAINING):
        key = repr(training)
        if key not in made:
            made[key] = train_single_process(setup, training)
        return made[key]

    return make


def train_single_process(setup, training: DistillationConfig):
    model_dir, expansion, snippets_dir = setup
    model = load_model(model_dir)
    tokens, new_start = expansion.tokens, expansion.new_start
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start),
                              read_snippets(str(snippets_dir), [t.text for t in tokens]).ids)
    rows = initial_rows(model, [t.phrase_ids for t in tokens], POLICY, "fvt")
    distiller = TokenDistiller.from_config(model, rows, new_start, training)
    history = train_local(distiller, examples, dataclasses.replace(training, batch_size=training.batch_size * WORKERS))
    return {"input": rows.input.detach().clone(), "output": rows.output.clone()}, history


def run(setup, out: Path, training: DistillationConfig = TRAINING, after_step=None, fit=None, **dist) -> object:
    model_dir, expansion, snippets_dir = setup
    return distill_distributed(
        str(model_dir), str(snippets_dir), expansion, out, training=training,
        dist=DistributedConfig(num_workers=WORKERS, **dist), output_emb_policy=POLICY, after_step=after_step,
        output_fit=OutputFit(fit, tuple(DOCUMENTS)) if fit else None,
    )


@dataclasses.dataclass(frozen=True)
class CrashOnce:
    """An `after_step` hook: that rank exits after that step, once (the marker file records it)."""

    step: int
    rank: int
    marker: str

    def __call__(self, step: int, rank: int) -> None:
        import os

        import ray.train

        if (step, rank) != (self.step, self.rank):
            return
        try:
            open(self.marker, "x").close()
        except FileExistsError:
            return
        # die only once Ray has committed the reported checkpoints, so the test knows
        # which one the restart must continue from
        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED)
        os._exit(1)


def assert_matches_reference(result, reference, setup) -> None:
    ref_rows, ref_history = reference
    rows = read_distilled(result.rows_dir).rows
    torch.testing.assert_close(rows["input"], ref_rows["input"], **ROWS_TOLERANCE)
    torch.testing.assert_close(rows["output"], ref_rows["output"], rtol=0, atol=0)
    if result.fitted:
        fitted = read_fitted(result.rows_dir).rows
        assert torch.equal(fitted["input"], rows["input"]) and not torch.equal(fitted["output"], ref_rows["output"])
    assert not torch.equal(rows["input"], initial_input_rows(setup)), "training did not move the rows"
    curve = result.record["training"]["loss_curve"]
    assert [p["step"] for p in curve] == [p["step"] for p in ref_history.loss_curve] == list(range(1, 9))
    torch.testing.assert_close(
        torch.tensor([p["loss"] for p in curve]), torch.tensor([p["loss"] for p in ref_history.loss_curve]),
        rtol=1e-5, atol=1e-7,
    )
    assert result.record["training"]["snippets"] == 2 * 13


def initial_input_rows(setup) -> torch.Tensor:
    model_dir, expansion, _ = setup
    return initial_rows(load_model(model_dir), [t.phrase_ids for t in expansion.tokens], POLICY, "fvt").input.detach()


def assert_exported_with_old_rows_unchanged(result, setup, out: Path) -> None:
    """The export stage writes the run's rows after the base model's, bit for bit."""
    model_dir, expansion, _ = setup
    rows = (read_fitted if result.fitted else read_distilled)(result.rows_dir).rows
    save_model(str(model_dir), expansion, rows, out, {"test": True})
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    expanded = AutoModelForCausalLM.from_pretrained(out)
    n_old = original.get_input_embeddings().weight.shape[0]
    assert expanded.get_input_embeddings().weight.shape[0] == n_old + len(expansion.tokens)
    assert torch.equal(expanded.get_input_embeddings().weight[:n_old], original.get_input_embeddings().weight)
    assert torch.equal(expanded.get_output_embeddings().weight[:n_old], original.get_output_embeddings().weight)
    assert torch.equal(expanded.get_input_embeddings().weight[n_old:], rows["input"])
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(WORDS[0], add_special_tokens=False)["input_ids"] == [n_old]


# --------------------------------------------------------------------- Ray Train runs
# A worker group start costs tens of seconds here, so each run checks several things:
# every strategy's result against train_local, and each recovery path once.

ZERO3 = dict(
    strategy="deepspeed", zero_stage=3,
    # threshold 0: partition even the tiny model's small tensors, so ZeRO-3 really shards them
    deepspeed_config={"zero_optimization": {"stage3_param_persistence_threshold": 0}},
)


def test_zero2_equals_single_process(ray_session, setup, reference, tmp_path, monkeypatch):
    # relative snippets path, as a job config gives it: workers run in Ray's own directory
    model_dir, expansion, snippets_dir = setup
    monkeypatch.chdir(snippets_dir.parent)
    relative = (model_dir, expansion, Path(snippets_dir.name))
    # a checkpoint after every step by the clock, uploaded while training goes on
    result = run(relative, tmp_path / "out", strategy="deepspeed", zero_stage=2, checkpoint_every=0,
                 checkpoint_every_s=1e-9, checkpoint_upload="async")
    assert result.checkpoint_path.endswith(f"checkpoint_step_{result.record['training']['steps']:08d}")
    report = result.record["distributed"]
    assert (report["strategy"], report["zero_stage"], report["global_batch"], report["resumed_from_steps"]) == ("deepspeed", 2, 4, [])
    assert_matches_reference(result, reference(), setup)
    assert_exported_with_old_rows_unchanged(result, setup, tmp_path / "model")


def test_zero3_replaces_a_dead_worker_and_equals_single_process(ray_session, setup, reference, tmp_path):
    crash = CrashOnce(5, 1, str(tmp_path / "crashed"))  # rank 1 exits after step 5
    # an inner target layer: the student then runs a truncated view of the sharded decoder
    training = dataclasses.replace(TRAINING, target_layer=1)
    # sync uploads: the checkpoint at step 3 is in storage before the crash at step 5
    # then the output fit on the documents, each worker reading every other one through the sharded model
    result = run(setup, tmp_path / "out", training, crash, fit=OutputFitConfig(max_steps=50, batch_positions=64),
                 checkpoint_every=3, checkpoint_upload="sync", max_failures=1, **ZERO3)
    assert (tmp_path / "crashed").exists()
    report = result.record["distributed"]
    assert (report["strategy"], report["zero_stage"], report["resumed_from_steps"]) == ("deepspeed", 3, [3])
    # partitioned as loaded: each of the 2 workers holds about half the weights
    assert all(0.45 <= share <= 0.55 for share in report["weights_held"]), report["weights_held"]
    # steps 4-5 were redone from the checkpoint at step 3; the loss curve shows each step,
    # and so each global batch of snippets, exactly once
    assert result.fitted
    assert_matches_reference(result, reference(training), setup)
    assert_exported_with_old_rows_unchanged(result, setup, tmp_path / "model")
    fit = read_fitted(result.rows_dir).summary
    tokenizer, tokens = setup[1].tokenizer, setup[1].tokens
    # every position of every document and of the first 8 mined snippets of each token, over
    # both workers (each reads a share of both, in as many passes as the other)
    windows = read_snippets(str(setup[2]), [t.text for t in tokens]).corpus_windows(8)
    assert fit["chunks"] == len(DOCUMENTS) and fit["snippet_windows"] == len(windows) > 0
    assert fit["positions"] == sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in DOCUMENTS) \
        + sum(len(w) - 1 for w in windows)
    assert fit["held_back_loss_best"] < fit["held_back_loss_start"]


def test_ddp_resumes_a_stopped_job_and_equals_single_process(ray_session, setup, reference, tmp_path):
    from ray.train import TrainingFailedError

    storage = f"file://{tmp_path / 'ckpt'}"  # a URI, as for object storage
    ddp = dict(strategy="ddp", checkpoint_every=3, checkpoint_upload="sync", storage_path=storage)
    with pytest.raises(TrainingFailedError):
        run(setup, tmp_path / "out", after_step=CrashOnce(5, 0, str(tmp_path / "crashed")), **ddp)
    assert not (tmp_path / "out").exists()

    with pytest.raises(RunConflictError, match="a stopped run already exists.*resume=True"):
        run(setup, tmp_path / "out", **ddp)
    result = run(setup, tmp_path / "out", resume=True, **ddp)
    report = result.record["distributed"]
    assert (report["strategy"], report["global_batch"], report["resumed_from_steps"]) == ("ddp", 4, [3])
    assert report["weights_held"] == [1.0, 1.0]
    assert_matches_reference(result, reference(), setup)
    assert_exported_with_old_rows_unchanged(result, setup, tmp_path / "model")

    zero2 = dict(strategy="deepspeed", zero_stage=2, storage_path=storage, resume=True)
    with pytest.raises(RunConflictError, match=r"settings differ from it: \[.strategy., .zero_stage.\]"):
        run(setup, tmp_path / "out", **zero2)
    with pytest.raises(RunConflictError, match="no run to resume"):
        run(setup, tmp_path / "out", **{**zero2, "storage_path": str(tmp_path / "empty")})


def test_bad_arguments_fail_before_any_worker_starts(setup, tmp_path):
    model_dir, expansion, snippets_dir = setup
    with pytest.raises(ValueError, match="output_emb_policy must be one of"):
        distill_distributed(str(model_dir), str(snippets_dir), expansion, tmp_path, output_emb_policy="mean")
    with pytest.raises(ValueError, match="pre_init_strategy must be one of"):
        distill_distributed(str(model_dir), str(snippets_dir), expansion, tmp_path, pre_init_strategy="mean")
    with pytest.raises(ValueError, match="MergeExpansion with new tokens"):
        distill_distributed(str(model_dir), str(snippets_dir), [], tmp_path)
    with pytest.raises(ValueError, match="distilled tokens not in the expansion"):
        distill_distributed(str(model_dir), str(snippets_dir), expansion, tmp_path, distilled=[" nowhere"])
