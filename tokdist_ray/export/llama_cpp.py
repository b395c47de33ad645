"""llama.cpp itself, built once from source, to check a GGUF export against and to generate with.

    llama = ensure_built()                      # the first call compiles (minutes), later ones reuse it
    tokenize(llama, "model.gguf", ["Le paquet source ..."])   # llama.cpp's ids, one list per text
    generate(llama, ["a.gguf", "b.gguf"], prompts, steps=32)  # decode steps, bytes and timings per model

    python -m tokdist_ray.export.llama_cpp build      # the same build, e.g. from an install script
    python -m tokdist_ray.export.llama_cpp tokenize model.gguf "some text"

The source is the llama-cpp-python sdist (VERSION, checked against SDIST_SHA256) from the package
index, fetched with pip: it vendors llama.cpp's source (vendor/llama.cpp) and ships the ctypes
bindings written for exactly that source. CMake builds only libllama and libggml (CPU backend,
GGML_NATIVE off: AVX2/FMA/F16C as the baseline, so a cached build runs on any AVX2 machine; no
OpenMP, CURL, tools, examples or server). The build lands in <cache>/llama.cpp/<VERSION>
(cache_root(): $TOKDIST_RAY_CACHE or ~/.cache/tokdist_ray) as lib/ (the shared libraries),
site/ (the bindings and their one pure-Python dependency missing from our own, diskcache) and
build.json (what was built, how long it took, its size); a file lock makes concurrent first
calls build it once. The source and the build tree are deleted afterwards.

The bindings rather than a tool binary: llama-tokenize prints ids but needs llama.cpp's `common`
library (as large a compile as libllama), and no CLI tool prints the ids it generates, which
the generation bench needs (the share of new tokens among them). The bindings call the same C
functions as llama-tokenize and llama-simple (llama_tokenize; llama_decode with a sampler chain).

llama.cpp runs in a child process (`python -m tokdist_ray.export.llama_cpp _serve`, one JSON
request on stdin, one JSON answer on stdout): an abort inside llama.cpp cannot take the caller
with it, and the caller's torch and its threads stay apart from ggml's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the llama.cpp that is built
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
DISKCACHE = "diskcache==5.6.3"  # imported by the bindings' package; numpy, jinja2, typing-extensions we have
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",  # portable: the x86 baseline is AVX2 + FMA + F16C + BMI2
    "-DGGML_OPENMP=OFF",  # ggml's own thread pool: no libgomp at run time
    "-DGGML_CCACHE=OFF",
    "-DLLAMA_BUILD_COMMON=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_TOOLS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DCMAKE_INSTALL_LIBDIR=lib",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",  # libllama finds libggml beside it
)
BUILD_JSON = "build.json"
# sampling settings of the "sampled" mode, as tokdist_ray/eval/generation.py's MODES
MODES = {"greedy": None, "sampled": {"temperature": 0.8, "top_p": 0.95}}


class LlamaCppError(RuntimeError):
    """llama.cpp could not be fetched, built or run; the message says what to do."""


@dataclass(frozen=True)
class LlamaCpp:
    """A finished build: lib/ and site/ under `root`, described by build.json."""

    root: Path

    @property
    def info(self) -> dict:
        return json.loads((self.root / BUILD_JSON).read_text(encoding="utf-8"))

    def environment(self) -> dict[str, str]:
        """The environment a process needs to `import llama_cpp` from this build."""
        package_parent = str(Path(__file__).resolve().parents[2])  # tokdist_ray itself, for `-m`
        path = os.pathsep.join(p for p in (str(self.root / "site"), package_parent, os.environ.get("PYTHONPATH")) if p)
        return {**os.environ, "PYTHONPATH": path, "LLAMA_CPP_LIB_PATH": str(self.root / "lib")}


def cache_dir() -> Path:
    """Where the build lives (vocab/models.py's cache root, read the same way)."""
    root = Path(os.environ.get("TOKDIST_RAY_CACHE") or Path.home() / ".cache" / "tokdist_ray")
    return root / "llama.cpp" / VERSION


def ensure_built(jobs: int = 2, log=print) -> LlamaCpp:
    """The cached build, built first if missing (or built with other flags). `jobs`: compile
    jobs at once. Raises LlamaCppError with the step that failed and the end of its log."""
    root = cache_dir()
    if _finished(root):
        return LlamaCpp(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building it: wait, then reuse its build
        if not _finished(root):
            _build(root, jobs, log)
    return LlamaCpp(root)


def _finished(root: Path) -> bool:
    try:
        info = json.loads((root / BUILD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return info.get("cmake_flags") == list(CMAKE_FLAGS) and any((root / "lib").glob("libllama.so*"))


def _run(step: str, command: list[str], log_file: Path, **kwargs) -> None:
    with open(log_file, "a", encoding="utf-8") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if done.returncode != 0:
        tail = "".join(log_file.read_text(encoding="utf-8", errors="replace").splitlines(True)[-25:])
        raise LlamaCppError(f"building llama.cpp failed at {step} (exit {done.returncode}); the whole log is "
                            f"{log_file}, its end:\n{tail}")


def _tool(name: str) -> str | None:
    here = Path(sys.executable).with_name(name)  # e.g. the venv's ninja, a dependency of ours
    return str(here) if here.exists() else shutil.which(name)


def _build(root: Path, jobs: int, log) -> None:
    for tool in ("cmake", "c++"):
        if _tool(tool) is None:
            raise LlamaCppError(f"building llama.cpp needs {tool}: apt-get install -y cmake g++ (Debian)")
    for stale in root.parent.glob(f".{VERSION}-*"):  # what a killed build left (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    started, cpu_before = time.perf_counter(), _children_cpu()
    work = Path(tempfile.mkdtemp(prefix=f".{VERSION}-", dir=root.parent))
    log_file = root.parent / f"{VERSION}-build.log"
    log_file.write_text("", encoding="utf-8")
    try:
        sdist = _sdist(work, log_file, log)
        log(f"llama.cpp: unpacking {sdist.name}")
        source, commit = _unpack(sdist, work / "src")
        out = work / "out"
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}"] if _tool("ninja") else []
        log(f"llama.cpp: compiling libllama and libggml with {jobs} jobs (minutes; log: {log_file})")
        _run("cmake configure", [_tool("cmake"), "-S", str(source / "vendor" / "llama.cpp"), "-B",
                                 str(work / "build"), *generator, *CMAKE_FLAGS, f"-DCMAKE_INSTALL_PREFIX={out}"],
             log_file)
        _run("compile", [_tool("cmake"), "--build", str(work / "build"), "-j", str(jobs)], log_file)
        _run("install", [_tool("cmake"), "--install", str(work / "build")], log_file)
        (work / "root" / "lib").mkdir(parents=True)
        for lib in (out / "lib").glob("lib*.so*"):
            shutil.copy2(lib, work / "root" / "lib", follow_symlinks=False)
        shutil.copytree(source / "llama_cpp", work / "root" / "site" / "llama_cpp")
        _run("pip install diskcache", [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                                       str(work / "root" / "site"), DISKCACHE], log_file)
        info = {"llama_cpp_python": VERSION, "sdist_sha256": SDIST_SHA256, "llama_cpp_commit": commit,
                "cmake_flags": list(CMAKE_FLAGS), "jobs": jobs, "wall_s": round(time.perf_counter() - started, 1),
                "cpu_s": round(_children_cpu() - cpu_before, 1), "bytes": _size(work / "root"),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (work / "root" / BUILD_JSON).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if root.exists():
            shutil.rmtree(root)  # a build with other flags
        os.replace(work / "root", root)
        log(f"llama.cpp: built in {info['wall_s']:.0f} s ({info['cpu_s']:.0f} s of CPU), "
            f"{info['bytes'] / 1e6:.1f} MB in {root}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _sdist(work: Path, log_file: Path, log) -> Path:
    """The sdist: $TOKDIST_RAY_LLAMA_CPP_SDIST (a file, for machines without the index), else
    pip download; its sha256 must be SDIST_SHA256."""
    given = os.environ.get("TOKDIST_RAY_LLAMA_CPP_SDIST")
    if given:
        sdist = Path(given)
    else:
        log(f"llama.cpp: downloading the llama-cpp-python {VERSION} sdist with pip")
        _run("pip download", [sys.executable, "-m", "pip", "download", "-q", f"llama-cpp-python=={VERSION}",
                              "--no-deps", "--no-binary", ":all:", "-d", str(work)], log_file)
        sdist = work / SDIST
    digest = hashlib.sha256()
    try:
        with open(sdist, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise LlamaCppError(f"cannot read the llama-cpp-python sdist {sdist}: {e}") from e
    if digest.hexdigest() != SDIST_SHA256:
        raise LlamaCppError(f"{sdist} has sha256 {digest.hexdigest()}, not {SDIST_SHA256} ({SDIST})")
    return sdist


def _unpack(sdist: Path, into: Path) -> tuple[Path, str | None]:
    """(the unpacked sdist: the vendored llama.cpp and the bindings' package, nothing else of
    it; llama.cpp's commit, as the sdist's record of its git submodule names it)."""
    top = SDIST.removesuffix(".tar.gz")
    wanted = (f"{top}/vendor/llama.cpp/", f"{top}/llama_cpp/")
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(wanted)]
        tar.extractall(into, members=members, filter="data")
        try:
            head = tar.extractfile(f"{top}/.git/modules/vendor/llama.cpp/HEAD")
            commit = head.read().decode().strip() if head else None
        except KeyError:
            commit = None
    return into / top, commit


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() or p.is_symlink())


# ------------------------------------------------------------------ calls into llama.cpp
def _call(llama: LlamaCpp, request: dict, timeout: float | None = None) -> dict:
    """One request, answered by a child process that loads llama.cpp."""
    done = subprocess.run([sys.executable, "-m", "tokdist_ray.export.llama_cpp", "_serve"], input=json.dumps(request),
                          capture_output=True, text=True, env=llama.environment(), timeout=timeout)
    if done.returncode != 0:
        raise LlamaCppError(f"llama.cpp ({request['op']}) exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def tokenize(llama: LlamaCpp, gguf_file: str | Path, texts: Sequence[str], add_special: bool = False,
             parse_special: bool = False) -> list[list[int]]:
    """llama.cpp's ids for each text, as llama-tokenize prints them: `add_special` adds
    BOS/EOS where the GGUF says to, `parse_special` reads special tokens' text as those tokens."""
    request = {"op": "tokenize", "gguf": str(gguf_file), "texts": list(texts), "add_special": add_special,
               "parse_special": parse_special}
    return _call(llama, request)["ids"]


def generate(llama: LlamaCpp, gguf_files: Sequence[str | Path], prompts: Sequence[str], steps: int,
             modes: Sequence[str] = tuple(MODES), seed: int = 0, rounds: int = 3, threads: int | None = None,
             timeout: float | None = None) -> dict:
    """Each model continues each prompt for `steps` decode steps (its end-of-generation
    tokens suppressed, so every model decodes the same number of steps), one prompt at a
    time, in each of `modes` ("greedy"; "sampled": temperature 0.8, top-p 0.95, seeded per
    prompt). Each prompt starts with BOS (EOS where there is none), as the evaluate stage's
    prompts do. The models take turns prompt by prompt for `rounds` timed rounds after an
    untimed warm-up round; each prompt's fastest round counts. Returns {gguf file:
    {"prompt_tokens", "prefill_s", mode: {"ids": [[...] per prompt], "bytes": generated
    UTF-8 bytes, "decode_steps", "seconds", "text": the first prompt's continuation}}};
    seconds are the decode steps' only, the prompts' prefill is timed apart."""
    request = {"op": "generate", "ggufs": [str(g) for g in gguf_files], "prompts": list(prompts), "steps": steps,
               "modes": list(modes), "seed": seed, "rounds": rounds, "threads": threads or os.cpu_count()}
    return _call(llama, request, timeout)["models"]


# ------------------------------------------------------------------ the child process
@contextlib.contextmanager
def _model(L, path: str, vocab_only: bool):
    params = L.llama_model_default_params()
    params.vocab_only = vocab_only
    model = L.llama_model_load_from_file(path.encode(), params)
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {path}")
    try:
        yield model
    finally:
        L.llama_model_free(model)


def _tokenize(L, vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    size = len(data) + 8
    while True:
        buffer = (L.llama_token * size)()
        n = L.llama_tokenize(vocab, data, len(data), buffer, size, add_special, parse_special)
        if n >= 0:
            return list(buffer[:n])
        size = -n


def _detokenize(L, vocab, ids: list[int]) -> bytes:
    size = 8 * len(ids) + 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = L.llama_detokenize(vocab, (L.llama_token * len(ids))(*ids), len(ids), buffer, size, False, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


def _end_of_generation(L, vocab) -> list[int]:
    return [t for t in range(L.llama_vocab_n_tokens(vocab)) if L.llama_vocab_is_eog(vocab, t)]


def _sampler(L, vocab, banned: list[int], mode: str, seed: int):
    """The sampler chain of `mode`, with the `banned` tokens' logits at -inf."""
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    biases = (L.llama_logit_bias * len(banned))(*[L.llama_logit_bias(t, float("-inf")) for t in banned])
    L.llama_sampler_chain_add(chain, L.llama_sampler_init_logit_bias(L.llama_vocab_n_tokens(vocab), len(banned), biases))
    settings = MODES[mode]
    if settings is None:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    else:  # temperature, then top-p, then a seeded draw: the order transformers applies them in
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(settings["temperature"]))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(settings["top_p"], 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain


def _continue(L, ctx, prompt_ids: list[int], steps: int, sampler) -> tuple[list[int], float, float]:
    """(generated ids, prefill seconds, decode seconds) for one prompt, from an empty KV cache."""
    L.llama_memory_clear(L.llama_get_memory(ctx), True)
    started = time.perf_counter()
    prompt = (L.llama_token * len(prompt_ids))(*prompt_ids)
    if L.llama_decode(ctx, L.llama_batch_get_one(prompt, len(prompt_ids))) != 0:
        raise LlamaCppError("llama_decode failed on the prompt")
    prefilled = time.perf_counter()
    generated, token = [], (L.llama_token * 1)()
    for _ in range(steps):
        token[0] = L.llama_sampler_sample(sampler, ctx, -1)
        generated.append(token[0])
        if len(generated) < steps and L.llama_decode(ctx, L.llama_batch_get_one(token, 1)) != 0:
            raise LlamaCppError("llama_decode failed while generating")
    return generated, prefilled - started, time.perf_counter() - prefilled


@dataclass
class _Side:
    """One model in the child process: its context, prompts as ids, and the fastest timings so far."""

    ctx: object
    vocab: object
    prompts: list[list[int]]
    banned: list[int]
    prefill_s: list[float]
    ids: dict[str, list]
    seconds: dict[str, list[float]]


def _open_side(L, stack: contextlib.ExitStack, path: str, prompts: Sequence[str], steps: int, threads: int,
               modes: Sequence[str]) -> _Side:
    model = stack.enter_context(_model(L, path, vocab_only=False))
    vocab = L.llama_model_get_vocab(model)
    start = L.llama_vocab_bos(vocab) if L.llama_vocab_bos(vocab) >= 0 else L.llama_vocab_eos(vocab)
    ids = [[start, *_tokenize(L, vocab, p, False, False)] for p in prompts]
    params = L.llama_context_default_params()
    params.n_ctx = max(map(len, ids)) + steps + 8
    params.n_batch = params.n_ubatch = max(512, params.n_ctx)
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    if not ctx:
        raise LlamaCppError(f"llama.cpp could not make a context for {path}")
    stack.callback(L.llama_free, ctx)
    inf = [float("inf")] * len(ids)
    return _Side(ctx, vocab, ids, _end_of_generation(L, vocab), list(inf), {m: [None] * len(ids) for m in modes},
                 {m: list(inf) for m in modes})


def _generate(L, request: dict) -> dict:
    """The models take turns prompt by prompt (a burst of other work on the machine hits
    both alike), and each prompt keeps its fastest round: per-prompt minima, summed. Each
    prompt's sampler is seeded with seed + its index, so the order of the runs changes no id."""
    steps, modes = request["steps"], request["modes"]
    with contextlib.ExitStack() as stack:
        sides = {path: _open_side(L, stack, path, request["prompts"], steps, request["threads"], modes)
                 for path in request["ggufs"]}
        for i in range(request["rounds"] + 1):  # round 0 warms each up, untimed
            for mode in modes:
                for k in range(len(request["prompts"])):
                    for side in sides.values():
                        sampler = _sampler(L, side.vocab, side.banned, mode, request["seed"] + k)
                        try:
                            ids, prefill_s, decode_s = _continue(L, side.ctx, side.prompts[k], steps if i else 2,
                                                                 sampler)
                        finally:
                            L.llama_sampler_free(sampler)
                        if i:
                            side.prefill_s[k] = min(side.prefill_s[k], prefill_s)
                            side.seconds[mode][k] = min(side.seconds[mode][k], decode_s)
                            side.ids[mode][k] = ids
        out = {}
        for path, side in sides.items():
            out[path] = {"prompt_tokens": sum(map(len, side.prompts)), "prefill_s": sum(side.prefill_s)}
            for mode in modes:
                generated = side.ids[mode]
                out[path][mode] = {"ids": generated, "decode_steps": sum(map(len, generated)),
                                   "seconds": sum(side.seconds[mode]),
                                   "bytes": sum(len(_detokenize(L, side.vocab, g)) for g in generated),
                                   "text": _detokenize(L, side.vocab, generated[0]).decode("utf-8", "replace")}
    return {"models": out}


def _serve() -> None:
    request = json.loads(sys.stdin.read())
    import llama_cpp as L  # noqa: N812 (the bindings, from the build's site/; LLAMA_CPP_LIB_PATH names its lib/)

    global _LOG
    _LOG = _errors_only(L)  # held: ctypes frees a callback nobody references
    L.llama_log_set(_LOG, None)
    L.llama_backend_init()
    if request["op"] == "tokenize":
        with _model(L, request["gguf"], vocab_only=True) as model:
            vocab = L.llama_model_get_vocab(model)
            ids = [_tokenize(L, vocab, t, request["add_special"], request["parse_special"]) for t in request["texts"]]
        answer = {"ids": ids}
    elif request["op"] == "generate":
        answer = _generate(L, request)
    else:
        raise LlamaCppError(f"unknown request {request['op']!r}")
    sys.stdout.write(json.dumps(answer))


def _errors_only(L):
    """A llama.cpp log callback that passes on errors only (llama.cpp logs every load)."""

    @L.llama_log_callback
    def log(level, text, user_data):
        if level == 4:  # GGML_LOG_LEVEL_ERROR (5 continues any earlier line)
            sys.stderr.write(ctypes.cast(text, ctypes.c_char_p).value.decode("utf-8", "replace"))

    return log


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tokdist_ray.export.llama_cpp", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help=f"build llama.cpp into {cache_dir()} unless it is there")
    build.add_argument("--jobs", type=int, default=2)
    tok = commands.add_parser("tokenize", help="print llama.cpp's ids of TEXT under a GGUF's tokenizer")
    tok.add_argument("gguf")
    tok.add_argument("text")
    commands.add_parser("_serve")
    args = parser.parse_args(argv)
    if args.command == "_serve":
        _serve()
        return 0
    try:
        if args.command == "build":
            llama = ensure_built(args.jobs)
            print(json.dumps(llama.info, indent=2))
        else:
            print(tokenize(ensure_built(), args.gguf, [args.text])[0])
    except LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


_LOG = None

if __name__ == "__main__":
    sys.exit(main())
