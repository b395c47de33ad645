"""Corpus -> snippets on Ray Data: `mine_corpus`.

    expansion = expand_with_merges(load_tokenizer("bundled:smollm2"), [" Krankenwagen", ...])
    result = mine_corpus(FileDataSource("s3://bucket/corpus/*.parquet"), expansion,
                         snippet_len=50, snippets_per_token=100, out_dir="s3://bucket/mining")
    result.snippets_path     # parquet in SNIPPET_SCHEMA, read by training as is
    result.shortfall         # {token: snippets missing}, for a generation top-up

Pipeline: read the corpus (corpus_dataset) -> SnippetMiner actors, the expanded tokenizer
and one TokenScanner each, built once (`ActorPoolStrategy`, one CPU each, as many as the
cluster's CPU nodes hold once it has grown: tokdist_ray.capacity; local files are read
inside them) -> the driver takes each token's first `snippets_per_token` distinct windows
in stream order (a window counts toward the quota of every new token it holds:
QuotaLedger) and stops reading once every token has them.

Determinism: the stream order is fixed by the seed (corpus_dataset) and kept
(`preserve_order`); a miner passes on, per batch and token, its first
`snippets_per_token` distinct windows, which always contain the ones the driver takes.
So the snippets depend on corpus, tokenizer, tokens, settings and seed only, not on the
number of workers or nodes or on timing. Miners stop looking for a token in two cases,
both of which can only skip windows the driver would refuse:
  - it is full at the driver (a QuotaBoard actor tells them, a little late);
  - the miner itself has passed on `snippets_per_token` distinct windows of it from
    parts up to p: then the token is full at the driver by the end of part p, whatever
    the other miners find, so the miner drops it from later parts (at once, which
    matters for frequent tokens: they cost the most tokenising).

Caching: results live under `out_dir/mining-<key>/`, the key hashing the corpus (files
with sizes and mtimes, or the HF dataset spec), the tokenizer's full definition, the
tokens and the settings; a rerun with the same key reads them back.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tokdist_ray.capacity import cluster_capacity, wait_for_nodes
from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.budget import Quota, quota_key, quota_of, quotas_by_index
from tokdist_ray.data.corpus.ray_corpus import MINER_CPUS, corpus_blocks, corpus_dataset
from tokdist_ray.data.corpus.source import CorpusReader
from tokdist_ray.data.corpus.sources import corpus_reader
from tokdist_ray.data.mining.miner import TALLY, QuotaBoard, SnippetMiner, TokenizerSpec
from tokdist_ray.data.mining.mining_cache import cache_key, read_cache, write_cache
from tokdist_ray.data.mining.quota import QuotaLedger
from tokdist_ray.data.snippets import MiningStats
from tokdist_ray.errors import NoNewTokensError, user_errors_from_ray
from tokdist_ray.raycluster import connect
from tokdist_ray.storage import location

if TYPE_CHECKING:  # mining actors import this module: keep transformers out of them
    from tokdist_ray.vocab.merges import MergeExpansion

log = logging.getLogger("tokdist_ray")

PROGRESS_EVERY_S = 10.0


@dataclass
class MinerWork:
    """What the miners did, from their tally rows."""

    workers: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> documents mined there
    tokenised_chars: int = 0  # characters tokenised, of all characters scanned
    cpu_seconds: float = 0.0  # summed over the miners
    phase_seconds: dict[str, float] = field(default_factory=dict)  # of cpu_seconds, by scanner phase
    first_batch_seconds: float = 0.0  # from the start to the first mined batch: mostly actor start-up

    def add(self, tally: dict) -> None:
        self.nodes[tally["node"]] = self.nodes.get(tally["node"], 0) + tally["documents"]
        self.tokenised_chars += tally["tokenised_chars"]
        self.cpu_seconds += tally["cpu_seconds"]
        for phase, seconds in json.loads(tally["phase_seconds"]).items():
            self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds


@dataclass
class MiningResult:
    snippets_path: str  # directory of parquet files in SNIPPET_SCHEMA
    stats: MiningStats
    quota: Quota
    work: MinerWork = field(default_factory=MinerWork)
    cached: bool = False

    @property
    def shortfall(self) -> dict[str, int]:
        """token -> snippets missing to reach the quota."""
        return {t: quota_of(self.quota, t) - n for t, n in self.stats.short_of(self.quota).items()}

    def report(self) -> dict:
        stats = self.stats.as_dict(self.quota)
        seconds = max(self.stats.seconds, 1e-9)
        streaming = max(self.stats.seconds - self.work.first_batch_seconds, 1e-9)
        return {
            **stats,
            "megabytes_per_second": round(self.stats.bytes / 1e6 / seconds, 3),
            "documents_per_second": round(self.stats.documents / seconds, 1),
            "first_batch_seconds": round(self.work.first_batch_seconds, 2),
            "megabytes_per_second_after_first_batch": round(self.stats.bytes / 1e6 / streaming, 3),
            "shortfall": self.shortfall,
            "tokenised_share": round(self.work.tokenised_chars / max(1, self.stats.bytes), 4),  # chars per byte
            "miner_cpu_seconds": round(self.work.cpu_seconds, 2),
            "miner_cpu_seconds_by_phase": {k: round(v, 2) for k, v in self.work.phase_seconds.items()},
            "workers": self.work.workers,
            "nodes": self.work.nodes,
            "snippets_path": self.snippets_path,
        }

    def table(self) -> pa.Table:
        fs, path = location(self.snippets_path)
        return pq.read_table(path, filesystem=fs)


def _progress(stats: MiningStats, ledger: QuotaLedger, started: float, corpus_bytes: int | None = None) -> None:
    seconds = time.perf_counter() - started
    rate = stats.bytes / max(seconds, 1e-9)
    # files give the corpus size; mining stops sooner once every token is full
    left = f", at most {max(corpus_bytes - stats.bytes, 0) / max(rate, 1e-9):.0f}s left" if corpus_bytes else ""
    log.info(
        "mining: %s, %.1f MB%s (%.1f MB/s), %d/%d tokens at quota%s",
        stats.summary(), stats.bytes / 1e6, f" of {corpus_bytes / 1e6:.1f}" if corpus_bytes else "", rate / 1e6,
        len(ledger.tokens) - ledger.open, len(ledger.tokens), left,
    )


class _BoardWriter:
    """The driver's side of the QuotaBoard: started with the first full token."""

    def __init__(self, name: str):
        self.name, self._board = name, None

    def mark_full(self, indices: list[int]) -> None:
        import ray

        if self._board is None:
            self._board = ray.remote(num_cpus=0)(QuotaBoard).options(name=self.name).remote()
        self._board.mark_full.remote(indices)

    def close(self) -> None:
        import ray

        if self._board is not None:
            ray.kill(self._board)


