"""Everything about a job that can be known before it starts Ray or loads weights,
checked in one place: one line naming the key or file and the fix (exit 2 on the CLI)."""

from __future__ import annotations

from tokdist_ray.config import FileDataSource
from tokdist_ray.errors import ConfigError, CorpusNotFoundError
from tokdist_ray.job.config import JobConfig
from tokdist_ray.preflight import check_export_space, check_local_workers, check_model, check_writable_dir
from tokdist_ray.raycluster import joins_cluster


def check_job(config: JobConfig, exports: bool = True) -> None:
    """`exports`: whether the stages asked for end in an export (mining alone writes no model)."""
    check_corpus_paths(config)
    check_token_file(config)
    check_writable_dir("run_dir", config.run_dir)
    export_key = "out_path" if config.out_path else "run_dir (its model/ folder)"
    check_writable_dir(export_key, config.model_dir)
    # GGUF and bundled models materialise here, once; remote code and broken files are refused here,
    # not in a worker
    check_model(config.model, config.training.target_layer, config.trust_remote_code)
    if exports:
        from tokdist_ray.export.model import check_out_dir

        check_out_dir(config.model_dir)  # someone's own folder is refused now, not after training
        gguf_dtype = config.output.gguf_dtype if config.output.gguf else None
        check_export_space(export_key, config.model_dir, config.model, gguf_dtype)
    check_gguf_export(config)
    if not joins_cluster():
        dist = config.distributed
        check_local_workers(dist.num_workers, dist.cpus_per_worker, dist.use_gpu)


def check_gguf_export(config: JobConfig) -> None:
    """With output.gguf, the model must be one the GGUF export writes: known before
    training, not after it (reads the config and tokenizer, no weights)."""
    if not config.output.gguf:
        return
    from tokdist_ray.export.gguf import check_exportable, tokenizer_json_of
    from tokdist_ray.preflight import model_config
    from tokdist_ray.vocab.models import load_tokenizer

    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    check_exportable(model_config(config.model, config.trust_remote_code), tokenizer_json_of(tokenizer),
                     config.output.gguf_pre)


def check_corpus_paths(config: JobConfig) -> None:
    """Local corpus and held-out paths must match files before any work starts (URIs are
    checked where they are read)."""
    from tokdist_ray.data.corpus.files import expand_paths
    from tokdist_ray.storage import is_uri

    corpus = config.data.corpus
    named = {"data.paths": corpus.paths if isinstance(corpus, FileDataSource) else [],
             "eval.heldout_paths": config.eval.heldout_paths}
    for key, paths in named.items():
        for path in (p for p in paths if not is_uri(p)):
            try:
                expand_paths([path])
            except CorpusNotFoundError as e:
                raise CorpusNotFoundError(f"{key}: {e}") from None


def check_token_file(config: JobConfig) -> None:
    """tokens.file must exist and hold tokens (a .json list of strings or lines of text)."""
    if not config.tokens.file:
        return
    from tokdist_ray.vocab.tokens import read_token_file

    try:
        read_token_file(config.tokens.file)
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON, not UTF-8, not a list
        problem = str(e) if config.tokens.file in str(e) else f"{config.tokens.file}: {e}"
        raise ConfigError(f"tokens.file: {problem}") from None
