"""The vllm package as tests/fake_vllm.py fakes it: what Ray's vLLM stage imports, where it
imports it from (vLLM >= 0.19's places, which Ray 2.60 tries first)."""

import sys
from types import ModuleType

from tests import fake_vllm
from tests.fake_vllm import AsyncEngineArgs, SamplingParams  # noqa: F401
from tests.fake_vllm import AsyncLLM as AsyncLLMEngine  # noqa: F401  (vLLM v1's alias)


def _module(name: str, **names) -> ModuleType:
    module = sys.modules[name] = ModuleType(name)
    module.__dict__.update(names)
    return module


outputs = _module("vllm.outputs", RequestOutput=fake_vllm.RequestOutput)
_module("vllm.inputs.llm", TokensPrompt=fake_vllm.TokensPrompt, TextPrompt=fake_vllm.TextPrompt)
_module("vllm.v1.metrics.ray_wrappers", RayPrometheusStatLogger=fake_vllm.RayPrometheusStatLogger)
