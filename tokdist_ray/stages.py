"""The stages of an expansion, shared by the Python API (api.py: in process, on the model
it holds) and the job (job/pipeline.py: on Ray, with stage fingerprints and files):

    tokens     expand_tokens                          -> vocab.merges.MergeExpansion
    snippets   collect_snippets                       -> Snippets
    distill    split_by_snippets, then training       -> training.distilled_rows.DistilledRows
    fit        fit_text, then training.fit_hook.OutputFit (on the distillation's workers)
                                                      -> training.distilled_rows.FittedRows
    export     report.expansion_report, save_model    -> the expanded model's folder
    evaluate   eval.heldout.evaluate_export           -> eval.json, eval.md

What differs between the two runners is passed in: how snippets are mined and generated,
and where training runs. The rules (which tokens enter as added tokens, when a top-up
runs, which tokens are distilled, what report.json holds) live here once.
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import torch
from safetensors import SafetensorError

from tokdist_ray.atomic import atomic_directory, check_replaceable, write_json
from tokdist_ray.config import OutputFitConfig
from tokdist_ray.data.budget import Quota, quota_of
from tokdist_ray.data.corpus import text_sample
from tokdist_ray.data.snippets import SNIPPET_SCHEMA
from tokdist_ray.errors import OutputWriteError, TokdistError
from tokdist_ray.training.checkpoint import ROWS, write_rows
from tokdist_ray.vocab.export import expand_model, save_expanded
from tokdist_ray.vocab.gguf_export import GGUF_FILE, GgufOptions, export_gguf
from tokdist_ray.vocab.merges import ADDED_TOKENS, SKIP, MergeExpansion, expand_with_merges
from tokdist_ray.vocab.models import load_model, weights_dir
from tokdist_ray.vocab.streamed_export import export_streamed, shards_of
from tokdist_ray.vocab.tokens import NewToken, not_distilled_note, skip_counts, tokens_to_distill

log = logging.getLogger("tokdist_ray")

# (tokens short of snippets, how many each lacks, their indices in the run) -> (snippets, GenerationStats):
# a table in SNIPPET_SCHEMA, or snippets left on the cluster (ray_backend.GeneratedSnippets: num_rows, write(dir))
Generate = Callable[[list[NewToken], dict[str, int], list[int]], tuple[object, object]]


def expand_tokens(tokenizer, candidates, mode: str) -> MergeExpansion:
    """The expanded tokenizer. `candidates`: strings, or a target tokenizer, whose tokens
    that merges cannot produce enter as added tokens (a listed string merges cannot
    produce is skipped, and said so)."""
    from transformers import PreTrainedTokenizerBase

    unreachable = ADDED_TOKENS if isinstance(candidates, PreTrainedTokenizerBase) else SKIP
    expansion = expand_with_merges(tokenizer, candidates, mode, unreachable)
    log.info("%d new tokens (%s, %d intermediate, %d candidates skipped: %s)", expansion.n_requested,
             expansion.mode, len(expansion.intermediates), len(expansion.skipped), skip_counts(expansion.skipped))
    return expansion


@dataclass
class Snippets:
    table: pa.Table  # SNIPPET_SCHEMA, mined rows first, then generated ones held in this process
    report: dict  # "mining" and/or "generation", "snippets", "snippets_per_token"
    generated: object | None = None  # generated snippets left on the cluster, after `table` (ray_backend.GeneratedSnippets)

    @property
    def counts(self) -> dict[str, int]:
        """Snippets toward each token's quota."""
        return self.report["snippets_per_token"]


def collect_snippets(expansion: MergeExpansion, quota: Quota, mine: Callable[[], object] | None, generate: Generate,
                     top_up: bool) -> Snippets:
    """Mine (`mine() -> data.mining.MiningResult`, None without a corpus), then generate:
    every token's quota without a corpus, or with `top_up` what mining left short. Generated
    snippets that `generate` leaves on the cluster stay there (`Snippets.generated`)."""
    tokens = expansion.tokens
    tables, report, counts, generated = [], {}, Counter(), None
    shortfall = {t.text: quota_of(quota, t.text) for t in tokens}
    if mine is not None:
        mined = mine()
        report["mining"] = mined.report()
        counts.update(mined.stats.counts)
        tables.append(mined.table())
        shortfall = mined.shortfall if top_up else {}
    if shortfall:
        index = {t.text: i for i, t in enumerate(tokens)}
        todo = [t for t in tokens if t.text in shortfall]
        rows, stats = generate(todo, {t.text: shortfall[t.text] for t in todo}, [index[t.text] for t in todo])
        if isinstance(rows, pa.Table):
            tables.append(rows)
        else:
            generated = rows
        report["generation"] = stats.as_dict(quota) | {"top_up": mine is not None}
        counts.update(stats.counts)
    table = pa.concat_tables([t.cast(SNIPPET_SCHEMA) for t in tables]) if tables else SNIPPET_SCHEMA.empty_table()
    report["snippets"] = table.num_rows + (generated.num_rows if generated is not None else 0)
    report["snippets_per_token"] = {t.text: counts[t.text] for t in tokens}
    return Snippets(table, report, generated)


