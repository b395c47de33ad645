"""Mining benchmark: 100 snippets for each of >= 1,000 new tokens from >= 100 MB of real
documentation, tokdist-ray's Ray Data miner against the reference approach, side by side
in one run.

Reference: tokenise documents in corpus order with the fast tokenizer (batched), find the
phrases' ids with Aho-Corasick (leftmost-longest, as the merge in training), keep each
token's first 100 distinct windows, skip tokens already full, stop when all are full or
the corpus ends.
tokdist-ray: `mine_corpus` with 1 and with 2 mining actors on a local 2-CPU Ray instance
started and warmed beforehand, as a running cluster would be (its start-up is reported
apart; starting the mining actors is inside the timed call). It mines in the ids of the
tokenizer expanded with the words as merges (`expand_with_merges`): windows of expanded
ids around each new id, for the words and for the intermediate merge tokens they need
(which the reference does not have: the table counts them apart). Its snippets are not
the reference's ids, so the check against the reference compares snippet counts per
word; the 1- and 2-worker runs are checked to give the very same snippets.

All of it on two corpora (`--megabytes`, default 100 and 400): starting the mining
actors is a fixed cost of some 3 s next to 10 s of mining at 100 MB, which bounds what a
second worker can gain there; at 400 MB mining dominates.

Corpus: the Python docs sources from python3.11-doc, then every other UTF-8 text under
/usr/share/doc (gzip opened; PostScript, tarballs and test logs left out; duplicate files
once) until 100 MB, large files cut into <= 64 KB documents at line breaks (repeated if
the files fall short), written once as parquet shards into $TOKDIST_RAY_CACHE/bench-mining-corpus.
Tokens: words of the corpus SmolLM2's tokenizer cuts into >= 3 pieces, 1,000 of them at
evenly spaced frequency ranks, from the most frequent to ones seen twice.

    python bench/bench_mining.py                # full run (about 15 min), prints the tables
    python bench/bench_mining.py --tokens 200 --megabytes 20   # a quick look

At scale (`--scale`, issue 15): the tokens a user expanding by thousands would get, the
next merges of continued BPE on the 103 MB corpus (pre-tokens counted on Ray, cached),
1k / 2k / 10k / 30k of them (`--sizes`; `--large-sizes` on the 471 MB corpus too), 16
snippets of 32 ids each (and 100 at the smallest size), mined by `mine_corpus` with 2
workers: wall time, MB/s, snippets, tokens short, the miners' CPU by scanner phase, and
peak memory of the driver and the miners. `--before REV` runs the TokenScanner of a git
revision side by side with today's, in process, taking turns part by part on the first
parts of the stream, and checks they give the very same snippets.

    python bench/bench_mining.py --scale --before fcfefc8 --sample-megabytes 2
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peak_memory import DRIVER, PeakMemory  # noqa: E402

from tokdist_ray.config import FileDataSource  # noqa: E402
from tokdist_ray.data.snippets import bos_prefix, window_around  # noqa: E402
from tokdist_ray.vocab.merges import MergeExpansion, expand_with_merges  # noqa: E402
from tokdist_ray.vocab.models import cache_root, load_tokenizer  # noqa: E402
from tokdist_ray.vocab.tokens import NewToken, phrase_ids  # noqa: E402

DOC_ROOT = Path("/usr/share/doc")
PY_SOURCES = DOC_ROOT / "python3.11/html/_sources"
SKIP = re.compile(r"(\.ps(\.gz)?|\.tar(\.gz)?|\.pdf|check\.log\.gz|test_results\.gz|jtreport.*)$")
MAX_DOC_CHARS = 64_000
SHARD_BYTES = 4_000_000
WORD = re.compile(r"(?<![A-Za-z0-9_]) [A-Za-z]{5,}(?![A-Za-z0-9_])")


# ---------------------------------------------------------------------- corpus
def _texts_of(path: Path) -> str | None:
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return text if "\0" not in text[:2000] and text.strip() else None


def _source_files(exclude: tuple[str, ...] = ()) -> list[Path]:
    python = sorted(PY_SOURCES.rglob("*.txt"))
    other = sorted(
        p for p in DOC_ROOT.rglob("*")
        if p.is_file() and not p.is_symlink() and "python3.11/html" not in str(p) and not SKIP.search(p.name)
    )
    return [p for p in python + other if not str(p).startswith(exclude)]


def _documents(text: str) -> list[str]:
    """Large files cut at line breaks into documents of at most MAX_DOC_CHARS."""
    docs, start = [], 0
    while start < len(text):
        end = len(text) if len(text) - start <= MAX_DOC_CHARS else text.rfind("\n", start, start + MAX_DOC_CHARS) + 1
        end = end if end > start else start + MAX_DOC_CHARS
        docs.append(text[start:end])
        start = end
    return docs


def build_corpus(directory: Path, megabytes: float, exclude: tuple[str, ...] = ()) -> list[str]:
    """Parquet shards (column `text`) of >= `megabytes` MB, built once, without the files
    under `exclude` (held-out text)."""
    done = directory / "DONE"
    if done.exists():
        return sorted(str(p) for p in directory.glob("*.parquet"))
    directory.mkdir(parents=True, exist_ok=True)
    docs, seen, unique = [], set(), 0
    for path in _source_files(exclude):
        text = _texts_of(path)
        digest = text and hashlib.sha1(text.encode()).digest()
        if text and digest not in seen:
            seen.add(digest)
            docs += _documents(text)
            unique += len(text.encode())
        if unique >= megabytes * 1e6:
            break
    copies = max(1, math.ceil(megabytes * 1e6 / unique))
    shard, size, index = [], 0, 0
    for doc in docs * copies:
        shard.append(doc)
        size += len(doc.encode())
        if size >= SHARD_BYTES:
            pq.write_table(pa.table({"text": shard}), directory / f"shard-{index:04d}.parquet")
            shard, size, index = [], 0, index + 1
    if shard:
        pq.write_table(pa.table({"text": shard}), directory / f"shard-{index:04d}.parquet")
    done.write_text(f"{len(docs)} documents, {unique / 1e6:.1f} MB unique, {copies} copies\n")
    return sorted(str(p) for p in directory.glob("*.parquet"))


def corpus_documents(shards: list[str]):
    for shard in shards:
        yield from pq.read_table(shard).column("text").to_pylist()


# ---------------------------------------------------------------------- tokens
def select_tokens(tokenizer, shards: list[str], n: int) -> list[NewToken]:
    """n over-fragmented words at evenly spaced frequency ranks, most frequent first."""
    counts = Counter()
    for doc in corpus_documents(shards):
        counts.update(WORD.findall(doc))
    fragmented = [w for w, c in counts.most_common() if c >= 2 and len(phrase_ids(tokenizer, w)) >= 3]
    step = max(1, len(fragmented) // n)
    return [NewToken(w, tuple(phrase_ids(tokenizer, w))) for w in fragmented[::step][:n]]


# ---------------------------------------------------------------------- reference
def reference_mine(shards, tokenizer, tokens, snippet_len, quota, batch_size=64):
    """Tokenise everything in order, Aho-Corasick over ids, first `quota` distinct per token."""
    import ahocorasick

    automaton = ahocorasick.Automaton(ahocorasick.STORE_ANY, ahocorasick.KEY_SEQUENCE)
    for index, token in enumerate(tokens):
        automaton.add_word(tuple(token.phrase_ids), (index, len(token.phrase_ids)))
    automaton.make_automaton()
    prefix = bos_prefix(tokenizer)
    found = [dict() for _ in tokens]  # index -> {snippet: phrase_start}, insertion-ordered
    open_tokens, scanned = len(tokens), 0

    def scan(batch):
        nonlocal open_tokens
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            for end, (index, length) in automaton.iter_long(tuple(ids)):
                if len(found[index]) >= quota:
                    continue
                window, offset = window_around(ids, end + 1 - length, length, snippet_len)
                snippet = tuple(prefix + window)
                if snippet not in found[index]:
                    found[index][snippet] = len(prefix) + offset
                    open_tokens -= len(found[index]) == quota

    batch = []
    for doc in corpus_documents(shards):
        if not doc.strip():
            continue
        batch.append(doc)
        scanned += len(doc.encode())
        if len(batch) == batch_size:
            scan(batch)
            batch = []
            if open_tokens == 0:
                break
    if batch and open_tokens:
        scan(batch)
    return found, scanned


# ---------------------------------------------------------------------- run
def start_warm_cluster() -> None:
    """A local 2-CPU Ray instance as a running cluster would be: an idle Python worker per
    CPU with Ray Data and the miner's module imported. Workers run at the driver's
    priority (Ray nices them to 15 by default, which on this machine, shared with other
    jobs, starves them and not the in-process reference)."""
    import ray
    import ray.data  # noqa: F401

    os.environ["RAY_worker_niceness"] = "0"
    ray.init(num_cpus=2, include_dashboard=False)

    @ray.remote(num_cpus=1)
    def warm() -> int:
        import ray.data  # noqa: F401

        import tokdist_ray.data.mining.mining  # noqa: F401

        return os.getpid()

    print(f"warm workers: {sorted(set(ray.get([warm.remote() for _ in range(2)])))}", flush=True)


@dataclass
class Run:
    name: str
    wall: float
    megabytes: float
    cpu: float  # the reference's process CPU time; the miners' CPU time summed
    found: list[dict]  # per word (the reference's tokens, in order): {snippet ids: token position}
    others: list[dict] = field(default_factory=list)  # tokdist-ray: per intermediate merge token
    first_batch: float = 0.0  # tokdist-ray: seconds to the first mined batch (actor start-up)
    streaming: float = 0.0  # tokdist-ray: MB/s after the first batch


def run_miner(shards, expansion: MergeExpansion, words: list[NewToken], snippet_len, quota, workers) -> Run:
    """`mine_corpus` in the expanded tokenizer's ids; snippets filed per word (the
    reference's tokens; a word the merges skipped has none) and per other new id."""
    from tokdist_ray.data.mining.mining import mine_corpus

    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        result = mine_corpus(FileDataSource(shards), expansion, snippet_len, quota, out_dir=out, seed=0,
                             num_workers=workers, count_bystanders=False)  # the reference's quotas
        seconds = time.perf_counter() - t
        rows = result.table().to_pylist()
    word_index = {w.text: i for i, w in enumerate(words)}
    other_texts = [t.text for t in expansion.tokens if t.text not in word_index]
    other_index = {text: i for i, text in enumerate(other_texts)}
    found, others = [dict() for _ in words], [dict() for _ in other_index]
    for row in rows:
        text = row["token"]
        target = found[word_index[text]] if text in word_index else others[other_index[text]]
        target[tuple(row["input_ids"])] = row["token_position"]
    report = result.report()
    name = f"tokdist-ray mine_corpus, {workers} worker{'s' if workers > 1 else ''}"
    print(f"{name}: {seconds:.1f} s, tokenised share {report['tokenised_share']:.1%}", flush=True)
    return Run(name, seconds, result.stats.bytes / 1e6, result.work.cpu_seconds, found, others,
               report["first_batch_seconds"], report["megabytes_per_second_after_first_batch"])


