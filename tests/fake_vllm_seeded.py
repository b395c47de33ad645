"""tests/fake_vllm.py's engine seeded as tokdist-ray seeds vLLM's (vllm_backend): one random
stream per engine start, from its `seed` engine argument, drawn in the order rows reach the
engine. A request that brings its own seed fails (vLLM samples those one by one). Every
engine records what it generated, so that a test can settle the very same samples on the
driver (`generated`) although no two runs draw alike.

    build_processor = partial(fake_vllm_seeded.build_processor, record_to=directory)
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List

import numpy as np

from tests import fake_vllm


class EngineSeededUDF(fake_vllm.FakeEngineUDF):
    def __init__(self, *args, engine_kwargs: Dict[str, Any], **kwargs):
        super().__init__(*args, engine_kwargs=engine_kwargs, **kwargs)
        self.stream = np.random.default_rng(int(engine_kwargs["seed"]))
        self.record = Path(engine_kwargs["fake_engine_log"], f"{uuid.uuid4().hex}.samples.jsonl")

    async def udf(self, batch: List[Dict[str, Any]]) -> AsyncIterator[Dict[str, Any]]:
        rows = {row[self.IDX_IN_BATCH_COLUMN]: row for row in batch}
        seeded = []
        for row in batch:
            params = dict(row["sampling_params"])
            assert "seed" not in params, "a request with a seed of its own: vLLM samples those one by one"
            seeded.append({**row, "sampling_params": {**params, "seed": int(self.stream.integers(2**63))}})
        with self.record.open("a") as record:
            async for out in super().udf(seeded):
                row = rows[out[self.IDX_IN_BATCH_COLUMN]]
                record.write(json.dumps({"token_index": int(row["token_index"]), "sample_index": int(row["sample_index"]),
                                         "generated_tokens": out["generated_tokens"]}) + "\n")
                yield out


def build_processor(config, preprocess=None, postprocess=None, *, record_to: str, **kwargs):
    """fake_vllm.fake_build_processor with the seeded engine, recording to `record_to`
    (its engine starts too: fake_vllm.engine_starts)."""
    processor = fake_vllm.fake_build_processor(config, preprocess, postprocess, **kwargs)
    stage = processor.get_stage_by_name(fake_vllm.vLLMEngineStage.__name__)
    constructor = dict(stage.fn_constructor_kwargs)
    constructor["engine_kwargs"] = {**constructor["engine_kwargs"], "fake_engine_log": record_to}
    stage.fn_constructor_kwargs = constructor
    stage.fn = EngineSeededUDF
    return processor


def generated(record_to: Path) -> dict[tuple[int, int], list[int]]:
    """(token index, sample index) -> the ids an engine generated for that sample."""
    samples: dict[tuple[int, int], list[int]] = {}
    for path in sorted(Path(record_to).glob("*.samples.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            key = (row["token_index"], row["sample_index"])
            assert key not in samples, f"sample {key} generated twice"
            samples[key] = row["generated_tokens"]
    return samples
