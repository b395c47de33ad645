"""Step time, snippets/s, memory and MFU of the distillation step, measured by
bench/gpu_check.py on Llama-3-8B-shaped models (random weights from a config, bf16 on the
GPU) with the product's loop under strategies.Local, the default DistillationConfig (MSE on
the last layer's hidden states and the new-token output loss) and the default output policy
(first_piece: an untied model's new output rows fixed), the training state's dtypes checked
(gpu_check_runs.PrecisionProbe).

FLOPs of a step are counted from that step's batch as TokenDistiller.forward runs it, 2 per
multiply-add, matmuls only:

    F = 2·P·N_teacher + 4·P·N_student + 2·d·(V·Q + (2·(V + n) + n·o)·K)

    P          matmul weights of the decoder layers: L·(d·(q + 2·kv) + q·d + 3·d·ff),
               q = heads·head_dim, kv = kv_heads·head_dim
    N_teacher  teacher tokens: a forward pass, no grad
    N_student  student positions run, those after the prefix it shares with the teacher:
               a forward pass and a backward pass for the input gradients only (the
               weights are frozen, so no weight-gradient matmuls): 2·P + 2·P a position
    K          student positions followed by a new token: the LM head over the V old and
               n new rows runs forward, backward to the hidden state, and (o = 1 where the
               output rows train, 0 for first_piece's fixed rows) backward to the n new rows
    Q          teacher positions that predict a piece of those new tokens: the LM head
               over the V old rows, forward

Left out: attention scores (about 4·T·d per position and layer, under 0.5% of F at T = 51)
and elementwise ops. MFU = F / step time / the GPU's dense bf16 peak (PEAK_TFLOPS, by the
name torch gives the GPU; unknown elsewhere, unless --peak-tflops says it).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import pyarrow as pa
import torch
from gpu_check_runs import POLICY, PrecisionProbe, fail_if_injected, synthetic_snippets

from tokdist_ray.config import DistillationConfig
from tokdist_ray.training.batching import collate
from tokdist_ray.training.loop import SnippetIds, train_loop
from tokdist_ray.training.output_side import new_token_positions
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.schedule import SnippetSchedule, make_optimizer
from tokdist_ray.training.step import TokenDistiller
from tokdist_ray.training.strategies import Local
from tokdist_ray.vocab.alignment import PieceAligner

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)
# Dense bf16 TFLOP/s (the spec sheets' figure without sparsity), by a part of the name torch
# gives the GPU; the first that matches counts, so the PCIe and NVL parts come first.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
               ("A100", 312.0), ("L40S", 362.0))
SNIPPET_LEN = 50  # ids after BOS, the snippets stage's default
N_NEW = 512


@dataclass
class Measurement:
    batch: int
    steps: int  # timed, after the warm-up steps
    seconds_per_step: float  # median
    snippets_per_s: float
    tflop_per_step: float
    tflops: float  # achieved, over the timed steps
    mfu: float | None  # None where the GPU's peak is unknown
    prefix_skipped: float  # share of student positions taken from the teacher's prefix
    peak_memory_gb: float | None
    n_new: int  # new rows trained
    precision: dict  # PrecisionProbe's report

    def as_dict(self) -> dict:
        return asdict(self)


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    """The GPU's dense bf16 peak: `given`, else the table's; None where neither knows it."""
    if given or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def build_model(config: dict, device: torch.device, dtype: torch.dtype):
    """A frozen LlamaForCausalLM with random weights, made on `device` (nothing is downloaded)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
    return model.eval().requires_grad_(False)


def measure(model, batches: list[int], steps: int, warmup: int, peak: float | None, n_new: int = N_NEW) -> list[Measurement]:
    return [_measure_batch(model, batch, steps, warmup, peak, n_new) for batch in batches]


def _measure_batch(model, batch: int, steps: int, warmup: int, peak: float | None, n_new: int) -> Measurement:
    device = model.device
    vocab = model.config.vocab_size
    phrases, snippet_lists = synthetic_snippets(vocab, n_new, (warmup + steps) * batch, SNIPPET_LEN, seed=batch)
    cfg = DistillationConfig(batch_size=batch)
    snippets = SnippetIds(pa.array(snippet_lists, pa.list_(pa.int32())), PieceAligner(phrases, vocab))
    schedule = SnippetSchedule.for_run(snippets.student_ids, vocab, cfg)
    distiller = TokenDistiller.from_config(model, initial_rows(model, phrases, POLICY, "fvt"), vocab, cfg).to(device)
    optimizer, lr_schedule = make_optimizer([p for p in distiller.parameters() if p.requires_grad], cfg,
                                            schedule.total_steps(cfg))
    stamps = []

    def after_step(step: int, rank: int) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        fail_if_injected(step, rank)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    local, probe = Local(distiller, optimizer, lr_schedule), PrecisionProbe(distiller)
    progress, _ = train_loop(local, snippets, schedule, cfg, after_step=after_step)
    bad = [p for p in progress.history.loss_curve if not torch.isfinite(torch.tensor(p["loss"]))]
    if bad:
        raise AssertionError(f"batch {batch}: loss not finite at {bad}")
    seconds = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    counts = [StepCounts.of(distiller, collate(snippets.examples(schedule.global_indices(s))))
              for s in range(warmup, warmup + steps)]
    flops = [step_flops(model.config, len(phrases), c, distiller.rows.trains_output) for c in counts]
    achieved = sum(flops) / sum(seconds) / 1e12
    median = statistics.median(seconds)
    skipped = sum(c.n_skipped for c in counts) / sum(c.n_skipped + c.n_student for c in counts)
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    precision = probe.report(local)
    del distiller, optimizer, local
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Measurement(batch, steps, median, batch / median, statistics.mean(flops) / 1e12, achieved,
                       achieved / peak if peak else None, skipped, memory, len(phrases), precision)


@dataclass(frozen=True)
class StepCounts:
    """The positions each part of a step runs over (the module's formula)."""

    n_teacher: int
    n_student: int
    n_skipped: int  # student positions not run: taken from the teacher's prefix
    k: int
    q: int

    @classmethod
    def of(cls, distiller: TokenDistiller, batch: dict) -> "StepCounts":
        # the default losses run teacher and student to the last layer: the student reuses the prefix
        ids, mask = batch["student_ids"], batch["student_mask"]
        split = distiller.shared_prefix(ids, mask)
        at = new_token_positions(ids, mask, batch["teacher_ids"], batch["teacher_index"], distiller.new_start)
        return cls(batch["teacher_ids"].numel(), ids.shape[0] * (ids.shape[1] - split), ids.shape[0] * split,
                   len(at.batch), int(at.valid.sum()))


def decoder_matmul_weights(config) -> int:
    """P: the weights of the decoder layers' matmuls (attention projections and MLP)."""
    d, ff = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return config.num_hidden_layers * (d * (q + 2 * kv) + q * d + 3 * d * ff)


def step_flops(config, n_new: int, c: StepCounts, output_rows_train: bool) -> float:
    p, d, v = decoder_matmul_weights(config), config.hidden_size, config.vocab_size
    head = 2 * (v + n_new) + (n_new if output_rows_train else 0)
    return 2 * p * c.n_teacher + 4 * p * c.n_student + 2 * d * (v * c.q + head * c.k)
