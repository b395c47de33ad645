"""Generated snippets: request planning, seeded sampling, EOS cuts, top-up, the Ray Data CPU
actor pool on the real SmolLM2, and the vLLM path through Ray's own vLLM processor and stage
over a fake engine seeded as vLLM's are (tests/fake_vllm.py), compared with the driver-side
path it replaced on the samples the engines drew. The vLLM backend's plain functions and
settings: tests/unit/test_vllm_settings.py."""

from __future__ import annotations

from collections import Counter
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

from tests import fake_vllm
from tests.helpers import SENTENCES, WORDS
from tokdist_ray import FileDataSource, GeneratedDataSource, TokenDistillation, api
from tokdist_ray.config import DistillationConfig
from tokdist_ray.data.generation import backend, vllm_backend
from tokdist_ray.data.generation.backend import resolve_backend
from tokdist_ray.data.generation.local import generate_snippets
from tokdist_ray.data.generation.ray_backend import (
    generate_snippet_table,
    generate_snippets_on_ray,
    request_blocks,
    request_chunks,
)
from tokdist_ray.data.generation.requests import (
    SAMPLE_SCHEMA,
    GenerationStats,
    cut_at_eos,
    expanded_snippets,
    fitted,
    plan_requests,
    sample_row,
    sample_seed,
    sample_table,
    stop_ids,
    wanted_counts,
)
from tokdist_ray.data.generation.sampling import SampleStreams, draw, warp_logits
from tokdist_ray.data.generation.settling import ORDER
from tokdist_ray.data.snippets import SNIPPET_SCHEMA, bos_prefix, settle, window_around
from tokdist_ray.errors import BackendUnavailableError, ModelNotFoundError
from tokdist_ray.training.snippet_files import read_snippets
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model, load_tokenizer
from tokdist_ray.vocab.tokens import NewToken

SNIPPET_LEN = 10
PER_TOKEN = 3


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    """(model, expansion, the two test words' tokens) for SmolLM2."""
    expansion = expand_with_merges(load_tokenizer(str(smollm2_dir)), WORDS)
    return load_model(str(smollm2_dir)), expansion, expansion.requested


@pytest.fixture(scope="module")
def smol_snippets(smol):
    model, expansion, tokens = smol
    return generate_snippets(model, expansion, tokens, SNIPPET_LEN, PER_TOKEN, GeneratedDataSource(min_new_tokens=2))


def tiny_expansion(model_dir):
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(model_dir), WORDS)
    return expansion, expansion.requested


def force_eos_at(model, step: int, eos: int):
    """Make EOS (all but) certain as the `step`-th new id of every sample."""
    state = {"step": 0}

    def hook(module, args, kwargs, output):
        state["step"] = 1 if kwargs["input_ids"].shape[1] > 1 else state["step"] + 1  # a prefill starts a batch
        if state["step"] == step:
            output.logits[:, -1, eos] = 1e4
        return output

    return model.register_forward_hook(hook, with_kwargs=True)


# --- plain functions ------------------------------------------------------------------------