def best_runs(shards, expansion, tokens, args) -> dict[int, Run]:
    """The best wall time of `repeats` runs per number of workers, alternating 1 and 2."""
    best: dict[int, Run] = {}
    for _ in range(args.repeats):
        for workers in (1, 2):
            run = run_miner(shards, expansion, tokens, args.snippet_len, args.quota, workers)
            best[workers] = min(best.get(workers, run), run, key=lambda r: r.wall)
    return best


def print_table(runs: list[Run], quota: int, repeats: int) -> None:
    reference = runs[0]
    print(f"\n{'method':<34} {'wall s':>7} {'MB scanned':>11} {'CPU s':>7} {'snippets':>9} {'words full':>12} "
          f"{'+ other ids: snippets':>22} {'full':>10} {'speed-up':>9} {'1st batch s':>12} {'MB/s after':>11}")
    for run in runs:
        full = sum(len(f) == quota for f in run.found)
        others_full = sum(len(f) == quota for f in run.others)
        others = (f"{sum(map(len, run.others)):>22} {others_full:>5}/{len(run.others):<4}" if run is not reference
                  else f"{'-':>22} {'-':>10}")
        extra = f"{run.first_batch:>12.1f} {run.streaming:>11.1f}" if run is not reference else ""
        print(f"{run.name:<34} {run.wall:>7.1f} {run.megabytes:>11.1f} {run.cpu:>7.1f} {sum(map(len, run.found)):>9} "
              f"{full:>7}/{len(run.found):<4} {others} {reference.wall / run.wall:>8.1f}x {extra}")
    print(f"(snippets, words full: the {len(reference.found)} words the reference mines; other ids: the intermediate "
          "merge tokens tokdist-ray mines too, each with its own row to train; "
          f"tokdist-ray rows: best wall time of {repeats} runs; CPU s: the miners' own CPU time; "
          "1st batch s: start to the first mined part, mostly starting the actors; MB/s after: throughput after it)")
    one, two = runs[1], runs[2]
    print(f"2 workers vs 1: {one.wall / two.wall:.2f}x end to end, {two.streaming / one.streaming:.2f}x after the first batch")
    for run in runs[1:]:
        counts = [(len(a), len(b)) for a, b in zip(reference.found, run.found)]
        print(f"{run.name}: snippets per word agree with the reference for {sum(a == b for a, b in counts)}"
              f"/{len(counts)} words ({sum(b > a for a, b in counts)} with more, {sum(b < a for a, b in counts)} "
              f"with fewer; {sum(b for _, b in counts) - sum(a for a, _ in counts):+d} snippets in all)")
    same = one.found == two.found and one.others == two.others
    print(f"1 and 2 workers give the very same snippets: {same}")


