"""Small builders shared by the engine tests (tiny models only)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoTokenizer

from tokdist_ray.config import EvalConfig
from tokdist_ray.eval.heldout import Evaluation
from tokdist_ray.training.batching import align_snippets
from tokdist_ray.training.rows import pre_init_rows
from tokdist_ray.training.step import NewRows, TokenDistiller
from tokdist_ray.vocab.alignment import PieceAligner
from tokdist_ray.vocab.merges import expand_with_merges
from tokdist_ray.vocab.models import load_model

WORDS = [" Krankenwagen", " Schmetterling"]
SENTENCES = [
    "The Krankenwagen drove past the river and the Schmetterling flew over the garden.",
    "A Schmetterling sat on the bench while the Krankenwagen waited at the station.",
    "In the morning the market square fills with people, and a Krankenwagen passes by.",
    "Children watch a Schmetterling in the park near the library on the hill.",
]


def tiny_setup(model_dir, losses=("MSE-on-hiddens",), target_layer=-1, train_output=True):
    """(distiller, examples, tokenizer) for the two WORDS (and any intermediate merges
    they need) on SENTENCES."""
    model = load_model(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    expansion = expand_with_merges(tok, WORDS)
    tokens, new_start = expansion.tokens, expansion.new_start
    examples = align_snippets(PieceAligner.for_tokens(tokens, new_start),
                              [expansion.tokenizer(s)["input_ids"] for s in SENTENCES])
    phrases = [t.phrase_ids for t in tokens]
    inputs = pre_init_rows(model.get_input_embeddings().weight, phrases)
    if model.config.tie_word_embeddings:
        rows = NewRows(inputs)
    else:
        rows = NewRows(inputs, pre_init_rows(model.get_output_embeddings().weight, phrases), train_output)
    return TokenDistiller(model, rows, new_start, losses, target_layer, mixed_precision=False), examples, tok


def tiny_job_args(model_dir, corpus_dir, run_dir) -> list[str]:
    """Command-line options of a small job on a tiny model: the two WORDS, 4 snippets each."""
    return [
        "--model", str(model_dir), "--run_dir", str(run_dir), "--tokens.list", ",".join(WORDS),
        "--data.paths", str(corpus_dir), "--snippets.snippet_len", "24", "--snippets.snippets_per_token", "4",
        "--training.batch_size", "4", "--distributed.checkpoint_every", "0", "--eval.heldout_paths", str(corpus_dir),
        "--eval.snippets_per_token", "2", "--eval.prompt_bytes", "48",  # the documents are about 100 bytes
    ]


def run_cli(args, capsys) -> tuple[int, str]:
    """`tokdist-ray run ARGS`: (exit code, stderr)."""
    from tokdist_ray.job.cli import main

    code = main(["run", *args])
    return code, capsys.readouterr().err


def assert_close(actual, expected, rel: float = 1e-5, abs: float = 1e-8, skip: tuple[str, ...] = (), path: str = "") -> None:
    """Nested dicts and lists equal, floats within tolerance; keys named in `skip` (at any
    depth) left out, e.g. timings."""
    import pytest

    if isinstance(expected, dict):
        keys = [k for k in expected if k not in skip]
        assert [k for k in actual if k not in skip] == keys, f"{path}: keys differ"
        for k in keys:
            assert_close(actual[k], expected[k], rel, abs, skip, f"{path}.{k}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: lengths differ"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, rel, abs, skip, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=rel, abs=abs, nan_ok=True), path
    else:
        assert actual == expected, path


def tiny_evaluation(model_dir, heldout_dir, **settings) -> Evaluation:
    """Random new rows (input and output) of the two WORDS on a tiny untied model."""
    expansion = expand_with_merges(AutoTokenizer.from_pretrained(model_dir), WORDS)
    generator = torch.Generator().manual_seed(0)
    rows = {side: 0.05 * torch.randn(len(expansion.tokens), 64, generator=generator) for side in ("input", "output")}
    settings = {"snippets_per_token": 4, "batch_size": 2, "chunk_bytes": 60, "bits_per_byte_bytes": 500,
                "generation_steps": 0} | settings
    return Evaluation(str(model_dir), expansion, rows, EvalConfig(heldout_paths=[str(heldout_dir)], **settings), [],
                      snippet_len=24)


def in_gloo_ranks(world: int, directory, job, *args) -> list:
    """`job(rank, *args)` in `world` processes of one gloo group (no Ray): what each rank
    returned, in rank order. `job` must be a module-level function (it is pickled)."""
    mp.spawn(_rank_main, args=(world, str(directory), job, args), nprocs=world)
    return [torch.load(f"{directory}/result{rank}.pt", weights_only=False) for rank in range(world)]


def _rank_main(rank: int, world: int, directory: str, job, args) -> None:
    torch.set_num_threads(1)  # several processes on a shared machine
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank, world_size=world)
    try:
        torch.save(job(rank, *args), f"{directory}/result{rank}.pt")
        # a rank that tears the group down while another still exchanges with it makes gloo
        # abort that one (SIGABRT from its own thread): leave together
        dist.barrier()
    finally:
        dist.destroy_process_group()
