"""The Python API, compatible with the reference project's `TokenDistillation`.

    tokdist = TokenDistillation("bundled:smollm2", device="cpu")
    model, tokenizer = tokdist.run([" Krankenwagen"], data=FileDataSource("docs/"), out_path="out", save=True)
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Literal, Sequence

import torch
from transformers import PreTrainedTokenizerBase

from tokdist_ray.config import (
    DistillationConfig,
    FileDataSource,
    GeneratedDataSource,
    HFDataSource,
    OutputEmbeddingInit,
    check_snippet_counts,
)
from tokdist_ray.config import (
    output_emb_policy as checked_policy,
)
from tokdist_ray.config import (
    pre_init_strategy as checked_strategy,
)
from tokdist_ray.console import console_logging
from tokdist_ray.data.corpus import documents
from tokdist_ray.data.generation.local import generate_snippets
from tokdist_ray.data.local_mining import mine_snippets
from tokdist_ray.data.mining import mine_corpus
from tokdist_ray.errors import ConfigError
from tokdist_ray.preflight import check_target_layer, check_writable_dir, model_config
from tokdist_ray.raycluster import ray_is_running
from tokdist_ray.report import expansion_report, positions_per_token
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.training.checkpoint import check_finite
from tokdist_ray.training.local import train_local
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.training.step import NewRows, TokenDistiller, bf16_supported
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.expansion_files import expansion_summary
from tokdist_ray.vocab.export import expand_model, save_expanded
from tokdist_ray.vocab.merges import ADDED_TOKENS, MERGES, SKIP, MergeExpansion, expand_with_merges
from tokdist_ray.vocab.models import cache_root, load_model, load_tokenizer, ties_word_embeddings
from tokdist_ray.vocab.tokens import NewToken, not_distilled_note, tokens_to_distill

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
        self.last_report: dict | None = None

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
        data: GeneratedDataSource | HFDataSource | FileDataSource = GeneratedDataSource(),
        snippet_len: int = 50,
        snippets_per_token: int = 100,
        output_emb_policy: OutputEmbeddingInit = OutputEmbeddingInit.TRAIN_WITH_CE,
        training: DistillationConfig = DistillationConfig(),
        pre_init_strategy: Literal["fvt", "adapti-vocab"] = "fvt",
        save: bool = False,
        *,
        min_snippets_per_token: int = 1,
        top_up_with_generation: bool | GeneratedDataSource = False,
        tokenizer_mode: Literal["merges", "added_tokens"] = MERGES,
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
        distilled and keep their pre-initialised rows; the report lists them.
        """
        output_emb_policy, pre_init_strategy = checked_policy(output_emb_policy), checked_strategy(pre_init_strategy)
        self._check(out_path, save, snippet_len, snippets_per_token, min_snippets_per_token, training)
        if getattr(self, "_expanded", False):  # a previous run grew self.model: start clean
            self.model = self._load_model()
        timings: dict[str, float] = {}
        t = time.perf_counter()

        # a target tokenizer's tokens that merges cannot produce enter as added tokens
        from_target = isinstance(new_tokens, PreTrainedTokenizerBase)
        expansion = expand_with_merges(self.tokenizer, new_tokens, tokenizer_mode, ADDED_TOKENS if from_target else SKIP)
        log.info("%d new tokens (%s, %d intermediate), %d candidates skipped", expansion.n_requested,
                 expansion.mode, len(expansion.intermediates), len(expansion.skipped))
        timings["select_tokens"] = time.perf_counter() - t

        t = time.perf_counter()
        snippets, stats = self._collect_snippets(expansion, data, snippet_len, snippets_per_token, top_up_with_generation)
        timings["snippets"] = time.perf_counter() - t

        distilled, not_distilled = tokens_to_distill(expansion.tokens, stats.counts, min_snippets_per_token)
        if not_distilled:
            log.warning(not_distilled_note(not_distilled, min_snippets_per_token, pre_init_strategy))
        keep = {tok.text for tok in distilled}
        kept = [s for s in snippets if s["token"] in keep]
        snippet_ids = [s["input_ids"] for s in kept]

        t = time.perf_counter()
        tokens, new_start = expansion.tokens, expansion.new_start
        examples = align_snippets(PieceAligner.for_tokens(tokens, new_start), snippet_ids)
        rows = self._initial_rows(tokens, output_emb_policy, pre_init_strategy, training.untie_word_embeddings)
        distiller = TokenDistiller.from_config(self.model, rows, new_start, training).to(self.device)
        log.info(
            "distilling %d tokens on %d snippets (%s, bf16 %s)", len(tokens), len(examples), self.device,
            "on" if training.mixed_precision and bf16_supported(self.device) else "off",
        )
        history = train_local(distiller, examples, training)
        check_finite({"input": rows.input, "output": rows.output}, history.steps)
        timings["distill"] = time.perf_counter() - t

        t = time.perf_counter()
        tokenizer = expansion.tokenizer
        model = expand_model(self.model, new_start, rows.input.detach(), None if rows.output is None else rows.output.detach())
        self._expanded = True
        self.last_report = expansion_report(
            self.model_path, tokens, new_start, Counter(s["token"] for s in kept), history,
            settings={
                "snippet_len": snippet_len, "snippets_per_token": snippets_per_token,
                "output_emb_policy": output_emb_policy.value, "pre_init_strategy": pre_init_strategy,
                "training": dict(vars(training)),
            },
            positions=positions_per_token(snippet_ids, new_start, len(tokens)),
            tokenizer=expansion_summary(expansion),
            tokens_skipped=expansion.skipped,
            tokens_not_distilled=not_distilled,
            snippets={"source": type(data).__name__, **stats.as_dict(snippets_per_token)},
            timings_s=timings,
        )
        if save:
            save_expanded(model, tokenizer, out_path, self.last_report)
            timings["export"] = time.perf_counter() - t
            log.info("saved the expanded model to %s", out_path)
        return model, tokenizer

    # ------------------------------------------------------------------ stages
    def _check(self, out_path, save: bool, snippet_len: int, per_token: int, min_per_token: int, training) -> None:
        """What can be known before any work, as the job checks it."""
        if save and out_path is None:
            raise ConfigError("out_path must be given when save=True")
        if save:
            check_writable_dir("out_path", out_path)
        check_snippet_counts(snippet_len, per_token, min_per_token)
        if not isinstance(training, DistillationConfig):
            raise ConfigError(f"training must be a DistillationConfig, not {type(training).__name__}")
        check_target_layer(training.target_layer, self.model.config.get_text_config().num_hidden_layers)

    def _collect_snippets(self, expansion: MergeExpansion, data, snippet_len, snippets_per_token, top_up):
        tokens = expansion.tokens
        if isinstance(data, GeneratedDataSource):
            return generate_snippets(self.model, expansion, tokens, snippet_len, snippets_per_token, data)
        if not isinstance(data, (HFDataSource, FileDataSource)):
            raise TypeError(f"data must be GeneratedDataSource, HFDataSource or FileDataSource, not {type(data).__name__}")
        snippets, stats = self._mine(expansion, data, snippet_len, snippets_per_token, bool(top_up))
        log.info("mined %d snippets: %s", len(snippets), stats.summary())
        short = {t: snippets_per_token - c for t, c in stats.counts.items() if c < snippets_per_token}
        if short and top_up:
            index = {tok.text: i for i, tok in enumerate(tokens)}
            todo = [tok for tok in tokens if tok.text in short]
            settings = top_up if isinstance(top_up, GeneratedDataSource) else GeneratedDataSource()
            extra, extra_stats = generate_snippets(
                self.model, expansion, todo, snippet_len, short, settings,
                token_indices=[index[tok.text] for tok in todo],
            )
            snippets += extra
            for text, n in extra_stats.counts.items():
                stats.counts[text] += n
            stats.topped_up = extra_stats.counts
        return snippets, stats

    def _mine(self, expansion: MergeExpansion, data, snippet_len, snippets_per_token, top_up: bool):
        """On the running Ray cluster if there is one (results cached under the tokdist_ray
        cache dir); in process otherwise, as starting Ray costs more than a small run."""
        if ray_is_running() and self.tokenizer.is_fast:
            result = mine_corpus(data, expansion, snippet_len, snippets_per_token,
                                 str(cache_root() / "mining"), top_up=top_up)  # logs any shortfall
            return result.rows(), result.stats
        batch = data.tokenization_batch_size if isinstance(data, HFDataSource) else 256
        rows, stats = mine_snippets(documents(data), expansion, snippet_len, snippets_per_token, batch)
        stats.log_shortfall(snippets_per_token, top_up)
        return rows, stats

    def _initial_rows(self, tokens: list[NewToken], policy: OutputEmbeddingInit, strategy: str, untie: bool) -> NewRows:
        if ties_word_embeddings(self.model) and not untie and policy is OutputEmbeddingInit.TRAIN_WITH_CE:
            log.info("tied embeddings: output rows are the input rows (untie_word_embeddings=True trains them apart)")
        return initial_rows(self.model, [tok.phrase_ids for tok in tokens], policy, strategy, untie)