# ---------------------------------------------------------------------- at scale
def learned_tokens(tokenizer, shards: list[str], n: int) -> tuple[list[str], dict]:
    """The next n merges of continued BPE on the pre-token counts of `shards` (counted on
    the running Ray instance), cached with the seconds they took."""
    from tokdist_ray.data.mining.pre_token_counts import count_pre_tokens
    from tokdist_ray.vocab.bpe_training import continue_bpe

    path = cache_root() / f"bench-mining-learned-{n}-{hashlib.sha1(' '.join(shards).encode()).hexdigest()[:8]}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        return saved["tokens"], saved["seconds"]
    t = time.perf_counter()
    counts = count_pre_tokens(FileDataSource(shards), tokenizer)
    counted = time.perf_counter() - t
    learned = continue_bpe(tokenizer, counts, n)
    seconds = {"count_pre_tokens": round(counted, 1), "merges": round(time.perf_counter() - t - counted, 1),
               "pre_tokens": len(counts)}
    path.write_text(json.dumps({"tokens": [t.text for t in learned], "seconds": seconds}))
    return [t.text for t in learned], seconds


@dataclass
class ScaleRun:
    tokens: int
    megabytes: float
    quota: int
    new_ids: int
    expand_s: float
    wall: float
    report: dict
    driver_mb: float
    miner_mb: float


