"""Corpus -> snippets on Ray Data: `mine_corpus`.

    result = mine_corpus(FileDataSource("s3://bucket/corpus/*.parquet"), "bundled:smollm2",
                         tokens, snippet_len=50, snippets_per_token=100, out_dir="s3://bucket/mining")
    result.snippets_path     # parquet in SNIPPET_SCHEMA, read by training as is
    result.shortfall         # {token: snippets missing}, for a generation top-up

Pipeline: read the corpus (corpus_dataset) -> SnippetMiner actors, one tokenizer and
one PhraseScanner each, built once (`ActorPoolStrategy`, one CPU each, as many as the
cluster has CPUs; local files are read inside them) -> the driver takes each token's
first `snippets_per_token` distinct windows in stream order and stops reading once
every token has them.

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

import hashlib
from collections import Counter
import json
import logging
import marshal
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tokdist_ray.config import FileDataSource, HFDataSource
from tokdist_ray.data.files import EMPTY, CorpusFiles, resolve_files
from tokdist_ray.data.ray_corpus import BAD, MINER_CPUS, PART, TEXT, corpus_dataset
from tokdist_ray.data.matching import PhraseScanner
from tokdist_ray.data.snippets import SNIPPET_SCHEMA, MiningStats, snippet_row

if TYPE_CHECKING:  # mining actors import this module: keep transformers out of them
    from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")

CACHE_VERSION = 1  # bump when the output for the same inputs changes
PROGRESS_EVERY_S = 10.0
TALLY = -1  # token_index of a miner's per-batch tally row

MINED_SCHEMA = pa.schema(
    [
        ("token_index", pa.int32()),  # TALLY for the tally row
        ("input_ids", pa.list_(pa.int32())),
        ("phrase_start", pa.int32()),
        ("documents", pa.int64()),  # tally row only, as the rest
        ("bad_rows", pa.int64()),
        ("bad_reasons", pa.string()),  # JSON {reason: rows}
        ("bytes", pa.int64()),
        ("tokenised_chars", pa.int64()),
        ("cpu_seconds", pa.float64()),
        ("node", pa.string()),
    ]
)


# ---------------------------------------------------------------------- tokenizer
@dataclass(frozen=True)
class TokenizerSpec:
    """What a miner needs of a tokenizer, shipped by value (no shared filesystem)."""

    definition: str  # tokenizers JSON
    bos: tuple[int, ...]  # [BOS] or () for BOS-less tokenizers

    @classmethod
    def of(cls, tokenizer) -> TokenizerSpec:
        """From a loaded HF fast tokenizer or anything `load_tokenizer` accepts."""
        if isinstance(tokenizer, (str, os.PathLike)):
            from tokdist_ray.vocab.models import load_tokenizer

            tokenizer = load_tokenizer(str(tokenizer))
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("corpus mining on Ray needs a fast (Rust) tokenizer; use mine_snippets for slow ones")
        bos = () if tokenizer.bos_token_id is None else (tokenizer.bos_token_id,)
        return cls(tokenizer.backend_tokenizer.to_str(), bos)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps([self.definition, self.bos]).encode()).hexdigest()

    def load(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.definition)


# ---------------------------------------------------------------------- cache key
def _function_fingerprint(fn) -> str | None:
    if fn is None:
        return None
    code = getattr(fn, "__code__", None)
    body = marshal.dumps(code) if code is not None else repr(fn).encode()
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}:{hashlib.sha256(body).hexdigest()}"


def corpus_spec(source: FileDataSource | HFDataSource, files: CorpusFiles | None) -> dict:
    if isinstance(source, FileDataSource):
        return {
            "files": [list(f) for f in zip(files.paths, files.sizes, files.mtimes)],
            "text_column": source.text_column,
            "max_docs": source.max_docs,
        }
    spec = {k: v for k, v in asdict(source).items() if k not in ("map_to_text_fn", "tokenization_batch_size")}
    return {**spec, "map_to_text_fn": _function_fingerprint(source.map_to_text_fn)}


def cache_key(corpus: dict, tokenizer: TokenizerSpec, tokens: Sequence[NewToken], settings: dict) -> str:
    blob = json.dumps(
        {
            "version": CACHE_VERSION,
            "corpus": corpus,
            "tokenizer": tokenizer.fingerprint(),
            "tokens": [[t.text, list(t.phrase_ids)] for t in tokens],
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------- the actors
class QuotaBoard:
    """Tokens already full at the driver, so miners stop looking for them. A named actor,
    started only once a token fills: a run where none does starts no extra process."""

    def __init__(self):
        self._full: set[int] = set()

    def mark_full(self, indices: list[int]) -> None:
        self._full.update(indices)

    def full(self) -> list[int]:
        return sorted(self._full)


class BoardReader:
    """A miner's view of the board: asks without waiting, and uses the answer at the next
    batch, so neither the board's start nor a round trip ever holds up mining."""

    def __init__(self, name: str | None):
        self._name, self._board, self._pending = name, None, None
        self.full: list[int] = []

    def refresh(self) -> list[int]:
        import ray

        if self._pending is not None and ray.wait([self._pending], timeout=0)[0]:
            self.full, self._pending = ray.get(self._pending), None
        if self._pending is None and self._find():
            self._pending = self._board.full.remote()
        return self.full

    def _find(self) -> bool:
        import ray

        if self._board is None and self._name is not None:
            try:
                self._board = ray.get_actor(self._name)
            except ValueError:  # no token is full yet
                pass
        return self._board is not None


