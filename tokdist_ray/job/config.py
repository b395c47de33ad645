"""The job's one config: a YAML file plus command-line overrides, validated up front.

    python jobs/expand_vocab.py --config jobs/configs/demo_cpu.yaml --training.learning_rate 5e-4

Sections reuse the API's dataclasses (`training` is a DistillationConfig, `generation` a
GeneratedDataSource, `distributed` a DistributedConfig), so one option means the same
thing everywhere. Unknown keys, wrong types and bad values fail before any work starts,
with the key, what was given, and what is allowed. The reference project's `example.py`
flags (`--model_path`, `--new_tokens`, `--dataset_path`, ...) are accepted too.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tokdist_ray.config import (
    CORPUS_SOURCES,
    SNIPPET_SEED,
    CorpusSource,
    DistillationConfig,
    DistributedConfig,
    EvalConfig,
    FileDataSource,
    GeneratedDataSource,
    HFDataSource,
    OutputEmbeddingInit,
    OutputFitConfig,
    check_snippet_counts,
    count_at_least_one,
    has_lone_surrogate,
    output_emb_policy,
    pre_init_strategy,
)
from tokdist_ray.data.budget import BUDGETS
from tokdist_ray.errors import ConfigError
from tokdist_ray.training.losses import check_methods

TOKEN_SOURCES = ("list", "file", "target_tokenizer", "from_corpus")
SELECTIONS = ("bpe", "words")
TOKENIZER_MODES = ("merges", "added_tokens")  # vocab.merges.MODES, without importing transformers
GGUF_DTYPES = ("f16", "bf16", "f32")  # export.gguf.DTYPES, without importing torch
# the job's stages in the order they run (tokdist_ray/stages.py: the work they share with the API)
STAGES = ("tokens", "snippets", "distill", "fit", "export", "evaluate")
GGUF_OPTIONS = ("gguf", "gguf_dtype", "gguf_pre")  # of OutputConfig: how the model is exported, not trained


@dataclass
class TokensConfig:
    """Where the new tokens come from (exactly one of the four)."""

    list: typing.List[str] | None = None  # noqa: UP006 - `list` is a field name here
    file: str | None = None  # .txt (one per line, leading spaces kept) or .json list
    target_tokenizer: str | None = None  # every token of this tokenizer the model lacks
    from_corpus: int | None = None  # N tokens chosen from the corpus (see selection)
    selection: str = "bpe"  # from_corpus: "bpe" (the N next merges of continued BPE) or "words"
    min_count: int = 2  # from_corpus: a chosen token occurs at least this often in the corpus
    max_chars: int = 24  # from_corpus, selection bpe: longest token, in characters
    min_pieces: int = 3  # from_corpus, selection words: only words split into at least this many ids
    tokenizer_mode: str = "merges"  # "merges" (BPE merges, the default) or "added_tokens" (the reference's)

    def __post_init__(self):
        for i, token in enumerate(self.list or [], 1):  # it failed after the run had started
            if has_lone_surrogate(token):
                raise ConfigError(f"tokens.list: entry {i} ({token!r}) holds a lone surrogate, which is no character "
                                  "(a byte that is not UTF-8, or half of a \\uXXXX\\uXXXX pair); write it in UTF-8")
        _one_of("tokens.selection", self.selection, SELECTIONS)
        _one_of("tokens.tokenizer_mode", self.tokenizer_mode, TOKENIZER_MODES)
        _at_least_one(self, "min_count", "max_chars", "min_pieces")


@dataclass
class DataConfig:
    """The corpus to mine, a tagged union of the API's corpus sources: `source` names one
    (files: FileDataSource, hf: HFDataSource; config.CORPUS_SOURCES) and its own settings
    sit beside it (`paths`, or `dataset_path`, `split`, ...); `source: generated` for no
    corpus, which leaves any corpus settings unused."""

    source: str = "files"
    corpus: CorpusSource | None = None  # built from `source` and its settings (data_config)
    top_up_with_generation: bool = False  # fill tokens the corpus leaves short
    # mining actors; default: the CPUs of the nodes up, or of the CPU node types an autoscaler can launch
    num_workers: int | None = None

    def __post_init__(self) -> None:
        count_at_least_one("num_workers", self.num_workers, optional=True)
        if self.corpus is not None:  # built in Python: the tag follows the source
            self.source = {cls: name for name, cls in CORPUS_SOURCES.items()}[type(self.corpus)]


DATA_OPTIONS = ("source", "top_up_with_generation", "num_workers")  # the job's own; the rest are the source's
API_ONLY = ("map_to_text_fn",)  # settings a YAML file cannot hold (a Python function)


def data_config(values: dict | None) -> DataConfig:
    """The data section: its own options, and the settings of the source it names built
    into that source's class, each key checked against it."""
    values = dict(values or {})
    own = {k: values.pop(k) for k in DATA_OPTIONS if k in values}
    data = _build_fields(DataConfig, own, "data")
    _one_of("data.source", data.source, (*CORPUS_SOURCES, "generated"))
    if data.source == "generated":
        return data
    source = CORPUS_SOURCES[data.source]
    if "map_to_text_fn" in values:
        raise ConfigError("data.map_to_text_fn takes a Python function, which the Python API passes; in a job, name "
                          "the column that holds the text with data.text_column")
    settable = [f.name for f in dataclasses.fields(source) if f.init and f.name not in API_ONLY]
    for key in values:
        if key not in settable:
            close = difflib.get_close_matches(key, settable + list(DATA_OPTIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown option 'data.{key}' for data.source {data.source}{hint} Options here: "
                              f"{', '.join(list(DATA_OPTIONS) + settable)}")
    if source is HFDataSource:  # its one setting without a default
        if not values.get("dataset_path"):
            raise ConfigError("data.dataset_path is required for data.source: hf (e.g. HuggingFaceFW/fineweb-2)")
    data.corpus = _build_fields(source, values, "data")
    return data


@dataclass
class SnippetsConfig:
    snippet_len: int = 50
    snippets_per_token: int = 100
    min_snippets_per_token: int = 1  # tokens with fewer are skipped and reported
    # a snippet counts toward every new token it holds, not only the one it was cut around:
    # each is trained on it, and at thousands of tokens most snippets hold several
    count_bystanders: bool = True
    seed: int = SNIPPET_SEED
    # per_token: snippets_per_token each; by_frequency: the same total spread by the tokens'
    # corpus counts (tokens.from_corpus), within [min_snippets_per_token, 10 x snippets_per_token]
    budget: str = "per_token"

    def __post_init__(self) -> None:
        check_snippet_counts(self.snippet_len, self.snippets_per_token, self.min_snippets_per_token)
        if self.budget not in BUDGETS:
            raise ConfigError(f"snippets.budget must be one of {list(BUDGETS)}, got {self.budget!r}")


@dataclass
class OutputConfig:
    # untied models' new output rows; the reference trains them (train_with_ce), the first
    # piece's rows predict the new tokens far better (bench/README.md, "Language shift")
    emb_policy: str = OutputEmbeddingInit.FIRST_PIECE.value
    pre_init_strategy: str = "fvt"
    # also <out_path>/model.gguf for llama.cpp (Llama, Mistral, Qwen2 with byte-level BPE tokenizers)
    gguf: bool = False
    gguf_dtype: str = "f16"  # its 2-D weights: f16, bf16 or f32 (norms are f32 always)
    gguf_pre: str | None = None  # llama.cpp's pre-tokenizer name, where the export cannot tell it

    def __post_init__(self) -> None:  # the API's own checks, so both accept the same values
        output_emb_policy(self.emb_policy)
        pre_init_strategy(self.pre_init_strategy)
        _one_of("output.gguf_dtype", self.gguf_dtype, GGUF_DTYPES)
        if self.gguf_pre is not None and not self.gguf_pre.strip():
            raise ConfigError("output.gguf_pre is empty; name llama.cpp's pre-tokenizer (e.g. llama-bpe) or leave it out")


@dataclass
class JobConfig:
    model: str = "bundled:smollm2"  # HF dir, hub id, .gguf file, or bundled:smollm2
    run_dir: str = "runs/demo"  # every stage writes under it; a rerun skips finished stages
    out_path: str | None = None  # the expanded model; default <run_dir>/model
    trust_remote_code: bool = False
    tokens: TokensConfig = field(default_factory=TokensConfig)
    data: DataConfig = field(default_factory=lambda: data_config(None))
    snippets: SnippetsConfig = field(default_factory=SnippetsConfig)
    generation: GeneratedDataSource = field(default_factory=GeneratedDataSource)
    training: DistillationConfig = field(default_factory=DistillationConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    output_fit: OutputFitConfig = field(default_factory=OutputFitConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def model_dir(self) -> Path:
        return Path(self.out_path) if self.out_path else Path(self.run_dir) / "model"

    def validate(self) -> "JobConfig":
        """Rules across options; each section's own values are checked where it is declared
        (its `__post_init__`, or the API dataclass it reuses)."""
        for key in ("run_dir", "out_path"):
            if getattr(self, key) is not None and not str(getattr(self, key)).strip():
                raise ConfigError(f"{key} is empty; name a directory (e.g. --run_dir runs/my-expansion)")
        given = [k for k in TOKEN_SOURCES if getattr(self.tokens, k)]
        if len(given) != 1:
            raise ConfigError(
                f"tokens: give exactly one of list, file, target_tokenizer, from_corpus (got {given or 'none'}), "
                "e.g. --tokens.list ' Krankenwagen, Schmetterling'"
            )
        if isinstance(self.data.corpus, FileDataSource) and not self.data.corpus.paths:
            raise ConfigError("data.paths is empty; name corpus files, directories or globs (or set data.source: generated)")
        if self.tokens.from_corpus and self.data.source == "generated":
            raise ConfigError("tokens.from_corpus needs a corpus; set data.source to files or hf")
        try:
            check_methods(self.training.loss_methods)
        except ConfigError as e:
            raise ConfigError(f"training: {e}") from None
        return self


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {list(allowed)}")


def _at_least_one(section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(section, name)}")


# ------------------------------------------------------------------ building from dicts
def _coerce(key: str, value: Any, kind: Any) -> Any:
    """Check `value` against a dataclass field's annotation, converting CLI strings."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        # a string where a list may stand (paths: "a, b") is a comma-separated list, as for list fields
        lists_first = sorted((a for a in args if a is not type(None)), key=lambda a: typing.get_origin(a) is not list)
        errors = []
        for arg in lists_first:
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(kind):
        return build(kind, value, key)
    if origin in (list, tuple, collections.abc.Sequence) or kind in (list, tuple):
        if isinstance(value, str):  # "--tokens.list ' a, b'": comma separated, spaces kept
            value = value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = kind(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {value!r}") from None
        if kind is int and (isinstance(number, float) and not number.is_integer() or not isinstance(number, (int, float))):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return kind(number)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if kind is dict and not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    return value


def build(cls, values: dict | None, prefix: str = ""):
    """`cls(**values)` with every key checked: typos get a 'did you mean'."""
    if values is not None and not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of options, got {values!r}")
    if cls is DataConfig:
        return data_config(values)
    return _build_fields(cls, values, prefix)


def _build_fields(cls, values: dict | None, prefix: str):
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of options, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown option {full!r}{hint} Options here: {', '.join(names)}")
        kwargs[key] = _coerce(full, value, hints[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # a section's own check: name the section too
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from None


# ------------------------------------------------------------------ YAML + overrides
# The reference project's example.py flags, mapped onto this config.
REFERENCE_FLAGS = {
    "model_path": "model",
    "new_tokens": "tokens.list",
    "out_path": "out_path",
    "dataset_path": "data.dataset_path",
    "dataset_name": "data.name",
    "dataset_split": "data.split",
    "max_docs": "data.max_docs",
    "snippet_len": "snippets.snippet_len",
    "snippets_per_token": "snippets.snippets_per_token",
    "learning_rate": "training.learning_rate",
    "epochs": "training.epochs",
    "batch_size": "training.batch_size",
    "seed": "training.seed",
    "target_layer": "training.target_layer",
    "loss_methods": "training.loss_methods",
    "mixed_precision": "training.mixed_precision",
    "output_emb_policy": "output.emb_policy",
    "pre_init_strategy": "output.pre_init_strategy",
}


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`--a.b value` or `--a.b=value` pairs into {"a.b": "value"}."""
    overrides, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like --training.learning_rate 1e-4")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"option --{key} needs a value")
            value, i = args[i + 1], i + 1
        overrides[REFERENCE_FLAGS.get(key, key)] = value
        i += 1
    return overrides


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part!r} must be a mapping of options, got {node!r}")
    node[leaf] = value


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load, without aliases: each `*name` is a full copy of what it names, so a few
    lines of nested ones (a "billion laughs") ran for minutes and took gigabytes."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            alias = self.peek_event()
            raise ConfigError(f"uses a YAML alias (*{alias.anchor}) at line {alias.start_mark.line + 1}, "
                              f"column {alias.start_mark.column + 1}; job configs allow none: write the value out")
        return super().compose_node(parent, index)


def _read_yaml(path: str) -> dict:
    if Path(path).is_dir():
        raise ConfigError(f"config file {path} is a directory; name a YAML file, e.g. jobs/configs/demo_cpu.yaml")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_NoAliasLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"config file {path} {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections (model:, tokens:, data:, ...), got {tree!r}")
    return tree


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    tree = _read_yaml(path) if path else {}
    overrides = dict(overrides or {})
    if "data.dataset_path" in overrides and "data.source" not in overrides:
        overrides["data.source"] = "hf"  # the reference's --dataset_path means a HF dataset
    if any(f"tokens.{k}" in overrides for k in TOKEN_SOURCES):  # the command line's choice replaces the file's
        overrides = {f"tokens.{k}": None for k in TOKEN_SOURCES} | overrides
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return build(JobConfig, tree).validate()


def config_dict(config: JobConfig) -> dict:
    """A plain, YAML-safe dict of the config (for reports and stage fingerprints)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return repr(value)

    return plain(config)