def mine_at_scale(shards, expansion: MergeExpansion, n: int, quota: int, snippet_len: int, workers: int,
                  count_bystanders: bool) -> ScaleRun:
    from tokdist_ray.data.mining.mining import mine_corpus

    with tempfile.TemporaryDirectory() as out, PeakMemory(every_s=0.25) as memory:
        t = time.perf_counter()
        result = mine_corpus(FileDataSource(shards), expansion, snippet_len, quota, out_dir=out, seed=0,
                             num_workers=workers, count_bystanders=count_bystanders)
        wall = time.perf_counter() - t
        kept = pq.read_table(result.snippets_path, columns=["token_index"]).num_rows
    report = result.report() | {"snippets_kept": kept}
    run = ScaleRun(n, result.stats.bytes / 1e6, quota, len(expansion.tokens), 0.0, wall, report,
                   memory.largest(DRIVER) / 1e6, memory.largest("SnippetMiner") / 1e6)
    print(f"{n} tokens, quota {quota}, {run.megabytes:.0f} MB: {wall:.1f} s, {len(result.shortfall)} short, "
          f"phases {report['miner_cpu_seconds_by_phase']}", flush=True)
    return run


def print_scale_table(runs: list[ScaleRun], snippet_len: int) -> None:
    print(f"\n{'tokens':>7} {'new ids':>8} {'expand s':>9} {'MB':>5} {'quota':>6} {'wall s':>7} {'MB/s':>6} {'docs/s':>7} "
          f"{'snippets':>9} {'short':>13} {'tokenised':>10} {'miner CPU s':>12} {'search':>7} {'tokenise':>9} "
          f"{'settle':>7} {'driver MB':>10} {'miner MB':>9}")
    for run in runs:
        r, phases = run.report, run.report["miner_cpu_seconds_by_phase"]
        cpu = max(r["miner_cpu_seconds"], 1e-9)
        share = " ".join(f"{phases.get(p, 0) / cpu:>{w}.0%}" for p, w in (("search", 7), ("tokenise", 9), ("settle", 7)))
        short = f"{len(r['shortfall'])}/{len(r['snippets_per_token'])}"
        print(f"{run.tokens:>7} {run.new_ids:>8} {run.expand_s:>9.1f} {run.megabytes:>5.0f} {run.quota:>6} {run.wall:>7.1f} "
              f"{r['megabytes_per_second']:>6.2f} {r['documents_per_second']:>7.0f} "
              f"{r['snippets_kept']:>9} {short:>13} {r['tokenised_share']:>10.0%} {cpu:>12.1f} {share} "
              f"{run.driver_mb:>10.0f} {run.miner_mb:>9.0f}")
    print(f"(windows of {snippet_len} ids; short: tokens short of quota; tokenised: characters tokenised of those "
          "scanned; search/tokenise/settle: shares of the miners' CPU time; MB: peak resident memory)")


