"""The vLLM backend of snippet generation: requests in, samples out, through `ray.data.llm`.

Checked against Ray 2.60's `ray.data.llm` (the `gpu` extra needs Ray >= 2.54: nested stage
configs came in 2.52, rows with `tokenized_prompt` and no `prompt` in 2.54):
  - a row reaches the engine as `tokenized_prompt` (token ids, so no tokenizer stage) and
    `sampling_params` (the keyword arguments of `vllm.SamplingParams`, the same for every row);
  - every input column is carried through to the postprocess step, which reads the
    engine's `generated_tokens`;
  - `vLLMEngineProcessorConfig(model_source, engine_kwargs, concurrency, batch_size,
    max_concurrent_batches, ...)` with the chat-template, tokenize and detokenize stages
    off. `engine_kwargs` go to `vllm.AsyncEngineArgs` in each engine actor; `batch_size`
    rows make one call of the engine stage, and each engine takes `max_concurrent_batches`
    calls at once. An int `concurrency` n is an autoscaling pool of 1..n engines; we pass
    (n, n), a fixed pool, with n = the cluster's GPUs per `tensor_parallel_size` unless
    set. Each replica asks Ray for `tensor_parallel_size` GPUs on one node, so replicas
    spread over the GPU nodes;
  - Ray's processor reads the model's config on the driver too (for its usage telemetry),
    from `model_source`: it gets the model as the driver resolved it
    (model_source.ray_model_source), which Ray reads as any local directory or hub id (under
    the user's name it would read a .gguf file whole as JSON);
  - the engines resolve the user's name where they run: we swap the processor's engine UDF
    for a subclass that hands Ray's engine the user's model name as this node resolves it
    (model_source.engine_model_path), so a bundled or GGUF model materialises on each GPU
    node and the driver's paths never reach them. Ray's engine then passes a local path
    through (download_model_files) and downloads an s3:// or gs:// one to the node.

Engines sized for snippets (engine_settings): a snippet is BOS, the phrase and
`snippet_len` generated ids, so `max_model_len` is that plus a margin for the prompt
(vLLM would otherwise size every engine for the model's whole context, 128k ids for
Llama 3.1, and refuse to start where one such sequence's KV cache does not fit). Short
sequences let an engine decode many at once (`max_num_seqs`), and the processor's batches
are sized so that the engine always has that many in hand (processor_batch_size).

Seeds and reproducibility. A request carries no seed: vLLM samples the requests that have
their own seed one by one (and off its fast top-k/top-p kernels), and a snippet needs no
stream of its own. Instead each engine gets one seed when it starts (`engine_seed`), fresh
for every engine and every pass (each pass starts its engines), so no two engines repeat
each other's draws (vLLM's default seed, 0 for every engine, would: samples of one phrase
on two engines, or in two passes, would come out alike).
  - Reproducible, for the same config, tokens, model and vLLM version: the requests (which
    samples of which tokens, their prompts, in which pass), the sampling settings, which
    samples are kept, and the order of the snippets given the samples.
  - Not reproducible: the generated ids. An engine draws for all its requests from one
    stream, in the order its scheduler batches them, and ray.data.llm hands it several
    batches at once from asyncio, so the draw a request gets depends on timing, replicas
    and passes; and the seeds are new every run. Two runs give different snippets from
    the same distribution. (vLLM itself promises repeatable output only offline, with
    VLLM_ENABLE_V1_MULTIPROCESSING=0 or batch invariance, on the same hardware and
    version: docs.vllm.ai, "Reproducibility".)
The transformers backend keeps a seed per sample (requests.sample_seed): the same seed,
model and settings give the same snippets whatever the batching, actors or passes.

The functions here are plain (no vLLM import), so they are tested without a GPU; only the
engine actors that Ray starts import vLLM.
"""

from __future__ import annotations

import contextlib
import logging
import math
import secrets
from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.model_source import engine_model_path, ray_model_source
from tokdist_ray.data.generation.requests import GPU_EXTRA_HINT, RAW_SAMPLE_SCHEMA, cut_at_eos, raw_sample
from tokdist_ray.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("tokdist_ray")

