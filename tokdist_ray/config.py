"""Configuration objects shared by the API, the job and the Ray stages.

The first block of each class mirrors the reference project's API field for field
(names, order, defaults), so code written against it runs unchanged; tokdist-ray's own
options follow. Two defaults differ by measurement: DistillationConfig.loss_methods adds
KL-on-new-token-outputs to the reference's MSE-on-hiddens (pass ["MSE-on-hiddens"] for
the reference's), and an untied model's new output rows are its first pieces' output
rows (OutputEmbeddingInit.FIRST_PIECE) where the reference trains them (TRAIN_WITH_CE).
Every setting is validated here, once, except the loss names, which the registry of
losses checks (training/losses.py: `check_methods`, called by the API, the job and the
trainer before any work). This module imports neither torch nor transformers, so a
config is checked before any heavy import or Ray start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Sequence

import pyarrow.fs

from tokdist_ray.errors import ConfigError

NEW_TOKEN_OUTPUT_LOSS = "KL-on-new-token-outputs"  # training/losses.py: NewTokenOutputKL
LR_SCHEDULES = ("constant", "linear")
BATCH_GROUPINGS = ("first_new_token", "random")
NEW_TOKEN_OUTPUT_POSITIONS = ("new_tokens", "all")
PRE_INIT_STRATEGIES = ("fvt", "adapti-vocab")
BASELINES = ("fvt", "adapti-vocab", "mean_embedding")  # what the evaluation compares Token Distillation with
STRATEGIES = ("auto", "ddp", "deepspeed")
ZERO_STAGES = (1, 2, 3)
CHECKPOINT_UPLOADS = ("async", "sync")
# the seed of the corpus read order (which snippets are mined) and of samples drawn from them
SNIPPET_SEED = 42


class OutputEmbeddingInit(str, Enum):
    """How an untied model's new output rows are set. Tied models reuse the input rows
    (unless `untie_word_embeddings`)."""

    ZERO = "zero"
    SUBTOKEN_MEAN = "subtoken_mean"
    TRAIN_WITH_CE = "train_with_ce"
    FIRST_PIECE = "first_piece"  # tokdist-ray: the first piece's output row, kept fixed


def output_emb_policy(value: OutputEmbeddingInit | str) -> OutputEmbeddingInit:
    try:
        return OutputEmbeddingInit(value)
    except ValueError:
        raise ConfigError(
            f"output_emb_policy must be one of {[p.value for p in OutputEmbeddingInit]}, got {value!r}"
        ) from None


def loss_methods(value: Sequence[str] | str) -> tuple[str, ...]:
    """The loss names as a tuple (one may be given as a bare string); training/losses.py
    checks them against its registry."""
    return (value,) if isinstance(value, str) else tuple(value)


def positive_number(name: str, value, optional: bool = False) -> None:
    """A finite number > 0 (or None when `optional`): inf and nan pass `<= 0` checks, and an
    infinite learning rate trains rows to nan."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        allowed = "a finite number > 0" + (" or None (no limit)" if optional else "")
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def has_lone_surrogate(text: str) -> bool:
    """Half of a surrogate pair alone (from a \\ud800-style escape, or a byte that is not
    UTF-8 in a command-line argument): no character, which no tokenizer or file takes."""
    return any("\ud800" <= c <= "\udfff" for c in text)


def count_at_least_one(name: str, value, optional: bool = False) -> None:
    """An int >= 1 (or None when `optional`, meaning no limit: 0 is refused, not read as none)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an int >= 1" + (" or None (no limit)" if optional else "")
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def corpus_paths(name: str, paths: str | Sequence[str]) -> list[str]:
    """Paths as a list; an empty string would expand to the current directory."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    for path in paths:
        if not isinstance(path, str) or not path.strip():
            raise ConfigError(f"{name}: {path!r} is not a path; name files, directories or globs (e.g. docs/*.txt)")
    return paths


