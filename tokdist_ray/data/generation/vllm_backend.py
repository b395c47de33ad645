"""The vLLM backend of snippet generation: requests in, samples out, through `ray.data.llm`.

Checked against Ray 2.60's `ray.data.llm` and vLLM's `SamplingParams`:
  - a row reaches the engine as `tokenized_prompt` (token ids, so no tokenizer stage) and
    `sampling_params` (the keyword arguments of `vllm.SamplingParams`, one seed per row);
  - every input column is carried through to the postprocess step, which reads the
    engine's `generated_tokens`;
  - `vLLMEngineProcessorConfig(model_source, engine_kwargs, concurrency, batch_size, ...)`
    with the chat-template, tokenize and detokenize stages off; each of `concurrency`
    replicas asks Ray for `tensor_parallel_size` GPUs, so replicas spread over GPU nodes.
The functions here are plain (no vLLM import), so they are tested without a GPU; only the
engine actors that Ray starts import vLLM.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Callable, Sequence

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.requests import GPU_EXTRA_HINT, cut_at_eos, sample_table
from tokdist_ray.errors import BackendUnavailableError

if TYPE_CHECKING:
    import ray.data

# Request columns that travel through the engine to the postprocess step.
REQUEST_COLUMNS = ("token", "token_index", "sample_index", "seed", "prompt_ids", "phrase_start")


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


def vllm_sample(row: dict, stop: Sequence[int]) -> dict:
    """A request row back, with its `continuation`: the generated ids up to the first stop id
    (vLLM may keep the stop id itself in `generated_tokens`)."""
    sample = {name: row[name] for name in REQUEST_COLUMNS}
    sample["prompt_ids"] = [int(i) for i in row["prompt_ids"]]
    sample["continuation"] = cut_at_eos(row["generated_tokens"], stop)
    return sample


def engine_kwargs(source: GeneratedDataSource) -> dict:
    kwargs = {
        "tensor_parallel_size": source.tensor_parallel_size,
        "dtype": source.dtype,
        "gpu_memory_utilization": source.gpu_memory_utilization,
    }
    if source.max_model_len is not None:
        kwargs["max_model_len"] = source.max_model_len
    return {**kwargs, **source.engine_kwargs}


def processor_config(model_dir: str, source: GeneratedDataSource):
    from ray.data.llm import vLLMEngineProcessorConfig

    return vLLMEngineProcessorConfig(
        model_source=model_dir,
        engine_kwargs=engine_kwargs(source),
        concurrency=source.concurrency,
        batch_size=source.batch_size,
        accelerator_type=source.accelerator_type,
        chat_template_stage=False,  # prompts are token ids already
        tokenize_stage=False,
        detokenize_stage=False,  # snippets are ids; text is never needed
    )


def vllm_stage(
    model_dir: str, source: GeneratedDataSource, snippet_len: int, stop: Sequence[int]
) -> Callable[["ray.data.Dataset"], "ray.data.Dataset"]:
    """requests -> sample rows (SAMPLE_SCHEMA), too-short samples dropped."""
    try:
        from ray.data.llm import build_processor
    except ImportError as e:
        raise BackendUnavailableError(f"ray.data.llm does not import ({e}): {GPU_EXTRA_HINT}") from e

    processor = build_processor(
        processor_config(model_dir, source),
        preprocess=partial(vllm_request, params=sampling_params(source, snippet_len, stop)),
        postprocess=partial(vllm_sample, stop=list(stop)),
    )

    def apply(requests: "ray.data.Dataset") -> "ray.data.Dataset":
        return processor(requests).map_batches(
            lambda batch: sample_table(batch.to_pylist(), source.min_new_tokens), batch_format="pyarrow"
        )

    return apply