ENGINE_STAGE = "vLLMEngineStage"  # the name ray.data.llm's processor gives its engine stage
# Room for a prompt (BOS and the new token's original pieces; a new token is rarely more
# than 20). A longer one fails its request, saying to set generation.max_model_len.
PROMPT_IDS = 64
# Sequences an engine decodes at once: vLLM's own offline default on GPUs of 70 GB or more,
# set so that every GPU kind and engine gets it (vLLM's defaults depend on both). Long
# snippets get fewer, so that all of them together hold at most KV_TOKENS ids of KV cache, a
# 128k-context sequence's worth: past what the cache holds, vLLM preempts sequences and
# computes them again.
MAX_SEQUENCES = 1024
KV_TOKENS = 128 * 1024
# Ids one engine step may compute, per sequence decoding: vLLM's offline ratio on large GPUs
# (16,384 per 1,024 sequences), room for the prompts of the sequences that join a step.
STEP_IDS_PER_SEQUENCE = 16
# Batches an engine works on at once (Ray's default, named because batch sizes follow from
# it): while one batch's last sequences finish, the others keep the engine full.
BATCHES_IN_FLIGHT = 8


def sampling_params(source: GeneratedDataSource, snippet_len: int, stop: Sequence[int]) -> dict:
    """Plain sampling, as on the CPU backend: no penalties, EOS as the only stop, no seed of
    its own (the engine's seed draws for every request: the module docstring)."""
    return {
        "n": 1,
        "temperature": source.temperature,
        "top_p": source.top_p,
        "top_k": source.top_k or -1,  # -1 disables top-k in every vLLM release (0 only in newer ones)
        "max_tokens": snippet_len,
        "stop_token_ids": list(stop),
        "detokenize": False,
    }


def vllm_request(request: dict, params: dict, max_model_len: int) -> dict:
    """The columns the engine stage reads, added to a request row. A prompt that leaves no
    room for the snippet fails here: vLLM would cut the sample short at max_model_len."""
    prompt = [int(i) for i in request["prompt_ids"]]
    if len(prompt) + params["max_tokens"] > max_model_len:
        raise ConfigError(
            f"the prompt of {request['token']!r} is {len(prompt)} ids, and with {params['max_tokens']} generated "
            f"ids it does not fit the vLLM engines' max_model_len of {max_model_len}: set generation.max_model_len "
            f"to at least {len(prompt) + params['max_tokens']}")
    return {"tokenized_prompt": prompt, "sampling_params": params}


def vllm_sample(row: dict, stop: Sequence[int], min_new_tokens: int) -> dict:
    """A request row back as a sample (requests.RAW_SAMPLE_SCHEMA): the generated ids up
    to the first stop id (vLLM may keep the stop id itself in `generated_tokens`)."""
    return raw_sample(row, cut_at_eos(row["generated_tokens"], stop), min_new_tokens)