def check_snippet_counts(snippet_len: int, snippets_per_token: int, min_snippets_per_token: int) -> None:
    for name, value in (("snippet_len", snippet_len), ("snippets_per_token", snippets_per_token),
                        ("min_snippets_per_token", min_snippets_per_token)):
        count_at_least_one(name, value)
    if min_snippets_per_token > snippets_per_token:
        raise ConfigError(
            f"min_snippets_per_token ({min_snippets_per_token}) is more than snippets_per_token "
            f"({snippets_per_token}), so every token would be skipped; lower it or raise snippets_per_token"
        )


def pre_init_strategy(value: str) -> str:
    if value not in PRE_INIT_STRATEGIES:
        raise ConfigError(f"pre_init_strategy must be one of {list(PRE_INIT_STRATEGIES)}, got {value!r}")
    return value


@dataclass
class DistillationConfig:
    epochs: int = 1
    batch_size: int = 1
    learning_rate: float = 1e-4
    # the reference's default is ("MSE-on-hiddens",); the output side lowers the bits per byte
    # an expansion costs at no further drift (bench/README.md, "Output-side distillation")
    loss_methods: Sequence[str] = ("MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS)
    seed: int = 42
    target_layer: int = -1
    mixed_precision: bool = True
    # --- tokdist-ray additions ---
    lr_schedule: str = "constant"  # "linear": linear warmup, then linear decay to zero
    warmup_ratio: float = 0.1  # share of all steps spent warming up under "linear"
    max_steps: int | None = None  # stop after this many optimizer steps (a compute budget)
    time_budget_s: float | None = None  # or after this much training wall time
    log_every: int = 10  # steps between progress lines
    # KL-on-new-token-outputs against the other losses; on the demo 0.4 gave the best bits
    # per byte with hidden-state drift within 3% of MSE-on-hiddens alone
    new_token_output_weight: float = 0.4
    # where KL-on-new-token-outputs counts: "new_tokens", the positions before one (the
    # teacher's phrase probability moves onto it); "all" adds the positions before an old
    # token, where the student is held to the teacher's zero mass on new tokens
    new_token_output_positions: str = "new_tokens"
    # "first_new_token": each batch holds snippets whose first new token sits at similar
    # positions, so the student reuses the teacher's states up to it; "random": plain shuffle
    batch_grouping: str = "first_new_token"
    # tied models: train and export separate output rows for the new tokens (the model is
    # saved untied, one more [vocab, d] table; its original rows are copied bit for bit)
    untie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        self.loss_methods = loss_methods(self.loss_methods)
        if self.new_token_output_positions not in NEW_TOKEN_OUTPUT_POSITIONS:
            raise ConfigError(f"new_token_output_positions must be one of {NEW_TOKEN_OUTPUT_POSITIONS}, "
                              f"got {self.new_token_output_positions!r}")
        if self.batch_grouping not in BATCH_GROUPINGS:
            raise ConfigError(f"batch_grouping must be one of {BATCH_GROUPINGS}, got {self.batch_grouping!r}")
        positive_number("new_token_output_weight", self.new_token_output_weight)
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        for name in ("epochs", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        positive_number("learning_rate", self.learning_rate)
        if self.learning_rate > 1:  # AdamW moves each element by about the learning rate per step
            raise ConfigError(f"learning_rate must be at most 1 (new rows train at 1e-4 to 1e-2), got {self.learning_rate}")
        positive_number("time_budget_s", self.time_budget_s, optional=True)
        count_at_least_one("max_steps", self.max_steps, optional=True)
        if isinstance(self.target_layer, bool) or not isinstance(self.target_layer, int):
            raise ConfigError(f"target_layer must be an int (-1: the last layer), got {self.target_layer!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class OutputFitConfig:
    """The new tokens' output rows fitted, after distillation, to text of the corpus: the
    expanded model's likelihood of that text in its own tokenisation, over the new rows
    alone (old rows, and the input rows just distilled, stay as they are). A tied model is
    exported untied: one more [vocab, d] table. Needs a corpus; generated snippets are not
    natural text (each is written around its token)."""

    enabled: bool = True
    # the fit reads corpus text, in 2,000-byte chunks spread over what mining read, until the
    # median new token occurs this often in it, or text_bytes at most: a handful of tokens
    # read little, a hundred French ones about 400 kB (half as much cost +1.2% bits per byte,
    # bench/README.md), thousands need text_bytes raised
    occurrences_per_token: int = 48
    text_bytes: int = 400_000
    # the fit also reads this many of each new token's snippets mined from the corpus (0:
    # none): windows of its text around the token, positions before the tokens that the text
    # has fewest of, at a cost that grows with the tokens, not the text
    snippets_per_token: int = 8
    # each window position's weight in the fit's loss against a position of the fit text:
    # windows hold their token wherever the text does not, so at full weight they can make
    # the rows over-predict it
    window_weight: float = 1.0
    # then each new token's cost in bits against the ids it saves, on text the fit held back
    # (training/token_value.py): with prune, tokens that cost more than
    # max_bits_per_saved_id bits per id they save are taken out of the tokenizer, with the
    # intermediates no kept token is built from (never used, they only take mass); bench/README.md
    # ("Tokens that do not pay") compares thresholds
    prune: bool = True
    max_bits_per_saved_id: float = 0.5
    # Adam moves every coordinate of a row by about the rate per step, however little the
    # text says about its token: at 1e-3 the rare tokens' rows stray (bench/README.md, "Where
    # the output fit stops": 5,000 tokens, +3.57% against +2.54% bits per byte at 3e-4)
    learning_rate: float = 3e-4
    max_steps: int = 2000  # Adam steps at most; it stops earlier once its held-back text stops improving
    batch_positions: int = 8192  # positions per step, over all workers
    # a step computes the new rows' logits at each of its positions: past this many logits
    # (beyond 5,000 new tokens) it computes those of the tokens its positions hold and of a
    # uniform draw of the others, their part of the normaliser scaled up, so its cost stops
    # growing with the vocabulary; the held-back check stays exact
    max_step_logits: int = 8192 * 5000

    def __post_init__(self) -> None:
        for name in ("enabled", "prune"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"output_fit.{name} must be true or false, got {getattr(self, name)!r}")
        if isinstance(self.snippets_per_token, bool) or not isinstance(self.snippets_per_token, int) \
                or self.snippets_per_token < 0:
            raise ConfigError(f"output_fit.snippets_per_token must be an int >= 0 (0: none), got {self.snippets_per_token!r}")
        for name in ("occurrences_per_token", "text_bytes", "max_steps", "batch_positions", "max_step_logits"):
            count_at_least_one(f"output_fit.{name}", getattr(self, name))
        positive_number("output_fit.learning_rate", self.learning_rate)
        positive_number("output_fit.window_weight", self.window_weight)
        if isinstance(self.max_bits_per_saved_id, bool) or not isinstance(self.max_bits_per_saved_id, (int, float)) \
                or not self.max_bits_per_saved_id >= 0:
            raise ConfigError("output_fit.max_bits_per_saved_id must be a number >= 0 (bits a token may cost per id it "
                              f"saves), got {self.max_bits_per_saved_id!r}")


PRUNING = ("prune", "max_bits_per_saved_id")  # OutputFitConfig's settings read after the fit, by stages.prune_tokens

GENERATION_BACKENDS = ("auto", "vllm", "transformers")


@dataclass
class GeneratedDataSource:
    """Snippets written by the model itself, starting from each new token's phrase."""

    # seeds each sample of the transformers backend (the same snippets whatever the
    # batching); vLLM engines draw a fresh seed each (data/generation/vllm_backend.py)
    seed: int = 42
    # --- tokdist-ray additions ---
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut, plain sampling
    batch_size: int = 64  # prompts per CPU decode batch; for vLLM a floor, raised to keep the engines full
    min_new_tokens: int = 8  # shorter samples (cut early at EOS) are dropped and counted; capped at snippet_len
    refill_rounds: int = 2  # extra rounds that replace dropped samples
    # Ray backends: spare samples per token in a pass, as a share of the samples it asks for,
    # so that the refill rounds settle without another pass (each pass starts the engines or
    # actors again). The transformers backend's snippets do not depend on it; 0 runs one
    # pass per round.
    overgenerate: float = 0.1
    # "auto": vLLM when it is installed and the cluster has GPUs, else transformers on CPU actors.
    # The in-process API path treats "auto" as "transformers" on the model it already holds.
    backend: str = "auto"
    # vLLM engine replicas (a fixed pool; None: one per tensor_parallel_size GPUs of the
    # cluster's nodes, counted at the start), or CPU generation actors (None: 1)
    concurrency: int | None = None
    num_cpus_per_actor: float = 1.0  # CPU backend: cores (torch threads) per actor
    dtype: str = "auto"  # weights dtype of the vLLM engines and of the CPU actors
    # vLLM engine settings
    tensor_parallel_size: int = 1  # GPUs per replica
    max_model_len: int | None = None  # None: snippet_len + 64, room for BOS and the phrase
    gpu_memory_utilization: float = 0.9
    accelerator_type: str | None = None  # e.g. "H100": pin replicas to one GPU type
    engine_kwargs: dict = field(default_factory=dict)  # any further vllm.EngineArgs

    def __post_init__(self) -> None:
        if self.backend not in GENERATION_BACKENDS:
            raise ConfigError(f"backend {self.backend!r} is not one of {GENERATION_BACKENDS}")
        positive_number("temperature", self.temperature)  # plain sampling is 1.0
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("batch_size", "concurrency", "tensor_parallel_size"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("top_k", "min_new_tokens", "refill_rounds"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        positive_number("num_cpus_per_actor", self.num_cpus_per_actor)
        if not 0.0 <= self.overgenerate <= 10.0:
            raise ConfigError(f"overgenerate must be in [0, 10] (a share of each token's samples), got {self.overgenerate}")


@dataclass
class HFDataSource:
    """A Hugging Face dataset, streamed."""

    dataset_path: str
    name: str | None = None
    split: str = "train"
    tokenization_batch_size: int = 16_000  # documents per tokenizer call of the in-process miner
    max_docs: int | None = 1_000_000
    revision: str | None = None
    trust_remote_code: bool = False
    map_to_text_fn: Callable | None = None
    # --- tokdist-ray additions ---
    text_column: str = "text"
    data_files: str | list[str] | None = None  # e.g. local files for a builder like "json"

    def __post_init__(self) -> None:
        if not isinstance(self.dataset_path, str) or not self.dataset_path.strip():
            raise ConfigError(f"dataset_path must name a dataset (e.g. HuggingFaceFW/fineweb-2), got {self.dataset_path!r}")
        count_at_least_one("max_docs", self.max_docs, optional=True)
        count_at_least_one("tokenization_batch_size", self.tokenization_batch_size)


@dataclass
class FileDataSource:
    """Local or remote files: .txt/.rst/.md (one document per file), .jsonl, .parquet.
    `paths` may hold globs."""

    paths: str | list[str] = field(default_factory=list)
    text_column: str = "text"
    max_docs: int | None = None

    def __post_init__(self) -> None:
        self.paths = corpus_paths("paths", self.paths)
        count_at_least_one("max_docs", self.max_docs, optional=True)


# the corpus sources by the name a job's `data.source` gives them (data/corpus/sources.py reads each)
CORPUS_SOURCES = {"files": FileDataSource, "hf": HFDataSource}
CorpusSource = FileDataSource | HFDataSource


@dataclass
class EvalConfig:
    """The held-out evaluation: drift at aligned positions, compression, bits per byte, generation."""

    heldout_paths: list[str] = field(default_factory=list)  # empty: no evaluation stage
    # the heuristics Token Distillation's rows are compared with, by every metric (fvt always:
    # the tables give ratios to it); each costs the metrics one more pass over the text
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    snippets_per_token: int = 20  # drift: held-out snippets per new token
    # drift: at most this many of those, a seeded sample (None: all). Every method reads
    # every snippet: for 30,000 new tokens x 20 snippets drift would take about a quarter
    # of the training's time; 20,000 take minutes for an 8B model on one GPU
    max_snippets: int | None = 20_000
    batch_size: int = 16
    bits_per_byte_bytes: int = 100_000  # held-out text scored for bits per byte (0: skip); by bytes, never tokens
    chunk_bytes: int = 2000  # bits per byte: the longest chunk (split at line breaks), each after a start token
    # bits per byte: also score these model directories (any HF causal LM whose tokenizer
    # extends the same original, e.g. made by another tool), on the same held-out chunks
    compare_models: list[str] = field(default_factory=list)
    # generation: the original and the expanded model each continue the same held-out
    # prompts for this many decode steps, greedy and sampled (0: skip)
    generation_steps: int = 64
    generation_prompts: int = 8
    generation_rounds: int = 3  # timed rounds of both models, the fastest counts (the least disturbed)
    prompt_bytes: int = 256  # each prompt's length, in bytes of held-out text
    # workers that share drift and bits per byte, each one GPU and one copy of the model:
    # "auto" one per GPU while each gets a few batches, one on the CPUs without GPUs; or a
    # number (at most the GPUs; on CPUs it splits the largest node's cores between them)
    num_workers: int | str = "auto"

    def __post_init__(self) -> None:
        if self.num_workers != "auto" and (isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int)
                                           or self.num_workers < 1):
            raise ConfigError(f"num_workers must be 'auto' or an int >= 1, got {self.num_workers!r}")
        self.heldout_paths = corpus_paths("heldout_paths", self.heldout_paths)
        if not isinstance(self.baselines, list) or "fvt" not in self.baselines or set(self.baselines) - set(BASELINES):
            raise ConfigError(f"eval.baselines must be a list of {list(BASELINES)} with 'fvt' in it (the tables "
                              f"compare with FVT), got {self.baselines!r}")
        self.compare_models = corpus_paths("compare_models", self.compare_models)
        for name in ("snippets_per_token", "batch_size", "chunk_bytes", "generation_prompts", "generation_rounds",
                     "prompt_bytes"):
            count_at_least_one(name, getattr(self, name))
        if self.generation_steps < 0:
            raise ConfigError(f"generation_steps must be >= 0 (0 skips generation), got {self.generation_steps}")
        count_at_least_one("max_snippets", self.max_snippets, optional=True)
        if self.bits_per_byte_bytes < 0:
            raise ConfigError(f"bits_per_byte_bytes must be >= 0 (0 skips bits per byte), got {self.bits_per_byte_bytes}")


@dataclass
class DistributedConfig:
    """How a distillation run is spread over Ray Train workers.

    The global batch is `DistillationConfig.batch_size` (per worker) x `num_workers`.
    `strategy="auto"` picks DDP when the frozen model fits a worker's memory and
    DeepSpeed ZeRO-3 otherwise. `zero_stage` applies to `strategy="deepspeed"` only
    (default 3). Checkpoints go to `storage_path` (local path or URI such as
    s3://bucket/dir; default: `<out_dir>.checkpoints` next to the output) under
    `run_name` every `checkpoint_every` steps and/or `checkpoint_every_s` seconds, and at
    the end, each worker writing its slice of the rows; `checkpoint_upload="async"` writes
    and uploads them while training goes on (the last one is always waited for). `resume=True` continues that run from its latest checkpoint.
    """

    num_workers: int = 1
    use_gpu: bool = False
    strategy: str = "auto"
    zero_stage: int | None = None
    checkpoint_every: int = 100  # steps; 0: only at the end
    checkpoint_every_s: float | None = None  # also once this many seconds passed since the last one
    checkpoint_upload: str = "async"  # "async": training goes on while it is written and uploaded; "sync": it waits
    storage_path: str | None = None
    storage_filesystem: pyarrow.fs.FileSystem | None = None
    run_name: str = "distill"
    resume: bool = False
    max_failures: int = 0  # worker-group restarts from the latest checkpoint; -1: unlimited
    keep_checkpoints: int = 2
    # "auto": 1 with GPUs or on a cluster with an autoscaler; else the most CPUs each at which
    # the nodes up hold every worker, as far as they are free: one worker on a 2-core machine gets both
    cpus_per_worker: float | str = "auto"
    worker_memory_gb: float | None = None  # for "auto"; probed on a worker when None
    deepspeed_config: dict | None = None  # merged over the generated DeepSpeed config

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"DistributedConfig.{name} must be {allowed}, got {getattr(self, name)!r}")

        if not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise bad("num_workers", "an int >= 1")
        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"one of {STRATEGIES}")
        if self.zero_stage is not None and self.zero_stage not in ZERO_STAGES:
            raise bad("zero_stage", f"one of {ZERO_STAGES} or None")
        if self.zero_stage is not None and self.strategy != "deepspeed":
            raise ConfigError(
                f"DistributedConfig.zero_stage={self.zero_stage} applies only to strategy='deepspeed', "
                f"not strategy={self.strategy!r}; leave it None"
            )
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise bad("checkpoint_every", "an int >= 0 (0: checkpoint only at the end)")
        positive_number("checkpoint_every_s", self.checkpoint_every_s, optional=True)
        if self.checkpoint_upload not in CHECKPOINT_UPLOADS:
            raise bad("checkpoint_upload", f"one of {CHECKPOINT_UPLOADS}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise bad("max_failures", "an int >= -1 (-1: unlimited restarts)")
        if not isinstance(self.keep_checkpoints, int) or self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", "an int >= 1")
        if not self.run_name or "/" in self.run_name:
            raise bad("run_name", "a non-empty name without '/'")
        if self.cpus_per_worker != "auto":
            if isinstance(self.cpus_per_worker, str):
                raise bad("cpus_per_worker", "'auto' or a finite number > 0")
            positive_number("cpus_per_worker", self.cpus_per_worker)
        positive_number("worker_memory_gb", self.worker_memory_gb, optional=True)
        # Ray Train takes a FileSystem object; anything else (a string from a YAML job) failed two stages on
        if self.storage_filesystem is not None and not isinstance(self.storage_filesystem, pyarrow.fs.FileSystem):
            raise ConfigError(
                f"DistributedConfig.storage_filesystem must be a pyarrow.fs.FileSystem object, got "
                f"{self.storage_filesystem!r}; to name remote storage by a string (as a job config must), set "
                "storage_path to a URI such as s3://bucket/dir and leave storage_filesystem out"
            )
        check_deepspeed_overrides(self.deepspeed_config)
        if self.storage_filesystem is not None and self.storage_path is None:
            raise ConfigError("DistributedConfig.storage_filesystem needs storage_path (a path on that filesystem)")


# DeepSpeed's precision modes; any of them on would make the new rows or their gradients 16-bit
_HALF_PRECISION_MODES = ("bf16", "bfloat16", "fp16")


def check_deepspeed_overrides(overrides: dict | None) -> None:
    """Overrides of the generated DeepSpeed config may not turn on a 16-bit mode: the engine
    runs in fp32 (training/strategies.deepspeed_config says why). Checked with the config,
    before Ray starts, not when a worker builds the engine."""
    sections = [(overrides or {}).get(mode) for mode in _HALF_PRECISION_MODES]
    turned_on = [mode for mode, section in zip(_HALF_PRECISION_MODES, sections)
                 if isinstance(section, dict) and section.get("enabled")]
    if turned_on:
        raise ConfigError(f"distributed.deepspeed_config turns on DeepSpeed's {turned_on[0]} mode, which would train "
                          "the new rows in 16 bits; leave it off: the model's weights are bf16 already wherever "
                          "mixed precision runs in bf16")