def scanner_at(revision: str):
    """TokenScanner as it was at a git revision, for side-by-side runs."""
    for where in ("tokdist_ray/data/mining/matching.py", "tokdist_ray/data/matching.py"):  # the latter before data/mining/
        shown = subprocess.run(["git", "show", f"{revision}:{where}"], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parents[1])
        if shown.returncode == 0:
            break
    shown.check_returncode()
    source = shown.stdout
    path = Path(tempfile.mkdtemp()) / f"matching_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = sys.modules[path.stem] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.TokenScanner


def first_parts(shards: list[str], megabytes: float) -> list[list[str]]:
    """The documents of the corpus's first parts in the miners' stream order (seed 0)."""
    from tokdist_ray.data.corpus.corpus_parts import TEXT, corpus_parts, read_part
    from tokdist_ray.data.corpus.file_source import PART_BYTES
    from tokdist_ray.data.corpus.files import resolve_files

    files = resolve_files(shards)
    parts, size = [], 0
    for part in corpus_parts(files, 0, PART_BYTES, split=True):
        docs = [t for block in read_part(files.filesystem, part, TEXT) for t in block[TEXT].to_pylist() if t and t.strip()]
        parts.append(docs)
        size += sum(map(len, docs))
        if size >= megabytes * 1e6:
            return parts
    return parts