def engine_settings(snippet_len: int) -> dict:
    """vLLM engine arguments sized for snippets of `snippet_len` generated ids."""
    max_model_len = snippet_len + PROMPT_IDS
    sequences = max(1, min(MAX_SEQUENCES, KV_TOKENS // max_model_len))
    return {"max_model_len": max_model_len, "max_num_seqs": sequences,
            "max_num_batched_tokens": sequences * STEP_IDS_PER_SEQUENCE}


def engine_kwargs(source: GeneratedDataSource, snippet_len: int) -> dict:
    """The engines' arguments: the source's settings over engine_settings, its
    `max_model_len` and `engine_kwargs` over those. Each engine adds its own seed
    (on_engine_node), in place of any given here."""
    kwargs = {
        **engine_settings(snippet_len),
        "tensor_parallel_size": source.tensor_parallel_size,
        "dtype": source.dtype,
        "gpu_memory_utilization": source.gpu_memory_utilization,
    }
    if source.max_model_len is not None:
        kwargs["max_model_len"] = source.max_model_len
    return {**kwargs, **source.engine_kwargs}


def processor_batch_size(source: GeneratedDataSource, max_num_seqs: int) -> int:
    """Rows per call of the engine stage: enough that the engine's BATCHES_IN_FLIGHT calls
    hold twice the sequences it decodes at once (Ray warns below once), so it stays full
    while each batch's last sequences finish; `source.batch_size` if larger."""
    return max(source.batch_size, math.ceil(2 * max_num_seqs / BATCHES_IN_FLIGHT))


def processor_config(model_source: str, source: GeneratedDataSource, replicas: int, snippet_len: int):
    """Ray's processor config; `model_source` is for Ray's driver-side lookup alone
    (ray_model_source): the engines resolve the user's name themselves (on_engine_node)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    kwargs = engine_kwargs(source, snippet_len)
    return vLLMEngineProcessorConfig(
        model_source=str(model_source),
        engine_kwargs=kwargs,
        concurrency=(replicas, replicas),  # a fixed pool: an int would be an autoscaling 1..n
        batch_size=processor_batch_size(source, int(kwargs["max_num_seqs"])),
        max_concurrent_batches=BATCHES_IN_FLIGHT,
        accelerator_type=source.accelerator_type,
        chat_template_stage=False,  # prompts are token ids already
        tokenize_stage=False,
        detokenize_stage=False,  # snippets are ids; text is never needed
    )


def engine_seed() -> int:
    """A fresh seed for one engine start; below 2**32, as numpy's global seed must be."""
    return secrets.randbits(32)


def on_engine_node(engine_udf: type, model_path: str) -> type:
    """`engine_udf` (the processor's engine class) loading `model_path` (the user's name) as
    the node that constructs it resolves it, in place of the driver's `model`, with a seed of
    its own (engine_seed)."""

    class NodeModelEngine(engine_udf):
        def __init__(self, *args, model: str, engine_kwargs: dict, **kwargs):
            seeded = {**engine_kwargs, "seed": engine_seed()}  # a copy: Ray Data keys the actor by its kwargs
            log.info("vLLM engine seed %d", seeded["seed"])
            super().__init__(*args, model=engine_model_path(model_path), engine_kwargs=seeded, **kwargs)

    NodeModelEngine.__name__ = NodeModelEngine.__qualname__ = engine_udf.__name__  # Ray Data names the operator so
    return NodeModelEngine


def prepare_engines_on_their_nodes(processor, model_path: str) -> None:
    try:
        stage = processor.get_stage_by_name(ENGINE_STAGE)
    except (AttributeError, ValueError) as e:
        raise BackendUnavailableError(f"this ray.data.llm builds no {ENGINE_STAGE} stage ({e}); "
                                      f"tokdist-ray needs the one of Ray 2.54 to 2.60: {GPU_EXTRA_HINT}") from e
    # A copy with our class, not `stage.fn = ...`: the stage validates assignments, which re-runs its
    # post_init, and that derives the stage's resources anew from constructor kwargs the first run
    # consumed (a placement_group_config's bundles gave way to one GPU per engine).
    processor.stages[ENGINE_STAGE] = stage.model_copy(update={"fn": on_engine_node(stage.fn, model_path)})


@contextlib.contextmanager
def _quiet_driver_config_lookup():
    """build_processor reads the model's config on the driver for Ray's usage telemetry and
    warns where it cannot (a path only the GPU nodes have, a hub id this driver cannot
    reach: ray_model_source); nothing depends on it."""
    logger = logging.getLogger("ray.llm._internal.batch.processor.vllm_engine_proc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def vllm_stage(model_path: str, source: GeneratedDataSource, snippet_len: int, stop: Sequence[int],
               replicas: int) -> Callable[["ray.data.Dataset"], "ray.data.Dataset"]:
    """requests -> samples (requests.RAW_SAMPLE_SCHEMA), short ones flagged."""
    try:
        from ray.data.llm import build_processor
    except ImportError as e:
        raise BackendUnavailableError(f"ray.data.llm does not import ({e}): {GPU_EXTRA_HINT}") from e

    config = processor_config(ray_model_source(model_path), source, replicas, snippet_len)
    with _quiet_driver_config_lookup():
        processor = build_processor(
            config,
            preprocess=partial(vllm_request, params=sampling_params(source, snippet_len, stop),
                               max_model_len=int(config.engine_kwargs["max_model_len"])),
            postprocess=partial(vllm_sample, stop=list(stop), min_new_tokens=source.min_new_tokens),
        )
    prepare_engines_on_their_nodes(processor, model_path)

    def apply(requests: "ray.data.Dataset") -> "ray.data.Dataset":
        return processor(requests).map_batches(
            lambda batch: batch.select(RAW_SAMPLE_SCHEMA.names).cast(RAW_SAMPLE_SCHEMA), batch_format="pyarrow")

    return apply