def split_by_snippets(tokens: Sequence[NewToken], counts: dict[str, int], min_per_token: int,
                      pre_init_strategy: str) -> tuple[list[NewToken], list[dict]]:
    """(tokens to distill, those with fewer than `min_per_token` snippets, which keep
    their pre-initialised rows), said in the log."""
    distilled, not_distilled = tokens_to_distill(tokens, counts, min_per_token)
    if not_distilled:
        log.warning(not_distilled_note(not_distilled, min_per_token, pre_init_strategy))
    return distilled, not_distilled


# the fit's text is spread over at most 64 x text_bytes of the corpus (25 MB by default):
# read again here, as a streamed hub dataset is, it must stay a small share of a large corpus
FIT_MAX_STRIDE = 64


def fit_text(source, settings: OutputFitConfig, snippets_report: dict) -> list[str]:
    """The corpus text the output fit reads (training/output_fit.py), spread over what
    mining read; none with the fit off or without a corpus (generated snippets are each
    written around their token, not text as it comes)."""
    if not settings.enabled:
        return []
    if source is None:
        log.info("output rows are not fitted: the fit needs corpus text, and these snippets are generated")
        return []
    mined = snippets_report.get("mining", {}).get("megabytes", 0) * 1e6
    stride = min(FIT_MAX_STRIDE, max(1, int(mined // settings.text_bytes)))
    texts = text_sample(source, settings.text_bytes, stride)
    log.info("output fit: %d chunks, %.0f kB of the corpus", len(texts), sum(len(t.encode()) for t in texts) / 1e3)
    return texts


def save_model(model_path: str, expansion: MergeExpansion, rows: dict[str, torch.Tensor], out_dir: str | Path,
               report: dict, model=None, gguf: GgufOptions | None = None) -> Path:
    """The expanded model and tokenizer, report.json, and the new rows alone
    (new_rows.safetensors: "input" and, for untied models, "output", fp32). Written from
    the original safetensors shards, one at a time, when the model has them (a hub model's
    from the hub cache; no process holds the whole model); else `model` (expanded already)
    or the loaded local model is saved (a hub model without safetensors is refused: no pickle).
    With `gguf`, also the same model as one GGUF file for llama.cpp, model.gguf, written
    from the exported directory (streamed too). The export replaces an earlier one at
    `out_dir` whole or not at all (atomic_directory): a kill or a failure, a full disk
    say, leaves the earlier one as it was, and nothing of it stays beside the new one."""
    rows = {name: row.detach().float().cpu().contiguous() for name, row in rows.items()}
    model_dir = weights_dir(model_path, loaded=model is not None)
    streamed = bool(shards_of(model_dir))
    if not streamed and model is None:
        model = expand_model(load_model(str(model_dir), dtype="auto"), expansion.new_start, rows["input"],
                             rows.get("output"))
    out = Path(out_dir)
    try:
        with atomic_directory(out, marker=ROWS) as partial:
            if streamed:
                export_streamed(model_dir, expansion.new_start, rows, partial)
                expansion.tokenizer.save_pretrained(partial)
                write_json(partial / "report.json", report)
            else:
                save_expanded(model, expansion.tokenizer, partial, report)
            write_rows(partial / ROWS, rows)
            if gguf is not None:
                export_gguf(partial, partial / GGUF_FILE, gguf.dtype, gguf.pre)
    except (OSError, SafetensorError) as e:
        if isinstance(e, TokdistError) or not (isinstance(e, OSError) or "I/O error" in str(e)):
            raise  # a refusal with its own message, or a bug
        raise _export_write_error(out, e, _weights_bytes(model_dir, model), gguf is not None) from e
    log.info("saved the expanded model to %s", out)
    return out


def check_out_dir(out_dir: str | Path) -> None:
    """Before any work: `out_dir` is one save_model may replace (new, empty, or an
    earlier export: it has new_rows.safetensors; not a mount point)."""
    check_replaceable(out_dir, ROWS)


def _weights_bytes(model_dir: str, model) -> int:
    if model is not None:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    return sum((Path(model_dir) / shard).stat().st_size for shard in shards_of(model_dir))


def _export_write_error(out: Path, error: Exception, weights: int, gguf: bool) -> OutputWriteError:
    """What failed, and the room an export needs: the new one is written in full beside
    the earlier one before it replaces it."""
    free = shutil.disk_usage(next(p for p in (out, *out.parents) if p.exists())).free
    needed = f"{_size(weights)} for the weights" + (", and about as much for the GGUF" if gguf else "")
    return OutputWriteError(
        f"cannot write the export {out}: {error}. It needs {needed}, beside any earlier export until it "
        f"replaces it, and {_size(free)} are free there; {out} is left as it was"
    )


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.3g} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.3g} MB"
