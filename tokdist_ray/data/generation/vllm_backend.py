"""The vLLM backend of snippet generation: requests in, samples out, through `ray.data.llm`.

Checked against Ray 2.60's `ray.data.llm` (the `gpu` extra needs Ray >= 2.54: nested stage
configs came in 2.52, rows with `tokenized_prompt` and no `prompt` in 2.54):
  - a row reaches the engine as `tokenized_prompt` (token ids, so no tokenizer stage) and
    `sampling_params` (the keyword arguments of `vllm.SamplingParams`, one seed per row);
  - every input column is carried through to the postprocess step, which reads the
    engine's `generated_tokens`;
  - `vLLMEngineProcessorConfig(model_source, engine_kwargs, concurrency, batch_size, ...)`
    with the chat-template, tokenize and detokenize stages off. An int `concurrency` n is an
    autoscaling pool of 1..n engines for the vLLM stage; we pass (n, n), a fixed pool, with
    n = the cluster's GPUs per `tensor_parallel_size` unless set. Each replica asks Ray for
    `tensor_parallel_size` GPUs on one node, so replicas spread over the GPU nodes;
  - the engine resolves `model_source` where it runs: we swap the processor's engine UDF
    for a subclass that first turns the user's model name into this node's path
    (model_source.engine_model_path), so a bundled or GGUF model materialises on each GPU
    node and the driver's paths never reach them.
The functions here are plain (no vLLM import), so they are tested without a GPU; only the
engine actors that Ray starts import vLLM.
"""

from __future__ import annotations

import contextlib
import logging
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.model_source import engine_model_path
from tokdist_ray.data.generation.ray_backend import RAW_SAMPLE_SCHEMA, raw_sample
from tokdist_ray.data.generation.requests import GPU_EXTRA_HINT, cut_at_eos
from tokdist_ray.errors import BackendUnavailableError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("tokdist_ray")

# Request columns that travel through the engine to the postprocess step.
REQUEST_COLUMNS = ("token", "token_index", "sample_index", "seed", "prompt_ids", "phrase_start")
ENGINE_STAGE = "vLLMEngineStage"  # the name ray.data.llm's processor gives its engine stage


def sampling_params(source: GeneratedDataSource, snippet_len: int, stop: Sequence[int]) -> dict:
    """Plain sampling, as on the CPU backend: no penalties, EOS as the only stop."""
    return {
        "n": 1,
        "temperature": source.temperature,
        "top_p": source.top_p,
        "top_k": source.top_k or -1,  # -1 disables top-k in every vLLM release (0 only in newer ones)
        "max_tokens": snippet_len,
        "stop_token_ids": list(stop),
        "detokenize": False,
    }


def vllm_request(request: dict, params: dict) -> dict:
    """The columns the engine stage reads, added to a request row."""
    return {"tokenized_prompt": [int(i) for i in request["prompt_ids"]],
            "sampling_params": {**params, "seed": int(request["seed"])}}


def vllm_sample(row: dict, stop: Sequence[int], min_new_tokens: int) -> dict:
    """A request row back as a sample (ray_backend.RAW_SAMPLE_SCHEMA): the generated ids up
    to the first stop id (vLLM may keep the stop id itself in `generated_tokens`)."""
    return raw_sample(row, cut_at_eos(row["generated_tokens"], stop), min_new_tokens)


def engine_kwargs(source: GeneratedDataSource) -> dict:
    kwargs = {
        "tensor_parallel_size": source.tensor_parallel_size,
        "dtype": source.dtype,
        "gpu_memory_utilization": source.gpu_memory_utilization,
    }
    if source.max_model_len is not None:
        kwargs["max_model_len"] = source.max_model_len
    return {**kwargs, **source.engine_kwargs}


def engine_replicas(source: GeneratedDataSource) -> int:
    """`source.concurrency`, or as many replicas as the cluster's nodes hold: per node, its
    GPUs (of `accelerator_type`, if set) divided by `tensor_parallel_size`; at least 1. An
    autoscaling cluster whose GPU nodes are not up yet counts none: set concurrency there."""
    if source.concurrency is not None:
        return int(source.concurrency)
    import ray

    wanted = f"accelerator_type:{source.accelerator_type}" if source.accelerator_type else None
    per_node = [int(node["Resources"].get("GPU", 0)) // source.tensor_parallel_size
                for node in ray.nodes() if node.get("Alive") and (wanted is None or wanted in node["Resources"])]
    replicas = max(1, sum(per_node))
    log.info("vLLM: %d engine replica(s) of %d GPU(s) each (generation.concurrency sets another number)",
             replicas, source.tensor_parallel_size)
    return replicas


def processor_config(model_path: str, source: GeneratedDataSource, replicas: int):
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=str(model_path),  # the user's name: each engine resolves it on its node
        engine_kwargs=engine_kwargs(source),
        concurrency=(replicas, replicas),  # a fixed pool: an int would be an autoscaling 1..n
        batch_size=source.batch_size,
        accelerator_type=source.accelerator_type,
        chat_template_stage=False,  # prompts are token ids already
        tokenize_stage=False,
        detokenize_stage=False,  # snippets are ids; text is never needed
    )


def on_engine_node(engine_udf: type) -> type:
    """`engine_udf` (the processor's engine class) with its `model` resolved on the node that
    constructs it, before the engine loads it."""

    class NodeModelEngine(engine_udf):
        def __init__(self, *args, model: str, **kwargs):
            super().__init__(*args, model=engine_model_path(model), **kwargs)

    NodeModelEngine.__name__ = NodeModelEngine.__qualname__ = engine_udf.__name__  # Ray Data names the operator so
    return NodeModelEngine


def resolve_model_on_engine_nodes(processor) -> None:
    try:
        stage = processor.get_stage_by_name(ENGINE_STAGE)
    except (AttributeError, ValueError) as e:
        raise BackendUnavailableError(f"this ray.data.llm builds no {ENGINE_STAGE} stage ({e}); "
                                      f"tokdist-ray needs the one of Ray 2.54 to 2.60: {GPU_EXTRA_HINT}") from e
    stage.fn = on_engine_node(stage.fn)


@contextlib.contextmanager
def _quiet_driver_config_lookup():
    """build_processor reads the model's config on the driver for Ray's usage telemetry and
    warns when the name is not a hub id or a local directory there (bundled:, .gguf, a path
    only the GPU nodes have); nothing depends on it."""
    logger = logging.getLogger("ray.llm._internal.batch.processor.vllm_engine_proc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def vllm_stage(model_path: str, source: GeneratedDataSource, snippet_len: int, stop: Sequence[int],
               replicas: int) -> Callable[["ray.data.Dataset"], "ray.data.Dataset"]:
    """requests -> samples (ray_backend.RAW_SAMPLE_SCHEMA), short ones flagged."""
    try:
        from ray.data.llm import build_processor
    except ImportError as e:
        raise BackendUnavailableError(f"ray.data.llm does not import ({e}): {GPU_EXTRA_HINT}") from e

    with _quiet_driver_config_lookup():
        processor = build_processor(
            processor_config(model_path, source, replicas),
            preprocess=partial(vllm_request, params=sampling_params(source, snippet_len, stop)),
            postprocess=partial(vllm_sample, stop=list(stop), min_new_tokens=source.min_new_tokens),
        )
    resolve_model_on_engine_nodes(processor)

    def apply(requests: "ray.data.Dataset") -> "ray.data.Dataset":
        return processor(requests).map_batches(
            lambda batch: batch.select(RAW_SAMPLE_SCHEMA.names).cast(RAW_SAMPLE_SCHEMA), batch_format="pyarrow")

    return apply
