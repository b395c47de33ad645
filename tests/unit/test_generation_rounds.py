"""The round ledger (which samples a token keeps, settled in passes) and where the
generating model is resolved; plain functions, no Ray."""

from __future__ import annotations

import random

import pytest

from tokdist_ray.data.generation import model_source
from tokdist_ray.data.generation.rounds import RoundLedger, round_of
from tokdist_ray.errors import ModelNotFoundError


def rounds_as_before(wanted: int, refill_rounds: int, is_short) -> tuple[list[int], list[int]]:
    """The rule as the round loop applied it: (the samples asked for, the samples kept)."""
    asked, kept, next_sample = [], [], 0
    for _ in range(1 + refill_rounds):
        missing = wanted - len(kept)
        if missing <= 0:
            break
        batch = list(range(next_sample, next_sample + missing))
        asked += batch
        kept += [s for s in batch if not is_short(s)]
        next_sample += missing
    return asked, kept


def settle(ledger: RoundLedger, is_short) -> int:
    """Run the ledger's passes against short flags; the number of passes."""
    passes = 0
    while ranges := ledger.next_pass():
        passes += 1
        ledger.record(ranges, {i: [s for s in range(lo, hi) if is_short(i, s)] for i, (lo, hi) in ranges.items()})
    return passes


@pytest.mark.parametrize("overgenerate", [0.0, 0.1, 0.5, 3.0])
def test_passes_keep_exactly_the_samples_the_rounds_kept(overgenerate):
    rng = random.Random(7)
    shorts = {(i, s) for i in range(40) for s in range(400) if rng.random() < 0.3}
    is_short = lambda i, s: (i, s) in shorts  # noqa: E731
    wanted = {i: rng.choice([0, 1, 5, 20, 100]) for i in range(40)}
    ledger = RoundLedger(wanted, refill_rounds=2, may_drop=True, overgenerate=overgenerate)
    settle(ledger, is_short)
    cuts = ledger.cuts()
    assert set(cuts) == {i for i, n in wanted.items() if n}
    for index, bounds in cuts.items():
        asked, kept = rounds_as_before(wanted[index], 2, lambda s: is_short(index, s))
        assert bounds[-1] == len(asked) and ledger.kept()[index] == len(kept)
        assert [s for s in range(bounds[-1]) if not is_short(index, s)] == kept
        assert ledger.tokens[index].generated >= len(asked)


def test_spares_save_passes_and_zero_spares_run_one_pass_per_round():
    is_short = lambda i, s: s % 3 == 0  # noqa: E731 (a third of the samples, the same for every token)
    def ledger(overgenerate):
        return RoundLedger({0: 30, 1: 30}, refill_rounds=2, may_drop=True, overgenerate=overgenerate)
    as_rounds, spared = ledger(0.0), ledger(1.0)
    assert settle(as_rounds, is_short) == 3 and settle(spared, is_short) == 1
    assert as_rounds.cuts() == spared.cuts() and as_rounds.samples() == sum(b[-1] for b in as_rounds.cuts().values())
    assert spared.samples() == 2 * 60  # wanted plus as many spares (overgenerate 1.0), in one pass


def test_no_spares_when_no_sample_can_be_short():
    ledger = RoundLedger({0: 10}, refill_rounds=2, may_drop=False, overgenerate=0.5)
    assert ledger.next_pass() == {0: (0, 10)}
    ledger.record({0: (0, 10)}, {})
    assert ledger.next_pass() == {} and ledger.cuts() == {0: [0, 10]}


def test_samples_belong_to_the_round_that_asked_for_them():
    assert [round_of([0, 10, 13, 14], s) for s in (0, 9, 10, 12, 13)] == [0, 0, 1, 1, 2]


def test_engines_resolve_the_model_name_on_their_node(tiny_model_dir, tmp_path):
    assert model_source.engine_model_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert model_source.engine_model_path("s3://bucket/models/llama") == "s3://bucket/models/llama"
    assert model_source.engine_model_path(str(tiny_model_dir())) == str(tiny_model_dir())
    with pytest.raises(ModelNotFoundError, match=r"on node .*shared|every GPU node"):
        model_source.engine_model_path(str(tmp_path / "only-on-the-driver"))


def test_the_driver_reads_stop_ids_without_weights(tiny_model_dir, tmp_path, monkeypatch):
    assert model_source.generation_config("bundled:smollm2") is None  # never converted on the driver
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_source.is_gguf_source(str(gguf)) and model_source.generation_config(str(gguf)) is None
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": [7, 9]}')
    assert model_source.generation_config(str(tmp_path / "hf")).eos_token_id == [7, 9]
    assert model_source.generation_config(f"file://{tmp_path / 'hf'}").eos_token_id == [7, 9]
    assert model_source.generation_config(f"file://{tmp_path / 'none'}") is None