class PartMiner:
    """A miner's work on parts in order, in process: per part and token the first `quota`
    distinct windows, and tokens it filled dropped from later parts (as SnippetMiner)."""

    def __init__(self, scan, n_tokens: int, quota: int):
        self.scan, self.quota = scan, quota
        self.open = set(range(n_tokens))
        self.passed: dict[int, set] = {}
        self.rows: list[tuple] = []
        self.cpu = 0.0

    def mine(self, docs: list[str]) -> None:
        cpu = time.process_time()
        taken: dict[int, set] = {}
        for hit in self.scan(docs, frozenset(self.open)):
            windows = taken.setdefault(hit.token_index, set())
            if len(windows) < self.quota and tuple(hit.window) not in windows:
                windows.add(tuple(hit.window))
                self.rows.append((hit.doc, hit.token_index, tuple(hit.window), hit.token_position))
                self.passed.setdefault(hit.token_index, set()).add(tuple(hit.window))
        self.open -= {t for t, windows in self.passed.items() if len(windows) >= self.quota}
        self.cpu += time.process_time() - cpu


def scanners_side_by_side(parts, expansion: MergeExpansion, revision: str, quota: int, snippet_len: int) -> dict:
    """The scanner at `revision` against today's on the same parts, taking turns part by
    part; their snippets must be the very same."""
    from tokdist_ray.data.mining.matching import TokenScanner

    backend, texts = expansion.tokenizer.backend_tokenizer, [t.text for t in expansion.tokens]
    before = scanner_at(revision)(backend, texts, expansion.new_start, snippet_len)
    after = TokenScanner(backend, texts, expansion.new_start, snippet_len)
    miners = {"before": PartMiner(before.scan, len(texts), quota),
              "after": PartMiner(lambda docs, open_set: after.scan(docs, open_set, quota), len(texts), quota)}
    for docs in parts:
        for miner in miners.values():
            miner.mine(docs)
    same = miners["before"].rows == miners["after"].rows
    return {"before": miners["before"].cpu, "after": miners["after"].cpu, "same": same,
            "snippets": len(miners["after"].rows), "phases": after.phase_seconds}


def scale_runs(args, n: int, corpora: dict) -> list[tuple[float, int]]:
    """(corpus, quota) of the runs with n tokens: every size on the smallest corpus, the
    --large-sizes on the largest, and the smallest size with --quota too."""
    small, large = min(corpora), max(corpora)
    runs = [(large, args.scale_quota)] if n in args.large_sizes and large != small else []
    runs += [(small, args.scale_quota)] if n in args.sizes else []
    return runs + ([(small, args.quota)] if n == min(args.sizes) and args.quota != args.scale_quota else [])


