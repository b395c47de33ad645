"""A stand-in for vLLM behind ray.data.llm, for tests without a GPU or vLLM.

`fake_build_processor` replaces `ray.data.llm.build_processor`: it builds ray.data.llm's own
`Processor` (its preprocess and postprocess wrapping, the carried columns, the engine stage
run as a Ray Data actor pool sized by `config.get_concurrency` as the real builder sizes
it), with only the engine itself fake. The fake engine

  - loads the model it is given (reads its config.json), so a name left unresolved on the
    engine's node fails as vLLM would;
  - takes each row's `tokenized_prompt` and `sampling_params` (only keys vllm.SamplingParams
    has) and returns `generated_tokens`: ids drawn from the row's seed and prompt alone
    (`fake_continuation`), ending in a stop id as vLLM's do; about one sample in three stops
    before two ids, so refill rounds have work;
  - records each start (engine_kwargs["fake_engine_log"]: a directory), so tests can count
    how often the engines start.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Type

import numpy as np
from ray.llm._internal.batch.processor.base import Processor
from ray.llm._internal.batch.stages.base import StatefulStage, StatefulStageUDF

SAMPLING_KEYS = {"n", "temperature", "top_p", "top_k", "max_tokens", "stop_token_ids", "detokenize", "seed"}
LOW_ID = 3  # the tiny tokenizers' special tokens sit below
BUILT: list = []  # the processor configs built, newest last


def fake_continuation(prompt_ids, params: dict, vocab_size: int) -> list[int]:
    """What the fake engine generates for a prompt: a function of the seed and prompt alone."""
    rng = np.random.default_rng([int(params["seed"]) % 2**63, *(int(i) for i in prompt_ids)])
    stops = [int(s) for s in params["stop_token_ids"]]
    length = int(rng.integers(0, 2)) if rng.random() < 1 / 3 else int(params["max_tokens"])
    ids = [int(i) for i in rng.integers(LOW_ID, vocab_size, size=length)]
    for position, token in enumerate(ids):
        if token in stops:
            return ids[: position + 1]
    return ids + stops[:1] if length < int(params["max_tokens"]) else ids


class FakeEngineUDF(StatefulStageUDF):
    def __init__(self, data_column: str, expected_input_keys: List[str], batch_size: int, max_concurrent_batches: int,
                 model: str, engine_kwargs: Dict[str, Any], **_):
        super().__init__(data_column, expected_input_keys)
        self.vocab_size = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
        if log := engine_kwargs.get("fake_engine_log"):
            Path(log, f"{uuid.uuid4().hex}.json").write_text(json.dumps({"model": model, "pid": os.getpid()}))

    async def udf(self, batch: List[Dict[str, Any]]) -> AsyncIterator[Dict[str, Any]]:
        for row in batch:
            params = dict(row["sampling_params"])
            unknown = set(params) - SAMPLING_KEYS
            assert not unknown, f"vllm.SamplingParams takes no {unknown}"
            ids = fake_continuation(list(row["tokenized_prompt"]), params, self.vocab_size)
            yield {"generated_tokens": ids, "num_generated_tokens": len(ids),
                   self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN]}


class vLLMEngineStage(StatefulStage):  # the name ray.data.llm's processor gives its engine stage
    fn: Type[StatefulStageUDF] = FakeEngineUDF

    def get_required_input_keys(self) -> Dict[str, str]:
        return {"tokenized_prompt": "prompt ids", "sampling_params": "vllm.SamplingParams keyword arguments"}


def fake_build_processor(config, preprocess=None, postprocess=None, **_) -> Processor:
    import ray.data

    BUILT.append(config)
    engine = vLLMEngineStage(
        fn_constructor_kwargs={"batch_size": config.batch_size, "max_concurrent_batches": config.max_concurrent_batches,
                               "model": config.model_source, "engine_kwargs": config.engine_kwargs},
        map_batches_kwargs={"zero_copy_batch": True, "max_concurrency": config.max_concurrent_batches,
                            "num_cpus": 0.5,  # a GPU in the real stage; half a CPU here, so the 2-CPU test Ray has room
                            "compute": ray.data.ActorPoolStrategy(**config.get_concurrency(autoscaling_enabled=True))},
    )
    return Processor(config, [engine], preprocess=preprocess, postprocess=postprocess)


def engine_starts(log_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(log_dir).glob("*.json"))]
