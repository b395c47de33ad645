"""The Python API, compatible with the reference project's `TokenDistillation`.

    tokdist = TokenDistillation("bundled:smollm2", device="cpu")
    model, tokenizer = tokdist.run([" Krankenwagen"], data=FileDataSource("docs/"), out_path="out", save=True)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import torch

from tokdist_ray.config import (
    CORPUS_SOURCES,
    SNIPPET_SEED,
    CorpusSource,
    DistillationConfig,
    EvalConfig,
    GeneratedDataSource,
    OutputEmbeddingInit,
    OutputFitConfig,
    check_snippet_counts,
    corpus_paths,
)
from tokdist_ray.config import (
    output_emb_policy as checked_policy,
)
from tokdist_ray.config import (
    pre_init_strategy as checked_strategy,
)
from tokdist_ray.console import console_logging
from tokdist_ray.data.generation.local import generate_snippets
from tokdist_ray.data.mining.mining import mine_corpus
from tokdist_ray.data.snippets import snippets_to_table
from tokdist_ray.errors import ConfigError
from tokdist_ray.eval.heldout import Evaluation, evaluate_export
from tokdist_ray.export.gguf import GgufOptions, check_exportable, tokenizer_json_of
from tokdist_ray.export.hf import expand_model
from tokdist_ray.export.model import check_out_dir, save_model
from tokdist_ray.preflight import check_export_space, check_target_layer, check_writable_dir, model_config
from tokdist_ray.raycluster import ray_is_running
from tokdist_ray.report import expansion_report
from tokdist_ray.stages import collect_snippets, expand_tokens, fit_text, prune_tokens, split_by_snippets
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.training.distilled_rows import DistilledRows, FittedRows, positions_per_token, training_record
from tokdist_ray.training.fit_hook import OutputFit
from tokdist_ray.training.loop import train_local
from tokdist_ray.training.losses import check_methods
from tokdist_ray.training.output_fit import NOT_FITTED
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.snippet_files import corpus_windows
from tokdist_ray.training.step import TokenDistiller, bf16_supported
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import MERGES, MergeExpansion
from tokdist_ray.vocab.models import cache_root, load_model, load_tokenizer
from tokdist_ray.vocab.tokens import NewToken

log = logging.getLogger("tokdist_ray")


def default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


class TokenDistillation:
    """Add new tokens to a causal LM and learn their input embeddings by distillation."""

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        attn_impl: str | None = "sdpa",
        dtype: str | torch.dtype = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        console_logging()
        self.model_path = model_path
        self.device = torch.device(device or default_device())
        self.attn_impl = attn_impl
        self.dtype = dtype
        self.trust_remote_code = trust_remote_code
        model_config(model_path, trust_remote_code)  # refuses remote code in one line, before any weights
        self.tokenizer = load_tokenizer(model_path, trust_remote_code=trust_remote_code)
        self.model = self._load_model()
        self._last: _LastRun | None = None

    def _load_model(self):
        return load_model(
            self.model_path, dtype=self.dtype, device=self.device, attn_impl=self.attn_impl,
            trust_remote_code=self.trust_remote_code,
        )

    # ------------------------------------------------------------------ public
    def run(
        self,
        new_tokens: Sequence[str] | object,
        out_path: str | None = None,
        data: GeneratedDataSource | CorpusSource = GeneratedDataSource(),
        snippet_len: int = 50,
        snippets_per_token: int = 100,
        output_emb_policy: OutputEmbeddingInit = OutputEmbeddingInit.FIRST_PIECE,
        training: DistillationConfig = DistillationConfig(),
        pre_init_strategy: Literal["fvt", "adapti-vocab"] = "fvt",
        save: bool = False,
        *,
        min_snippets_per_token: int = 1,
        top_up_with_generation: bool | GeneratedDataSource = False,
        tokenizer_mode: Literal["merges", "added_tokens"] = MERGES,
        snippet_seed: int = SNIPPET_SEED,
        gguf: bool = False,
        gguf_dtype: Literal["f16", "bf16", "f32"] = "f16",
        gguf_pre: str | None = None,
        output_fit: OutputFitConfig = OutputFitConfig(),
    ):
        """Select tokens, expand the tokenizer, collect snippets, distill, and return
        (model, tokenizer).

        `new_tokens` is a list of strings or a target tokenizer (all of its tokens the
        model lacks). `tokenizer_mode`: "merges" (default) splices each new token into a
        BPE tokenizer as a vocabulary entry plus merges, so it is emitted exactly where
        BPE would build it; "added_tokens" is the reference's behaviour (Hugging Face
        added tokens, matched in raw text), and the fallback for tokenizers that are not
        BPE. Tokens with fewer than `min_snippets_per_token` snippets, after an optional
        top-up with generated snippets (`top_up_with_generation`: True for default
        sampling, or a GeneratedDataSource whose settings the top-up uses), are not
        distilled and keep their pre-initialised rows; the report lists them. A corpus
        is mined as the job mines it (`snippet_seed` orders the reading, like the job's
        snippets.seed): the same snippets whether or not Ray runs. `evaluate` then
        measures the result on held-out text. `gguf=True` (with save) also writes
        `out_path/model.gguf` for llama.cpp, its weights in `gguf_dtype`; `gguf_pre` names
        llama.cpp's pre-tokenizer where the export cannot tell it (export/gguf.py).
        With a corpus, the new output rows are then fitted to its text (`output_fit`,
        training/output_fit.py; `OutputFitConfig(enabled=False)` keeps the distilled ones):
        the returned model of a tied one is untied.
        """
        output_emb_policy, pre_init_strategy = checked_policy(output_emb_policy), checked_strategy(pre_init_strategy)
        self._check(out_path, save, snippet_len, snippets_per_token, min_snippets_per_token, training, data, output_fit)
        gguf_options = self._check_gguf(save, gguf_dtype, gguf_pre) if gguf else None
        if save:  # a full disk found now costs nothing; found at the export, it lost the run
            check_export_space("out_path", out_path, self.model_path, gguf_dtype if gguf else None)
        if self._last is not None:  # a previous run grew self.model: start clean
            self.model = self._load_model()
        timings: dict[str, float] = {}
        with _timed(timings, "select_tokens"):
            expansion = expand_tokens(self.tokenizer, new_tokens, tokenizer_mode)
        with _timed(timings, "snippets"):
            generate = self._generator(expansion, snippet_len, top_up_with_generation, data)
            mine = self._miner(data, expansion, snippet_len, snippets_per_token, snippet_seed, top_up_with_generation)
            snippets = collect_snippets(expansion, snippets_per_token, mine, generate, bool(top_up_with_generation))
        distilled, not_distilled = split_by_snippets(expansion.tokens, snippets.counts, min_snippets_per_token,
                                                     pre_init_strategy)
        kept = snippets.table.filter(pc.is_in(snippets.table["token"], pa.array([t.text for t in distilled], pa.string())))
        with _timed(timings, "distill"):
            trained = self._distill(expansion, kept, output_emb_policy, pre_init_strategy, training)
        texts = fit_text(None if isinstance(data, GeneratedDataSource) else data, output_fit, snippets.report, expansion)
        fitted = FittedRows(trained.rows, dict(NOT_FITTED))
        if texts:
            with _timed(timings, "output_fit"):
                windows = corpus_windows(*(kept[c].combine_chunks() for c in ("token", "input_ids", "source")),
                                         output_fit.snippets_per_token)
                fitted = OutputFit(output_fit, tuple(texts))(self.model, trained.rows, expansion, training, windows)
        pruning = prune_tokens(expansion, fitted.rows, fitted.summary, output_fit)
        expansion, rows = pruning.expansion, pruning.rows
        model = expand_model(self.model, expansion.new_start, rows["input"], rows.get("output"))
        report = expansion_report(
            self.model_path, expansion, pruning.training_record(trained.record),
            settings={"snippet_len": snippet_len, "snippets_per_token": snippets_per_token, "snippet_seed": snippet_seed,
                      "output_emb_policy": output_emb_policy.value, "pre_init_strategy": pre_init_strategy,
                      "training": dict(vars(training))},
            not_distilled=not_distilled, snippets={"source": type(data).__name__, **snippets.report}, timings_s=timings,
            output_fit=pruning.fit_summary(fitted.summary),
        )
        self._last = _LastRun(expansion, rows, report, snippet_len, training.target_layer, snippet_seed)
        if save:
            with _timed(timings, "export"):
                save_model(self.model_path, expansion, rows, out_path, report, model=model, gguf=gguf_options)
        return model, expansion.tokenizer

    @property
    def last_report(self) -> dict | None:
        """report.json of the last run (also when it was not saved)."""
        return self._last.report if self._last is not None else None

    def evaluate(self, heldout_paths: str | Sequence[str], out_path: str, settings: EvalConfig | None = None) -> dict:
        """The last run's rows on held-out text, as the job's evaluate stage measures them
        (bits per byte and compression against the baselines, drift), written to
        `out_path` (eval.json, eval.md, plots); returns its summary."""
        if self._last is None:
            raise ConfigError("evaluate needs a run first: call run(...) and then evaluate(...)")
        settings = dataclasses.replace(settings or EvalConfig(), heldout_paths=corpus_paths("heldout_paths", heldout_paths))
        check_writable_dir("out_path", out_path)
        last = self._last
        rows = {name: row.detach().cpu() for name, row in last.rows.items()}  # a Ray task may run on another device
        evaluation = Evaluation(self.model_path, last.expansion, rows, settings,
                                last.report["training"]["loss_curve"], last.snippet_len, last.target_layer,
                                last.snippet_seed, self.trust_remote_code)
        return evaluate_export(evaluation, Path(out_path))

    # ------------------------------------------------------------------ stages
    def _check(self, out_path, save: bool, snippet_len: int, per_token: int, min_per_token: int, training, data,
               output_fit) -> None:
        """What can be known before any work, as the job checks it."""
        if save and out_path is None:
            raise ConfigError("out_path must be given when save=True")
        if save:
            check_writable_dir("out_path", out_path)
            check_out_dir(out_path)
        check_snippet_counts(snippet_len, per_token, min_per_token)
        if not isinstance(training, DistillationConfig):
            raise ConfigError(f"training must be a DistillationConfig, not {type(training).__name__}")
        check_methods(training.loss_methods)
        if not isinstance(output_fit, OutputFitConfig):
            raise ConfigError(f"output_fit must be an OutputFitConfig, not {type(output_fit).__name__}")
        if not isinstance(data, (GeneratedDataSource, *CORPUS_SOURCES.values())):
            sources = ", ".join(cls.__name__ for cls in CORPUS_SOURCES.values())
            raise ConfigError(f"data must be GeneratedDataSource or a corpus source ({sources}), not {type(data).__name__}")
        check_target_layer(training.target_layer, self.model.config.get_text_config().num_hidden_layers)

    def _check_gguf(self, save: bool, dtype: str, pre: str | None) -> GgufOptions:
        """A GGUF export that cannot be written fails now, not after distillation."""
        if not save:
            raise ConfigError("gguf=True writes out_path/model.gguf with the saved model: pass save=True and out_path")
        options = GgufOptions(dtype, pre)
        check_exportable(self.model.config, tokenizer_json_of(self.tokenizer), pre)
        return options

    def _miner(self, data, expansion: MergeExpansion, snippet_len: int, quota: int, seed: int, top_up):
        """Corpus mining as the job's snippets stage does it: on the running Ray cluster if
        there is one, in this process otherwise (starting Ray costs more than a small
        run); cached under the tokdist_ray cache dir. None for generated data."""
        if isinstance(data, GeneratedDataSource):
            return None
        return partial(mine_corpus, data, expansion, snippet_len, quota, str(cache_root() / "mining"), seed,
                       top_up=bool(top_up), in_process=not ray_is_running())

    def _generator(self, expansion: MergeExpansion, snippet_len: int, top_up, data):
        """Generation in this process, on the model this object holds."""
        settings = data if isinstance(data, GeneratedDataSource) else (
            top_up if isinstance(top_up, GeneratedDataSource) else GeneratedDataSource())

        def generate(tokens: list[NewToken], counts: dict[str, int], indices: list[int]):
            rows, stats = generate_snippets(self.model, expansion, tokens, snippet_len, counts, settings,
                                            token_indices=indices, model_path=self.model_path)
            return snippets_to_table(rows), stats

        return generate

    def _distill(self, expansion: MergeExpansion, snippets: pa.Table, policy: OutputEmbeddingInit,
                 strategy: str, training: DistillationConfig) -> DistilledRows:
        tokens, new_start = expansion.tokens, expansion.new_start
        snippet_ids = snippets["input_ids"].combine_chunks()
        rows = initial_rows(self.model, [t.phrase_ids for t in tokens], policy, strategy, training.untie_word_embeddings)
        distiller = TokenDistiller.from_config(self.model, rows, new_start, training).to(self.device)
        examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), snippet_ids.to_pylist())
        log.info(
            "distilling %d tokens on %d snippets (%s, bf16 %s)", len(tokens), len(examples), self.device,
            "on" if training.mixed_precision and bf16_supported(self.device) else "off",
        )
        history = train_local(distiller, examples, training)
        trained = {"input": rows.input, **({"output": rows.output} if rows.output is not None else {})}
        counts = pc.value_counts(snippets["token"]).to_pylist()
        record = training_record(history.as_dict(), {c["values"]: c["counts"] for c in counts},
                                 positions_per_token(snippet_ids, new_start, len(tokens)))
        return DistilledRows({name: row.detach() for name, row in trained.items()}, record)


@dataclass
class _LastRun:
    """What `evaluate` needs of the last run."""

    expansion: MergeExpansion
    rows: dict[str, torch.Tensor]
    report: dict
    snippet_len: int
    target_layer: int
    snippet_seed: int


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 3)