def _consume(stream, ledger: QuotaLedger, board: _BoardWriter, work: MinerWork,
             corpus_bytes: int | None = None) -> MiningStats:
    """Feed mined batches to the ledger in stream order until every token is full."""
    stats = MiningStats()
    started = last_log = time.perf_counter()
    for block in stream:
        work.first_batch_seconds = work.first_batch_seconds or time.perf_counter() - started
        tally = pc.equal(block["token_index"], TALLY)
        for row in block.filter(tally).to_pylist():
            stats.documents += row["documents"]
            for reason, count in json.loads(row["bad_reasons"]).items():
                stats.add_bad(reason, count)
            stats.bytes += row["bytes"]
            work.add(row)
        mined = block.filter(pc.invert(tally)).select(["token_index", "input_ids", "token_position"]).to_pydict()
        newly_full = [full for index, ids, start in zip(*mined.values()) for full in ledger.offer(index, ids, start)]
        if newly_full:
            board.mark_full(newly_full)
        if time.perf_counter() - last_log > PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            _progress(stats, ledger, started, corpus_bytes)
        if ledger.open == 0:
            break
    stats.seconds = time.perf_counter() - started
    return stats


def reads_fused(dataset) -> bool:
    """Whether Ray Data runs the reads inside the miners (one fused operator)."""
    import contextlib
    import io

    plan = io.StringIO()
    with contextlib.redirect_stdout(plan):
        dataset.explain()
    return "->MapBatches(SnippetMiner)" in plan.getvalue()


def mining_dataset(corpus: CorpusReader, seed: int, miner_args: dict, workers: int):
    """The corpus through the miners. Local reads ask for the miners' CPU so that Ray Data
    fuses them into the miners; were they left as tasks of their own (another Ray
    version, say) they would wait forever for CPUs the miners hold, so then the reads
    run in 0-CPU tasks instead."""
    import ray

    def through_miners(in_miners: bool):
        return corpus_dataset(corpus, seed, in_miners).map_batches(
            SnippetMiner,
            fn_constructor_kwargs=miner_args,
            batch_size=None,  # a block of the corpus (about BLOCK_BYTES) at a time; a batch size would stop the fusion
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=MINER_CPUS,  # Ray Data spreads the actors over the nodes (its default strategy)
        )

    dataset = through_miners(True)
    return dataset if reads_fused(dataset) else through_miners(False)


def _miner_args(spec, expansion, snippet_len: int, quota: Quota, board: str | None) -> dict:
    texts = [t.text for t in expansion.tokens]
    return {"tokenizer": spec, "texts": texts, "new_start": expansion.new_start,
            "snippet_len": snippet_len, "quota": quotas_by_index(quota, texts), "board": board}


def _mine_on_ray(corpus, spec, expansion, snippet_len, quota, seed, ledger, work: MinerWork) -> MiningStats:
    board = _BoardWriter(f"tokdist-quota-board-{uuid.uuid4().hex}")
    dataset = mining_dataset(corpus, seed, _miner_args(spec, expansion, snippet_len, quota, board.name), work.workers)
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # _consume logs progress; bars cost driver CPU
    stream = dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    try:  # a corpus file that cannot be read fails in a read task: its CorpusFileError, not Ray's tracebacks
        with user_errors_from_ray("ray.data"):
            return _consume(stream, ledger, board, work, corpus.text_bytes())
    finally:
        board.close()


