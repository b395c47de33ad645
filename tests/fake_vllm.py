"""vLLM faked at its engine, under Ray's own vLLM stage, for tests without a GPU or vLLM.

Ray's `build_processor(vLLMEngineProcessorConfig)` runs as it is: its driver-side model
lookup, the preprocess and postprocess wrapping, the engine stage's input checks, its engine
wrapper (`vllm.AsyncEngineArgs` -> `AsyncLLMEngine.from_engine_args`), its request building
(`tokenized_prompt` -> `TokensPrompt`, `sampling_params` -> `SamplingParams`) and its output
rows. What that stage imports from vllm is this module's classes, through the `vllm` package
in fake_vllm_site/ that only the engine actors find (`processor_config_here` puts it on their
PYTHONPATH), as vLLM sits on the GPU nodes and not necessarily on the driver.

The engine (AsyncLLM), as vllm_backend configures vLLM's:
  - loads the model it is given (reads its config.json), so a name left unresolved on the
    engine's node fails as vLLM would; refuses a max_model_len beyond the model's positions
    and prompts that fill max_model_len;
  - draws every request from one stream seeded by its `seed` engine argument, in the order
    requests reach it (one seed per engine start, so no two runs draw alike); a request
    with a seed of its own fails (vLLM samples those one by one);
  - ends a sample in a stop id, kept in token_ids as vLLM keeps it; about one sample in
    three stops before two ids, so refill rounds have work;
  - records its start and every sample under record_to (engine_starts, generated).

    monkeypatch.setattr(vllm_backend, "processor_config", processor_config_here(vllm_backend.processor_config, d))
    monkeypatch.setattr(vllm_backend, "vllm_sample", partial(recorded, vllm_backend.vllm_sample, record_to=d))
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional, TypedDict

import numpy as np

SITE = Path(__file__).resolve().parent / "fake_vllm_site"  # holds the `vllm` package
REPO_ROOT = Path(__file__).resolve().parents[1]
RECORD = "FAKE_VLLM_RECORD"  # the engines' record directory, in their environment
LOW_ID = 3  # the tiny tokenizers' special tokens sit below
BUILT: list = []  # the processor configs built, newest last


# --- what Ray's vLLM stage imports from vllm ----------------------------------------------------


@dataclass(kw_only=True)
class SamplingParams:
    """The keywords tokdist-ray sends, and Ray's `structured_outputs`; any other fails, as
    an unknown keyword fails vllm.SamplingParams."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: Optional[int] = 16
    stop_token_ids: Optional[list] = None
    detokenize: bool = True
    seed: Optional[int] = None
    structured_outputs: object = None

    def __post_init__(self):  # vLLM's own checks of these
        if self.n != 1 or not 0.0 < self.top_p <= 1.0 or self.top_k < -1 or self.max_tokens < 1:
            raise ValueError(f"invalid sampling parameters {self}")


class TokensPrompt(TypedDict, total=False):
    prompt_token_ids: list
    multi_modal_data: object
    mm_processor_kwargs: object
    multi_modal_uuids: object


class TextPrompt(TypedDict, total=False):  # imported beside TokensPrompt; never sent
    prompt: str


@dataclass
class CompletionOutput:
    token_ids: list
    text: str = ""
    logprobs: object = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    outputs: list
    finished: bool
    prompt_logprobs: object = None
    metrics: object = None


class RayPrometheusStatLogger:  # Ray hands it to the engine, which logs nothing here
    pass


@dataclass(kw_only=True)
class AsyncEngineArgs:
    """The engine arguments tokdist-ray and Ray's stage pass; any other fails, as an unknown
    keyword fails vllm.AsyncEngineArgs."""

    model: str
    seed: int = 0
    dtype: str = "auto"
    max_model_len: Optional[int] = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    distributed_executor_backend: Optional[str] = None
    runner: str = "auto"
    enable_log_requests: bool = False

    def create_engine_config(self):
        """Reads the model's config.json (a missing model fails here, as in vLLM) and checks
        the sizes as vLLM does."""
        model = json.loads((Path(self.model) / "config.json").read_text())
        positions = int(model["max_position_embeddings"])
        if self.max_model_len is not None and self.max_model_len > positions:
            raise ValueError(f"max_model_len ({self.max_model_len}) is greater than the model's {positions}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs})")
        return SimpleNamespace(model_config=SimpleNamespace(vocab_size=int(model["vocab_size"]),
                                                            max_model_len=self.max_model_len or positions),
                               scheduler_config=SimpleNamespace(max_num_seqs=self.max_num_seqs),
                               parallel_config=SimpleNamespace(pipeline_parallel_size=1))