def test_sample_seeds_are_stable_distinct_and_fit_int64():
    seeds = {sample_seed(42, tok, k) for tok in WORDS for k in range(100)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(42, WORDS[0], 3) == sample_seed(42, WORDS[0], 3) != sample_seed(43, WORDS[0], 3)


def test_cut_at_eos_stops_at_the_first_of_several_stop_ids():
    assert cut_at_eos([5, 6, 2, 7, 0], [0, 2]) == [5, 6]
    assert cut_at_eos(np.array([5, 6]), [2]) == [5, 6]
    assert cut_at_eos([2, 5], [2]) == []


def test_stop_ids_join_tokenizer_and_generation_config():
    class Tok:
        eos_token_id = 2

    class Config:
        eos_token_id = [7, 2]

    assert stop_ids(Tok(), Config()) == [2, 7]
    assert stop_ids(Tok()) == [2]


def test_requests_carry_prompt_seed_and_continue_sample_indices():
    tokens = [NewToken(" abc", (10, 11, 12)), NewToken(" de", (20, 21))]
    requests = plan_requests(tokens, {" abc": 2, " de": 1}, {" abc": 3, " de": 0}, [1], seed=7, token_indices=[4, 9])
    assert [(r["token"], r["sample_index"]) for r in requests] == [(" de", 0), (" abc", 3), (" abc", 4)]
    assert requests[0]["prompt_ids"] == [1, 20, 21] and requests[0]["phrase_start"] == 1
    assert requests[1]["token_index"] == 4 and requests[1]["seed"] == sample_seed(7, " abc", 3)
    assert plan_requests(tokens, {" de": 1}, {" abc": 0, " de": 0}, [], 7, [0, 1])[0]["prompt_ids"] == [20, 21]


def test_requests_come_in_chunks_of_one_batch_of_one_token_in_enough_blocks():
    tokens = {4: NewToken(" abc", (10, 11, 12)), 9: NewToken(" de", (20, 21))}
    chunks = request_chunks(tokens, {4: (3, 8), 9: (0, 2)}, [1], chunk=2)
    assert [(c["token_index"], c["lo"], c["hi"]) for c in chunks] == [(9, 0, 2), (4, 3, 5), (4, 5, 7), (4, 7, 8)]
    assert chunks[0]["prompt_ids"] == [1, 20, 21] and chunks[0]["phrase_start"] == 1
    assert request_blocks(1000, workers=2) == 125 and request_blocks(20, workers=2) == 8 and request_blocks(1, 4) == 1


def test_short_samples_are_dropped_and_rows_fit_the_snippet_schema():
    request = {"token": " x", "token_index": 3, "prompt_ids": [1, 9, 8], "phrase_start": 1}
    assert sample_row({**request, "continuation": [5, 6]}, min_new_tokens=3) is None
    row = sample_row({**request, "continuation": [5, 6, 7]}, min_new_tokens=3)
    assert row == {"token": " x", "token_index": 3, "input_ids": [1, 9, 8, 5, 6, 7], "phrase_start": 1, "source": "generated"}
    table = sample_table([{**request, "continuation": [5, 6, 7]}, {**request, "continuation": []}], 3)
    assert table.schema.equals(SAMPLE_SCHEMA) and table.num_rows == 1


def test_samples_become_the_expanded_tokenizers_snippets(tiny_tokenizer_dir):
    """A sample's text is encoded by the expanded tokenizer; one where the model glued
    letters on to the word (` sequence` + `s`: BPE splits ` sequences` otherwise) is
    dropped and counted."""
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(tiny_tokenizer_dir()), [" sequence"])
    tokenizer, token = expansion.tokenizer, expansion.tokens[0]

    def sample(continuation):
        ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        return {"token": token.text, "token_index": 0, "input_ids": [1, *token.phrase_ids, *ids],
                "phrase_start": 1, "source": "generated"}

    stats = GenerationStats(counts={token.text: 2})
    table = expanded_snippets([sample(" of the river and the garden."), sample("s drove past.")], expansion, 6, stats)
    assert table.schema.equals(SNIPPET_SCHEMA) and table.num_rows == 1
    row = table.to_pylist()[0]
    expected = tokenizer(" sequence of the river and the garden.", add_special_tokens=False)["input_ids"][:6]
    assert row["input_ids"] == [1, *expected] and expected[0] == expansion.new_start
    assert row["token_position"] == 1
    assert stats.dropped_not_emitted == 1 and stats.counts == {token.text: 1}


def test_draws_follow_the_distribution_and_repeat_per_seed():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]])).expand(4000, 4)
    ids = draw(logits, SampleStreams(range(4000)).noise(4))
    freq = torch.bincount(ids, minlength=4) / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.03)
    assert torch.equal(ids, draw(logits, SampleStreams(range(4000)).noise(4)))


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    top1 = warp_logits(logits, GeneratedDataSource(top_k=1))
    assert torch.isfinite(top1).tolist() == [[False, True, False, False]]
    nucleus = warp_logits(logits, GeneratedDataSource(top_p=0.8))
    assert torch.isfinite(nucleus).tolist() == [[False, True, False, True]]


def test_config_rejects_unknown_backend_and_zero_temperature():
    with pytest.raises(ValueError, match="backend"):
        GeneratedDataSource(backend="tpu")
    with pytest.raises(ValueError, match="temperature"):
        GeneratedDataSource(temperature=0)


# --- backend choice -------------------------------------------------------------------------