def _bad_reasons(batch: pa.Table) -> dict[str, int]:
    """Rows without text by reason, and whitespace-only texts as "empty"."""
    reasons = Counter(r for r in batch[BAD].to_pylist() if r is not None)
    empty = sum(1 for t in batch[TEXT].to_pylist() if t is not None and not t.strip())
    return dict(reasons + Counter({EMPTY: empty}))


@dataclass
class _Passed:
    """What one miner passed on for one token: hashes of its distinct windows (a hash
    collision only undercounts, which is safe) and the latest part they came from."""

    windows: set[int] = field(default_factory=set)
    last_part: int = -1


class SnippetMiner:
    """Ray Data UDF: a batch of documents -> candidate snippets plus one tally row."""

    def __init__(self, tokenizer: TokenizerSpec, texts, phrases, snippet_len: int, quota: int, board: str | None = None):
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one CPU per miner
        import ray

        self._scanner = PhraseScanner(tokenizer.load(), texts, phrases, snippet_len)
        self._bos = list(tokenizer.bos)
        self._quota = quota
        self._board = BoardReader(board)
        self._all = frozenset(range(len(texts)))
        self._passed: dict[int, _Passed] = {}
        self._full_after: dict[int, int] = {}  # token -> part after which this miner alone filled it
        self._node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"

    def __call__(self, batch: pa.Table) -> pa.Table:
        cpu, chars_before = time.process_time(), self._scanner.tokenised_chars
        texts, parts = batch[TEXT].to_pylist(), batch[PART].to_pylist()
        good = [(text, part) for text, part in zip(texts, parts) if text is not None and text.strip()]
        docs = [text for text, _ in good]
        hits = self._scanner.scan(docs, self._open(min(parts, default=0)))
        rows = self._first_distinct(hits, [part for _, part in good])
        tally = {
            "token_index": TALLY, "input_ids": [], "phrase_start": -1, "documents": len(docs),
            "bad_rows": batch.num_rows - len(docs), "bad_reasons": json.dumps(_bad_reasons(batch)), "bytes": sum(len(d.encode("utf-8")) for d in docs),
            "tokenised_chars": self._scanner.tokenised_chars - chars_before,
            "cpu_seconds": time.process_time() - cpu, "node": self._node,
        }
        return pa.Table.from_pylist(rows + [tally], schema=MINED_SCHEMA)

    def _open(self, first_part: int) -> frozenset[int]:
        """Tokens still wanted from parts >= first_part."""
        full_here = [t for t, part in self._full_after.items() if part < first_part]
        return self._all.difference(self._board.refresh(), full_here)

    def _first_distinct(self, hits, doc_parts: list[int]) -> list[dict]:
        """Per token, the first `quota` distinct snippets of this batch."""
        seen: dict[int, set] = {}
        rows = []
        for hit in hits:
            windows = seen.setdefault(hit.token_index, set())
            snippet = tuple(self._bos + hit.window)
            if len(windows) < self._quota and snippet not in windows:
                windows.add(snippet)
                rows.append({"token_index": hit.token_index, "input_ids": list(snippet),
                             "phrase_start": len(self._bos) + hit.phrase_start})
                self._note_passed(hit.token_index, snippet, doc_parts[hit.doc])
        return rows

    def _note_passed(self, index: int, snippet: tuple, part: int) -> None:
        if index in self._full_after:
            return
        passed = self._passed.setdefault(index, _Passed())
        passed.windows.add(hash(snippet))
        passed.last_part = max(passed.last_part, part)
        if len(passed.windows) >= self._quota:
            self._full_after[index] = passed.last_part
            del self._passed[index]