class AsyncLLM:
    def __init__(self, args: AsyncEngineArgs):
        config = args.create_engine_config().model_config
        self.vocab_size, self.max_model_len = config.vocab_size, config.max_model_len
        self.stream = np.random.default_rng(args.seed)
        self.record, self.name = Path(os.environ[RECORD]), uuid.uuid4().hex
        start = {"model": args.model, "seed": args.seed, "pid": os.getpid()}
        (self.record / f"{self.name}.start.json").write_text(json.dumps(start))

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, stat_loggers=None) -> "AsyncLLM":
        return cls(engine_args)

    async def generate(self, request_id: str, prompt: TokensPrompt, sampling_params: SamplingParams,
                       lora_request=None):
        if sampling_params.seed is not None:
            raise ValueError("a request with a seed of its own: vLLM samples those one by one")
        prompt_ids = [int(i) for i in prompt["prompt_token_ids"]]
        if len(prompt_ids) >= self.max_model_len:
            raise ValueError(f"the prompt ({len(prompt_ids)} ids) leaves no room in max_model_len {self.max_model_len}")
        await asyncio.sleep(0)  # the batch's other requests come in meanwhile, as into vLLM's scheduler
        ids = self.draw(min(sampling_params.max_tokens, self.max_model_len - len(prompt_ids)),
                        list(sampling_params.stop_token_ids or []))
        with (self.record / f"{self.name}.samples.jsonl").open("a") as record:
            record.write(json.dumps({"prompt": prompt_ids, "generated": ids}) + "\n")
        yield RequestOutput(request_id, None, prompt_ids, [CompletionOutput(ids)], finished=True)

    def draw(self, max_tokens: int, stops: list[int]) -> list[int]:
        length = int(self.stream.integers(0, 2)) if self.stream.random() < 1 / 3 else max_tokens
        ids = [int(i) for i in self.stream.integers(LOW_ID, self.vocab_size, size=length)]
        for position, token in enumerate(ids):
            if token in stops:
                return ids[: position + 1]
        return ids + stops[:1] if length < max_tokens else ids

    async def do_log_stats(self):
        pass

    def shutdown(self):
        pass


# --- for the tests --------------------------------------------------------------------------


def processor_config_here(processor_config: Callable, record_to: str) -> Callable:
    """vllm_backend.processor_config for the test Ray (no GPUs): Ray's stage asks for half a
    CPU per engine instead of a GPU (so two engines and the pipeline fit 2 CPUs), and its
    engines find the fake vllm package and record to `record_to`."""

    def config(*args, **kwargs):
        built = processor_config(*args, **kwargs)
        built.placement_group_config = {"bundles": [{"CPU": 0.5}]}
        pythonpath = os.pathsep.join(p for p in (str(SITE), str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        built.runtime_env = {"env_vars": {"PYTHONPATH": pythonpath, RECORD: str(record_to)}}
        BUILT.append(built)
        return built

    return config


def recorded(sample: Callable, row: dict, *, record_to: str, **kwargs) -> dict:
    """vllm_backend.vllm_sample (`sample`), recording which sample each engine output became:
    `partial(recorded, vllm_sample, record_to=...)` stands in for it."""
    seen = {"token_index": int(row["token_index"]), "sample_index": int(row["sample_index"]),
            "prompt": [int(i) for i in row["prompt_ids"]], "generated": [int(i) for i in row["generated_tokens"]]}
    with Path(record_to, f"rows-{os.getpid()}.jsonl").open("a") as record:
        record.write(json.dumps(seen) + "\n")
    return sample(row, **kwargs)


def engine_starts(record_to) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(record_to).glob("*.start.json"))]


def generated(record_to) -> dict[tuple[int, int], list[int]]:
    """(token index, sample index) -> the ids an engine generated for that sample; every
    sample the engines drew reached exactly one row of its prompt."""
    def lines(pattern):
        return [json.loads(line) for p in sorted(Path(record_to).glob(pattern)) for line in p.read_text().splitlines()]

    rows, drawn = lines("rows-*.jsonl"), lines("*.samples.jsonl")
    samples = {(r["token_index"], r["sample_index"]): r["generated"] for r in rows}
    assert len(samples) == len(rows), "a sample came out twice"
    assert (Counter((tuple(r["prompt"]), tuple(r["generated"])) for r in rows)
            == Counter((tuple(s["prompt"]), tuple(s["generated"])) for s in drawn))
    return samples