def test_without_vllm_auto_picks_cpu_and_vllm_says_how_to_install(monkeypatch):
    monkeypatch.setattr(backend, "vllm_installed", lambda: False)
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(BackendUnavailableError, match=r"pip install 'tokdist-ray\[gpu\]'"):
        resolve_backend("vllm")


def test_auto_picks_vllm_only_with_gpus(monkeypatch):
    monkeypatch.setattr(backend, "vllm_installed", lambda: True)
    monkeypatch.setattr(backend, "cluster_has_gpus", lambda: True)
    assert resolve_backend("auto") == "vllm"
    monkeypatch.setattr(backend, "cluster_has_gpus", lambda: False)
    assert resolve_backend("auto") == "transformers"


def test_in_process_vllm_request_fails_clearly_without_vllm(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(backend, "vllm_installed", lambda: False)
    model_dir = tiny_model_dir()
    expansion, tokens = tiny_expansion(model_dir)
    with pytest.raises(BackendUnavailableError, match="vLLM"):
        generate_snippets(load_model(model_dir), expansion, tokens, 8, 2, GeneratedDataSource(backend="vllm"))


def old_expanded_snippets(samples, expansion, snippet_len, stats):
    """The driver-side settling the columnar path replaced, as it was, for reference."""
    tokenizer, new_start = expansion.tokenizer, expansion.new_start
    samples = [{**s, "input_ids": [int(i) for i in s["input_ids"]]} for s in samples]
    texts = tokenizer.batch_decode([s["input_ids"][s["phrase_start"]:] for s in samples])
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    rows = []
    for sample, ids in zip(samples, encoded):
        new_id = new_start + sample["token_index"]
        settled = new_id in ids and settle(tokenizer.backend_tokenizer, *window_around(ids, ids.index(new_id), 1, snippet_len))
        if not settled:
            stats.dropped_not_emitted += 1
            stats.counts[sample["token"]] -= 1
            continue
        prefix = list(sample["input_ids"][: sample["phrase_start"]])
        window, offset = settled
        rows.append({**sample, "input_ids": prefix + window, "token_position": len(prefix) + offset})
    return pa.Table.from_pylist([{k: r[k] for k in SNIPPET_SCHEMA.names} for r in rows], schema=SNIPPET_SCHEMA)


def old_driver_path(expansion, tokens, snippet_len, per_token, source, generated, stop, token_indices=None):
    """The path before the columnar one: rounds of requests, every sample collected and
    settled on the driver, with the continuations the engines drew (`generated`:
    fake_vllm.generated)."""
    source = fitted(source, snippet_len)
    indices = list(token_indices) if token_indices is not None else list(range(len(tokens)))
    wanted, prefix = wanted_counts(tokens, per_token), bos_prefix(expansion.tokenizer)
    stats = GenerationStats(counts={t.text: 0 for t in tokens})
    next_sample, samples = {t.text: 0 for t in tokens}, []
    for _ in range(1 + source.refill_rounds):
        missing = {t: n - stats.counts[t] for t, n in wanted.items() if stats.counts[t] < n}
        if not missing:
            break
        requests = plan_requests(tokens, missing, next_sample, prefix, source.seed, indices)
        rows = [sample_row({**r, "continuation": cut_at_eos(generated[(r["token_index"], r["sample_index"])], stop)},
                           source.min_new_tokens) for r in requests]
        rows = [r for r in rows if r is not None]
        samples += rows
        stats.samples += len(requests)
        for text, n in Counter(r["token"] for r in rows).items():
            stats.counts[text] += n
        for text, n in missing.items():
            next_sample[text] += n
    stats.dropped_short = stats.samples - sum(stats.counts.values())
    return old_expanded_snippets(samples, expansion, snippet_len, stats), stats


@pytest.fixture
def fake_vllm_engine(monkeypatch, tmp_path):
    """Ray's own vLLM processor over the fake engine (tests/fake_vllm.py), on the test Ray's
    CPUs; yields the directory where each engine start, every sample it drew and the sample
    row each became are recorded."""
    record = tmp_path / "engines"
    record.mkdir()
    monkeypatch.setattr(backend, "vllm_installed", lambda: True)  # the fake vllm is on the engines' path alone
    monkeypatch.setattr(vllm_backend, "processor_config",
                        fake_vllm.processor_config_here(vllm_backend.processor_config, str(record)))
    monkeypatch.setattr(vllm_backend, "vllm_sample",
                        partial(fake_vllm.recorded, vllm_backend.vllm_sample, record_to=str(record)))
    yield record


@pytest.mark.parametrize("overgenerate", [0.0, 2.0])
def test_columnar_vllm_path_gives_the_snippets_and_rows_of_the_driver_path(tiny_model_dir, ray_session, fake_vllm_engine,
                                                                           overgenerate):
    model_dir = tiny_model_dir()
    expansion, _ = tiny_expansion(model_dir)
    tokens = expansion.tokens  # the words and the intermediate merges they need: several prompt lengths
    source = GeneratedDataSource(backend="vllm", min_new_tokens=2, batch_size=4, concurrency=2, overgenerate=overgenerate)
    stop = stop_ids(expansion.tokenizer, GenerationConfig.from_pretrained(model_dir))

    table, stats = generate_snippet_table(str(model_dir), expansion, tokens, 8, 6, source)
    expected, old_stats = old_driver_path(expansion, tokens, 8, 6, source, fake_vllm.generated(fake_vllm_engine), stop)
    assert table.schema.equals(SNIPPET_SCHEMA) and expected.num_rows > len(tokens)
    assert table.to_pylist() == expected.to_pylist()  # the same rows, in the same order
    assert stats.counts == old_stats.counts and stats.samples == old_stats.samples
    assert (stats.dropped_short, stats.dropped_not_emitted) == (old_stats.dropped_short, old_stats.dropped_not_emitted)
    assert old_stats.dropped_short > 0  # refill rounds had work to do
    # with no spares every round is a pass of its own; with enough spares one pass settles them all
    starts = fake_vllm.engine_starts(fake_vllm_engine)
    assert stats.passes <= len(starts) <= 2 * stats.passes and fake_vllm.BUILT[-1].concurrency == (2, 2)
    assert stats.passes == {0.0: 3, 2.0: 1}.get(overgenerate, stats.passes)
    assert all(start["model"] == str(model_dir) for start in starts)
    assert len({start["seed"] for start in starts}) == len(starts)  # a seed of its own for every engine start


def test_vllm_engines_resolve_the_users_model_name_themselves(tiny_model_dir, ray_session, fake_vllm_engine, tmp_path):
    """The driver hands the engines the name it was given; each resolves it on its own
    node, and a path that node lacks fails there, saying where a model must be."""
    model_dir = tiny_model_dir()
    expansion, tokens = tiny_expansion(model_dir)
    source = GeneratedDataSource(backend="vllm", min_new_tokens=1, concurrency=1)
    missing = tmp_path / "not-on-the-gpu-nodes"
    with pytest.raises(ModelNotFoundError, match="every GPU node"):
        generate_snippet_table(str(missing), expansion, tokens, 6, 2, source)
    assert fake_vllm.BUILT[-1].model_source == str(missing)


def test_generated_parts_are_what_training_reads_in_the_tables_order(tiny_model_dir, ray_session, fake_vllm_engine,
                                                                      tmp_path):
    model_dir = tiny_model_dir()
    expansion, _ = tiny_expansion(model_dir)
    source = GeneratedDataSource(backend="vllm", min_new_tokens=2, batch_size=2, concurrency=1)
    generated, stats = generate_snippets_on_ray(str(model_dir), expansion, expansion.tokens, 8, 5, source)
    table = generated.table()
    paths = generated.write(str(tmp_path / "parts"))
    assert paths == sorted(paths) and len(paths) >= 1 and generated.num_rows == table.num_rows == sum(stats.counts.values())
    read = pa.concat_tables([pq.read_table(p) for p in paths])
    assert read.to_pylist() == table.to_pylist()
    snippets = read_snippets(str(tmp_path / "parts"), [t.text for t in expansion.tokens])
    assert snippets.ids.to_pylist() == table["input_ids"].to_pylist()
    assert snippets.counts == {t: n for t, n in stats.counts.items() if n}
    assert set(ORDER) <= set(generated.dataset.schema().names)


# --- the CPU backend on SmolLM2 -------------------------------------------------------------


def test_snippets_start_with_bos_then_the_new_token_as_the_tokenizer_encodes_them(smol, smol_snippets):
    _, expansion, tokens = smol
    tokenizer = expansion.tokenizer
    rows, stats = smol_snippets
    assert tokenizer.bos_token_id is not None and bos_prefix(tokenizer) == [tokenizer.bos_token_id]
    for row in rows:
        assert row["input_ids"][:2] == [tokenizer.bos_token_id, expansion.new_start + row["token_index"]]
        assert row["token_position"] == 1 and row["source"] == "generated"
        assert 3 <= len(row["input_ids"]) <= 1 + SNIPPET_LEN
        assert tokenizer.eos_token_id not in row["input_ids"]
        text = tokenizer.decode(row["input_ids"][1:])
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == row["input_ids"][1:]
    assert sum(stats.counts.values()) + stats.dropped_not_emitted == len(rows) + stats.dropped_not_emitted == 2 * PER_TOKEN


def test_no_bos_where_the_tokenizer_has_none(tiny_model_dir):
    model_dir = tiny_model_dir(bos=False)
    expansion, tokens = tiny_expansion(model_dir)
    rows, _ = generate_snippets(load_model(model_dir), expansion, tokens, 6, 2, GeneratedDataSource(min_new_tokens=0))
    assert rows
    for row in rows:
        assert row["input_ids"][0] == expansion.new_start + row["token_index"] and row["token_position"] == 0


def test_seeds_give_identical_output_whatever_the_batching(smol, smol_snippets):
    model, expansion, tokens = smol
    rows, _ = smol_snippets
    # batches of 2 mix the two tokens' prompt lengths differently than the one batch of 6
    in_pairs, _ = generate_snippets(model, expansion, tokens, SNIPPET_LEN, PER_TOKEN,
                                    GeneratedDataSource(min_new_tokens=2, batch_size=2))
    assert in_pairs == rows
    other_seed, _ = generate_snippets(model, expansion, tokens, SNIPPET_LEN, PER_TOKEN,
                                      GeneratedDataSource(min_new_tokens=2, seed=7))
    assert [r["input_ids"] for r in other_seed] != [r["input_ids"] for r in rows]


def test_samples_are_cut_at_eos_and_short_ones_counted(smol):
    model, expansion, tokens = smol
    eos = expansion.tokenizer.eos_token_id
    handle = force_eos_at(model, step=5, eos=eos)
    try:
        kept, kept_stats = generate_snippets(model, expansion, tokens, SNIPPET_LEN, 2, GeneratedDataSource(min_new_tokens=4))
        dropped, dropped_stats = generate_snippets(model, expansion, tokens, SNIPPET_LEN, 2,
                                                   GeneratedDataSource(min_new_tokens=5, refill_rounds=1))
    finally:
        handle.remove()
    # [BOS] + the new token + what 4 sampled ids spell under the expanded tokenizer (at most 4 ids)
    assert kept and all(3 <= len(r["input_ids"]) <= 1 + 1 + 4 for r in kept)
    assert all(eos not in r["input_ids"] for r in kept) and kept_stats.dropped_short == 0
    assert dropped == [] and dropped_stats.counts == {w: 0 for w in WORDS}
    assert dropped_stats.samples == dropped_stats.dropped_short == 2 * 2 * 2  # tokens x samples x rounds


def test_top_up_generates_exactly_the_shortfall(smol):
    model, expansion, tokens = smol
    shortfall = {WORDS[0]: 2, WORDS[1]: 1}
    rows, stats = generate_snippets(model, expansion, tokens, 8, shortfall, GeneratedDataSource(min_new_tokens=2))
    assert stats.counts == shortfall and stats.dropped_not_emitted == 0
    assert sorted((r["token"], r["token_index"]) for r in rows) == [(WORDS[0], 0)] * 2 + [(WORDS[1], 1)]


@pytest.mark.parametrize("top_up", [True, GeneratedDataSource(seed=7, temperature=0.7)], ids=["default", "settings"])
def test_api_tops_up_short_tokens_and_reports_it(tiny_model_dir, tmp_path, monkeypatch, top_up):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "doc.txt").write_text(SENTENCES[0], encoding="utf-8")  # each word once
    sources = []

    def generate_and_record(*args, **kwargs):
        sources.append(args[5])
        return generate_snippets(*args, **kwargs)

    monkeypatch.setattr(api, "generate_snippets", generate_and_record)
    td = TokenDistillation(str(tiny_model_dir()), device="cpu")
    td.run(WORDS, data=FileDataSource(str(corpus)), snippet_len=10, snippets_per_token=3, top_up_with_generation=top_up,
           training=DistillationConfig(batch_size=4, log_every=1000))
    assert sources == [GeneratedDataSource() if top_up is True else top_up]
    report = td.last_report
    topped_up = report["snippets"]["generation"]["snippets_per_token"]  # intermediates (` Kranken`) are topped up too
    assert {w: topped_up[w] for w in WORDS} == {w: 2 for w in WORDS}
    assert [t["snippets"] for t in report["tokens_added"][:2]] == [3, 3]