def main_scale(args, tokenizer) -> None:
    import ray

    corpora = {mb: build_corpus(cache_root() / f"bench-mining-corpus-{mb:g}MB", mb) for mb in args.scale_megabytes}
    os.environ["RAY_worker_niceness"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        texts, selection = learned_tokens(tokenizer, corpora[min(corpora)], max(args.sizes))
        print(f"continued BPE on the {min(corpora):g} MB corpus: {selection}", flush=True)
        runs, side_by_side = [], {}
        for n in sorted(set(args.sizes) | set(args.large_sizes)):
            t = time.perf_counter()
            expansion = expand_with_merges(tokenizer, texts[:n])
            expand_s = time.perf_counter() - t
            print(f"{n} tokens: {len(expansion.tokens)} new ids, {len(expansion.skipped)} skipped, expanded in "
                  f"{expand_s:.1f} s", flush=True)
            if args.before:
                parts = first_parts(corpora[max(corpora)], args.sample_megabytes)
                side_by_side[n] = scanners_side_by_side(parts, expansion, args.before, args.scale_quota, args.scale_snippet_len)
                print(f"  side by side on {args.sample_megabytes:g} MB: {side_by_side[n]}", flush=True)
            for mb, quota in scale_runs(args, n, corpora):
                runs.append(mine_at_scale(corpora[mb], expansion, n, quota, args.scale_snippet_len, 2,
                                          not args.main_only))
                runs[-1].expand_s = expand_s
    finally:
        ray.shutdown()
    print(f"\nquotas count {'the main token only' if args.main_only else 'the main token and its bystanders'}")
    print_scale_table(sorted(runs, key=lambda r: (-r.megabytes, r.tokens, r.quota)), args.scale_snippet_len)
    if side_by_side:
        print(f"\nscanner at {args.before} against today's, one in-process miner each, taking turns on the first "
              f"{args.sample_megabytes:g} MB of the stream (quota {args.scale_quota}, all tokens open at the start):")
        for n, r in side_by_side.items():
            print(f"{n:>7} tokens: before {r['before']:.1f} CPU s, after {r['after']:.1f} CPU s, "
                  f"{r['before'] / max(r['after'], 1e-9):.1f}x; {r['snippets']} snippets, the very same: {r['same']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", action="store_true",
                        help="continued-BPE tokens at --sizes on the corpora of --scale-megabytes, 2 workers")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 10000, 30000],
                        help="new tokens, mined on the smallest corpus")
    parser.add_argument("--large-sizes", type=int, nargs="+", default=[1000, 2000],
                        help="new tokens mined on the largest corpus too")
    parser.add_argument("--scale-megabytes", type=float, nargs="+", default=[400, 100],
                        help="corpora; tokens are learned on the smallest")
    parser.add_argument("--scale-quota", type=int, default=16)
    parser.add_argument("--scale-snippet-len", type=int, default=32)
    parser.add_argument("--main-only", action="store_true",
                        help="--scale: count a snippet toward its main token's quota only, not its bystanders'")
    parser.add_argument("--before", help="git revision whose TokenScanner runs side by side with today's")
    parser.add_argument("--sample-megabytes", type=float, default=4.0, help="for --before")
    parser.add_argument("--tokens", type=int, default=1000)
    parser.add_argument("--megabytes", type=float, nargs="+", default=[100, 400],
                        help="corpus sizes; the tokens come from the first")
    parser.add_argument("--quota", type=int, default=100)
    parser.add_argument("--snippet-len", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tokdist-ray setting, alternating")
    parser.add_argument("--model", default="bundled:smollm2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import ray

    tokenizer = load_tokenizer(args.model)
    if args.scale:
        main_scale(args, tokenizer)
        return
    corpora = {mb: build_corpus(cache_root() / f"bench-mining-corpus-{mb:g}MB", mb) for mb in args.megabytes}
    tokens = select_tokens(tokenizer, corpora[args.megabytes[0]], args.tokens)
    print(f"{len(tokens)} tokens, {sum(len(t.phrase_ids) for t in tokens) / len(tokens):.1f} pieces on average", flush=True)
    expansion = expand_with_merges(tokenizer, [t.text for t in tokens])  # tokdist-ray's side only
    print(f"expanded with merges: {expansion.n_requested} words + {len(expansion.intermediates)} intermediate "
          f"merge tokens = {len(expansion.tokens)} new ids mined by tokdist-ray; {len(expansion.skipped)} words "
          "skipped by the merges (no snippets on tokdist-ray's side)", flush=True)

    references = {}
    for mb, shards in corpora.items():  # before Ray starts: nothing else runs beside it
        t, cpu = time.perf_counter(), time.process_time()
        found, scanned = reference_mine(shards, tokenizer, tokens, args.snippet_len, args.quota)
        references[mb] = Run("reference (whole documents)", time.perf_counter() - t, scanned / 1e6,
                             time.process_time() - cpu, found)
        print(f"reference, {len(shards)} shards ({scanned / 1e6:.0f} MB scanned): {references[mb].wall:.1f} s", flush=True)

    t = time.perf_counter()
    start_warm_cluster()
    ray_start = time.perf_counter() - t
    try:
        best = {mb: best_runs(shards, expansion, tokens, args) for mb, shards in corpora.items()}
    finally:
        ray.shutdown()
    print(f"\nRay start-up and warm-up (not in the times below): {ray_start:.1f} s; load average {os.getloadavg()[0]:.1f}")
    for mb in corpora:
        print(f"\n== corpus of {references[mb].megabytes:.0f} MB")
        print_table([references[mb], best[mb][1], best[mb][2]], args.quota, args.repeats)


if __name__ == "__main__":
    main()