# ---------------------------------------------------------------------- the driver
@dataclass
class QuotaLedger:
    """The driver's side: each token's first `quota` distinct snippets in stream order."""

    tokens: Sequence[NewToken]
    quota: int
    rows: list[list[dict]] = field(init=False)  # per token index, in the order taken
    seen: list[set] = field(init=False)
    open: int = field(init=False)  # tokens still short of the quota

    def __post_init__(self):
        self.rows = [[] for _ in self.tokens]
        self.seen = [set() for _ in self.tokens]
        self.open = len(self.tokens) if self.quota > 0 else 0

    def offer(self, index: int, ids: list[int], phrase_start: int) -> bool:
        """Take the snippet if its token has room and it is new; True if that fills the token."""
        key = tuple(ids)
        if len(self.rows[index]) >= self.quota or key in self.seen[index]:
            return False
        self.seen[index].add(key)
        self.rows[index].append(snippet_row(self.tokens[index], index, ids, phrase_start, "corpus"))
        if len(self.rows[index]) == self.quota:
            self.open -= 1
            return True
        return False

    def counts(self) -> dict[str, int]:
        return {t.text: len(r) for t, r in zip(self.tokens, self.rows)}

    def table(self) -> pa.Table:
        return pa.Table.from_pylist([row for rows in self.rows for row in rows], schema=SNIPPET_SCHEMA)


@dataclass
class MinerWork:
    """What the miners did, from their tally rows."""

    workers: int = 0
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> documents mined there
    tokenised_chars: int = 0  # characters tokenised, of all characters scanned
    cpu_seconds: float = 0.0  # summed over the miners
    first_batch_seconds: float = 0.0  # from the start to the first mined batch: mostly actor start-up

    def add(self, tally: dict) -> None:
        self.nodes[tally["node"]] = self.nodes.get(tally["node"], 0) + tally["documents"]
        self.tokenised_chars += tally["tokenised_chars"]
        self.cpu_seconds += tally["cpu_seconds"]


@dataclass
class MiningResult:
    snippets_path: str  # directory of parquet files in SNIPPET_SCHEMA
    stats: MiningStats
    quota: int
    work: MinerWork = field(default_factory=MinerWork)
    cached: bool = False

    @property
    def shortfall(self) -> dict[str, int]:
        """token -> snippets missing to reach the quota."""
        return {t: self.quota - n for t, n in self.stats.counts.items() if n < self.quota}

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
            "workers": self.work.workers,
            "nodes": self.work.nodes,
            "snippets_path": self.snippets_path,
        }

    def rows(self) -> list[dict]:
        fs, path = _filesystem(self.snippets_path)
        return pq.read_table(path, filesystem=fs).to_pylist()


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def ray_is_running() -> bool:
    """Whether this process is connected to Ray (without importing it)."""
    import sys

    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def default_workers() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _progress(stats: MiningStats, ledger: QuotaLedger, started: float) -> None:
    seconds = time.perf_counter() - started
    log.info(
        "mining: %s, %.1f MB (%.1f MB/s), %d/%d tokens at quota",
        stats.summary(), stats.bytes / 1e6, stats.bytes / 1e6 / max(seconds, 1e-9),
        len(ledger.tokens) - ledger.open, len(ledger.tokens),
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


def _consume(stream, ledger: QuotaLedger, board: _BoardWriter, work: MinerWork) -> MiningStats:
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
        mined = block.filter(pc.invert(tally)).select(["token_index", "input_ids", "phrase_start"]).to_pydict()
        newly_full = [index for index, ids, start in zip(*mined.values()) if ledger.offer(index, ids, start)]
        if newly_full:
            board.mark_full(newly_full)
        if time.perf_counter() - last_log > PROGRESS_EVERY_S:
            last_log = time.perf_counter()
            _progress(stats, ledger, started)
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


def mining_dataset(source, seed, files, miner_args: dict, workers: int):
    """The corpus through the miners. Local reads ask for the miners' CPU so that Ray Data
    fuses them into the miners; were they left as tasks of their own (another Ray
    version, say) they would wait forever for CPUs the miners hold, so then the reads
    run in 0-CPU tasks instead."""
    import ray

    def through_miners(in_miners: bool):
        return corpus_dataset(source, seed, files, in_miners).map_batches(
            SnippetMiner,
            fn_constructor_kwargs=miner_args,
            batch_size=None,  # a block of the corpus (about BLOCK_BYTES) at a time; a batch size would stop the fusion
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=MINER_CPUS,  # Ray Data spreads the actors over the nodes (its default strategy)
        )

    dataset = through_miners(True)
    return dataset if reads_fused(dataset) else through_miners(False)


def _mine_on_ray(source, spec, tokens, snippet_len, quota, seed, files, ledger, work: MinerWork) -> MiningStats:
    board = _BoardWriter(f"tokdist-quota-board-{uuid.uuid4().hex}")
    miner_args = {
        "tokenizer": spec, "texts": [t.text for t in tokens], "phrases": [list(t.phrase_ids) for t in tokens],
        "snippet_len": snippet_len, "quota": quota, "board": board.name,
    }
    dataset = mining_dataset(source, seed, files, miner_args, work.workers)
    dataset.context.execution_options.preserve_order = True
    dataset.context.enable_progress_bars = False  # _consume logs progress; bars cost driver CPU
    stream = dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1)
    try:
        return _consume(stream, ledger, board, work)
    finally:
        board.close()