def test_ray_actor_pool_matches_in_process_and_writes_snippet_parquet(smol, smol_snippets, smollm2_dir, ray_session, tmp_path):
    _, expansion, tokens = smol
    rows, in_process = smol_snippets
    source = GeneratedDataSource(min_new_tokens=2, batch_size=2, concurrency=2, backend="transformers")
    table, stats = generate_snippet_table(str(smollm2_dir), expansion, tokens, SNIPPET_LEN, PER_TOKEN, source)
    assert stats.backend == "transformers" and stats.counts == in_process.counts
    pq.write_table(table, tmp_path / "snippets.parquet")
    table = pq.read_table(tmp_path / "snippets.parquet")
    assert table.schema.remove_metadata().equals(SNIPPET_SCHEMA)
    assert table.to_pylist() == rows  # the same snippets, in the same order (by round, prompt length, token, sample)


def test_the_jobs_top_up_is_written_by_ray_data_after_the_mined_rows(tiny_model_dir, job_corpus_dir, ray_session,
                                                                     fake_vllm_engine, tmp_path):
    """The job's snippets stage: mined rows in snippets.parquet, the generated top-up in
    parts that Ray Data's workers wrote; training reads them in that order, and they are
    the rows the driver-side path settles from the samples the engines drew."""
    from tests.helpers import tiny_job_args
    from tokdist_ray.job.config import load_config, parse_overrides
    from tokdist_ray.job.pipeline import run_job
    from tokdist_ray.job.stages import GENERATED_PARTS
    from tokdist_ray.training.snippet_files import parquet_files
    from tokdist_ray.vocab.expansion_files import load_expansion

    model_dir = tiny_model_dir()
    run = tmp_path / "run"
    args = tiny_job_args(model_dir, job_corpus_dir, run) + [
        "--snippets.snippets_per_token", "6", "--data.top_up_with_generation", "true", "--generation.backend", "vllm",
        "--generation.min_new_tokens", "2", "--generation.concurrency", "1"]
    config = load_config(None, parse_overrides(args))
    report = run_job(config, stages=("snippets",))["outputs"]["snippets"]["report"]
    files = parquet_files(pafs.LocalFileSystem(), str(run / "snippets"))
    assert files[0] == str(run / "snippets" / "snippets.parquet")
    assert files[1:] and all(f"/{GENERATED_PARTS}/part-" in f for f in files[1:])
    mined = pq.read_table(files[0])
    generated = pa.concat_tables([pq.read_table(f) for f in files[1:]])
    assert set(mined["source"].to_pylist()) == {"corpus"} and set(generated["source"].to_pylist()) == {"generated"}
    assert report["snippets"] == mined.num_rows + generated.num_rows
    assert Counter(generated["token"].to_pylist()) == {t: n for t, n in report["generation"]["snippets_per_token"].items() if n}

    expansion = load_expansion(str(run / "tokenizer"))
    shortfall = report["mining"]["shortfall"]
    todo = [(i, t) for i, t in enumerate(expansion.tokens) if t.text in shortfall]
    stop = stop_ids(expansion.tokenizer, GenerationConfig.from_pretrained(model_dir))
    table, _ = old_driver_path(expansion, [t for _, t in todo], 24, shortfall, config.generation,
                               fake_vllm.generated(fake_vllm_engine), stop, token_indices=[i for i, _ in todo])
    assert generated.to_pylist() == table.to_pylist()