def _miners(num_workers: int | None) -> int:
    """`num_workers`, or a miner per CPU the cluster's CPU nodes have once it has grown; waits
    until the first of them has a node (an autoscaling cluster starts with none)."""
    capacity = cluster_capacity()
    workers = num_workers or capacity.cpu_workers(MINER_CPUS)
    wait_for_nodes("mining", {"CPU": MINER_CPUS}, workers, capacity)
    return workers


class _OwnBoard:
    """In process the miner needs no board: it drops tokens it has filled itself."""

    def mark_full(self, indices: list[int]) -> None:
        pass


def _mine_in_process(corpus, spec, expansion, snippet_len, quota, seed, ledger, work: MinerWork) -> MiningStats:
    """The same blocks in the same order through the same miner and ledger as on Ray."""
    work.workers = 1
    miner = SnippetMiner(**_miner_args(spec, expansion, snippet_len, quota, None))
    stream = (miner(block) for block in corpus_blocks(corpus, seed))
    return _consume(stream, ledger, _OwnBoard(), work, corpus.text_bytes())


def _cached(out: str, quota: Quota) -> MiningResult | None:
    report = read_cache(out)
    if report is None:
        return None
    stats = MiningStats(
        documents=report["documents"], bad_rows=report["bad_rows"], bad_reasons=report.get("bad_rows_by_reason", {}),
        bytes=report["bytes"],
        seconds=report["seconds"], counts=report["snippets_per_token"],
    )
    work = MinerWork(report["workers"], report["nodes"], report["tokenised_chars"], report["miner_cpu_seconds"],
                     report.get("miner_cpu_seconds_by_phase", {}),  # absent in caches written before these were kept
                     report.get("first_batch_seconds", 0.0))
    return MiningResult(f"{out}/snippets", stats, quota, work, cached=True)


def mine_corpus(
    source: FileDataSource | HFDataSource,
    expansion: MergeExpansion,
    snippet_len: int = 50,
    snippets_per_token: Quota = 100,
    out_dir: str = "mining",
    seed: int = 0,
    num_workers: int | None = None,
    top_up: bool = False,
    count_bystanders: bool = True,
    in_process: bool = False,
) -> MiningResult:
    """Mine up to `snippets_per_token` distinct snippets per token (or as many as a
    mapping token -> snippets says: data.budget) from `source` on the
    running Ray cluster (a local one is started if none is), written to
    `out_dir/mining-<key>/snippets/` in SNIPPET_SCHEMA, in the ids of the expanded
    tokenizer (`expansion.tokenizer`, a fast HF tokenizer). `num_workers` defaults to the CPUs
    of the cluster's CPU nodes, counted at the most its autoscaler can launch. `top_up`:
    generated snippets will fill tokens left short (only changes what the log says).
    `count_bystanders`: a snippet counts toward every new token it holds (QuotaLedger).
    `in_process`: mine in this process, without Ray (a small run, where starting Ray
    costs more than the mining): the same snippets, on one CPU."""
    tokens = expansion.tokens
    if not tokens:
        raise NoNewTokensError("no new tokens to mine snippets for")
    spec = TokenizerSpec.of(expansion.tokenizer)
    corpus = corpus_reader(source)
    settings = {"snippet_len": snippet_len, "snippets_per_token": quota_key(snippets_per_token), "seed": seed,
                "count_bystanders": count_bystanders}
    out = f"{out_dir.rstrip('/')}/mining-{cache_key(corpus.spec(), spec, tokens, settings)}"
    cached = _cached(out, snippets_per_token)
    if cached is not None:
        log.info("mining: reusing %s (%s)", out, cached.stats.summary())
        cached.stats.log_shortfall(snippets_per_token, top_up)
        return cached

    ledger = QuotaLedger(tokens, quotas_by_index(snippets_per_token, [t.text for t in tokens]), expansion.new_start,
                         count_bystanders)
    if in_process:
        work = MinerWork()
        mine = _mine_in_process
    else:
        connect()
        work, mine = MinerWork(workers=_miners(num_workers)), _mine_on_ray
    stats = mine(corpus, spec, expansion, snippet_len, snippets_per_token, seed, ledger, work)
    stats.require_text(source.text_column)
    stats.counts = ledger.counts()
    result = MiningResult(f"{out}/snippets", stats, snippets_per_token, work)
    report = {**result.report(), "bytes": stats.bytes, "tokenised_chars": work.tokenised_chars, "settings": settings}
    write_cache(out, ledger.table(), report)
    _progress(stats, ledger, time.perf_counter() - stats.seconds)
    stats.log_shortfall(snippets_per_token, top_up)
    return result