def _write(out: str, table: pa.Table, report: dict) -> None:
    fs, root = _filesystem(out)
    fs.create_dir(f"{root}/snippets", recursive=True)
    pq.write_table(table, f"{root}/snippets/corpus.parquet", filesystem=fs)
    with fs.open_output_stream(f"{root}/report.json") as f:  # written last: marks the result complete
        f.write(json.dumps(report, indent=1).encode())


def _cached(out: str, quota: int) -> MiningResult | None:
    fs, root = _filesystem(out)
    if fs.get_file_info(f"{root}/report.json").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{root}/report.json") as f:
        report = json.loads(f.read())
    stats = MiningStats(
        documents=report["documents"], bad_rows=report["bad_rows"], bad_reasons=report.get("bad_rows_by_reason", {}),
        bytes=report["bytes"],
        seconds=report["seconds"], counts=report["snippets_per_token"],
    )
    work = MinerWork(report["workers"], report["nodes"], report["tokenised_chars"], report["miner_cpu_seconds"],
                     report.get("first_batch_seconds", 0.0))  # absent in caches written before it was kept
    return MiningResult(f"{out}/snippets", stats, quota, work, cached=True)


def mine_corpus(
    source: FileDataSource | HFDataSource,
    tokenizer,
    tokens: Sequence[NewToken],
    snippet_len: int = 50,
    snippets_per_token: int = 100,
    out_dir: str = "mining",
    seed: int = 0,
    num_workers: int | None = None,
) -> MiningResult:
    """Mine up to `snippets_per_token` distinct snippets per token from `source` on the
    running Ray cluster (a local one is started if none is), written to
    `out_dir/mining-<key>/snippets/` in SNIPPET_SCHEMA. `tokenizer` is a fast HF
    tokenizer or a model path/id. `num_workers` defaults to the cluster's CPUs."""
    import ray

    if not tokens:
        raise ValueError("no tokens to mine snippets for")
    spec = TokenizerSpec.of(tokenizer)
    files = resolve_files(source.paths) if isinstance(source, FileDataSource) else None
    settings = {"snippet_len": snippet_len, "snippets_per_token": snippets_per_token, "seed": seed}
    out = f"{out_dir.rstrip('/')}/mining-{cache_key(corpus_spec(source, files), spec, tokens, settings)}"
    cached = _cached(out, snippets_per_token)
    if cached is not None:
        log.info("mining: reusing %s", out)
        return cached

    if not ray.is_initialized():
        ray.init()
    work = MinerWork(workers=num_workers or default_workers())
    ledger = QuotaLedger(tokens, snippets_per_token)
    stats = _mine_on_ray(source, spec, tokens, snippet_len, snippets_per_token, seed, files, ledger, work)
    stats.counts = ledger.counts()
    result = MiningResult(f"{out}/snippets", stats, snippets_per_token, work)
    report = {**result.report(), "bytes": stats.bytes, "tokenised_chars": work.tokenised_chars, "settings": settings}
    _write(out, ledger.table(), report)
    _progress(stats, ledger, time.perf_counter() - stats.seconds)
    if note := stats.shortfall_note(snippets_per_token):
        log.warning("mining: %s", note)
    return result
