"""The stages of bench/gpu_check.py that read text: the output fit (`training.output_fit`)
and one shard of the held-out evaluation (`eval.heldout.score_part`), on a tiny random
Llama with a byte-level BPE tokenizer trained here on generated sentences (nothing is
downloaded), its tokenizer expanded by merges with a few long words that only the fit and
held-out texts use. Under bf16 on the GPU, as the product runs them there.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import random
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from tokdist_ray.config import EvalConfig, OutputEmbeddingInit, OutputFitConfig
from tokdist_ray.training.rows import initial_rows
from tokdist_ray.vocab.merges import MergeExpansion, expand_with_merges
from tokdist_ray.vocab.models import load_model, load_tokenizer

WORDS = (" Krankenwagen", " Schmetterling", " Donaudampfschiff")
OTHERS = (" river", " garden", " station", " market", " library", " bridge", " teacher", " child", " train", " dog")
VERBS = (" passed", " waited near", " crossed", " left", " reached", " watched")
ENDINGS = (" in the morning.", " after the rain.", " at noon.", " before the storm.", " on Sunday.")
TEXT_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
# 16 of the 35 new rows a step (the three words and a draw of the rest): the drawn step of
# tens of thousands of tokens, on the device
FIT = OutputFitConfig(max_steps=100, batch_positions=1024, max_step_logits=1024 * 16)
FIT_CHUNKS = 40  # every 10th is held back: 4 held-back chunks
EVAL_SHARDS = 2  # the check scores the first of them


def sentences(rng: random.Random, count: int, nouns: tuple[str, ...]) -> list[str]:
    return [f"The{rng.choice(nouns)}{rng.choice(VERBS)} the{rng.choice(nouns)}{rng.choice(ENDINGS)}" for _ in range(count)]


@dataclass(frozen=True)
class TextModel:
    """A tiny untied Llama with its own tokenizer, the expansion, and the texts."""

    model_dir: str
    expansion: MergeExpansion
    fit_texts: tuple[str, ...]  # chunks for the output fit
    heldout_path: str


def build_text_model(root: Path) -> TextModel:
    """The tokenizer learns from sentences without WORDS, so it splits them into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(rng, 2000, OTHERS), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    model_dir = root / "text-llama"
    torch.manual_seed(0)
    config = LlamaConfig(**TEXT_MODEL, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    nouns = OTHERS + WORDS
    fit_texts = tuple(" ".join(sentences(rng, 12, nouns)) for _ in range(FIT_CHUNKS))
    heldout = root / "heldout.txt"
    heldout.write_text("\n".join(sentences(rng, 400, nouns)) + "\n", encoding="utf-8")
    expansion = expand_with_merges(load_tokenizer(str(model_dir)), WORDS)
    return TextModel(str(model_dir), expansion, fit_texts, str(heldout))


def text_model_dtype(use_gpu: bool) -> torch.dtype:
    return torch.bfloat16 if use_gpu else torch.float32


def fit_output(text: TextModel, device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """The output fit from the default policy's rows (first_piece), as the job's fit stage
    runs it after distillation: the fitted rows must be fp32, the input rows untouched, and
    the held-back loss lower than where it started."""
    from tokdist_ray.training.output_fit import fit_on_text

    model = load_model(text.model_dir, dtype=text_model_dtype(device.type == "cuda"), device=device)
    phrases = [t.phrase_ids for t in text.expansion.tokens]
    start = initial_rows(model, phrases, OutputEmbeddingInit.FIRST_PIECE, "fvt")
    rows = {"input": start.input.detach().cpu(), "output": start.output.detach().cpu()}
    fitted, summary = fit_on_text(model, rows, text.expansion.new_start, text.expansion.tokenizer, list(text.fit_texts),
                                  FIT, seed=0)
    if "skipped" in summary:
        raise AssertionError(f"the output fit was skipped: {summary['skipped']}")
    if not summary["rows_per_step"] < len(text.expansion.tokens):
        raise AssertionError(f"the fit computed all {len(text.expansion.tokens)} rows a step: its draw went unchecked")
    if fitted["output"].dtype != torch.float32:
        raise AssertionError(f"fitted output rows are {fitted['output'].dtype}, not fp32")
    if not torch.equal(fitted["input"], rows["input"]):
        raise AssertionError("the output fit changed the input rows")
    if not summary["held_back_loss_best"] < summary["held_back_loss_start"]:
        raise AssertionError(f"held-back loss did not fall: {summary['held_back_loss_start']} -> "
                             f"{summary['held_back_loss_best']}")
    return fitted, summary


@contextlib.contextmanager
def ray_stand_in():
    """score_part asks Ray only which node it runs on (raycluster.node_id). The device machine
    has no Ray (its wheel alone is over the 64 MiB that travels): there a stand-in answers
    that Ray is not running, as it answers outside a Ray worker."""
    if importlib.util.find_spec("ray") is not None:
        yield
        return
    stand_in = types.ModuleType("ray")
    stand_in.is_initialized = lambda: False
    sys.modules["ray"] = stand_in
    try:
        yield
    finally:
        del sys.modules["ray"]


def evaluation_shard(text: TextModel, rows: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Shard 0 of EVAL_SHARDS of the held-out evaluation, and the report `shards.merge`
    makes of it; checked for what a shard must hold."""
    from tokdist_ray.config import FileDataSource
    from tokdist_ray.data.corpus.corpus import documents
    from tokdist_ray.data.mining.local_mining import mine_snippets
    from tokdist_ray.eval.heldout import Evaluation, score_part
    from tokdist_ray.eval.shards import merge, part

    settings = EvalConfig(heldout_paths=[text.heldout_path], snippets_per_token=8, max_snippets=None, batch_size=4,
                          bits_per_byte_bytes=4000, chunk_bytes=500, generation_steps=4, generation_prompts=2,
                          prompt_bytes=64)
    evaluation = Evaluation(text.model_dir, text.expansion, rows, settings, loss_curve=[], snippet_len=16)
    with ray_stand_in():
        shard = score_part(evaluation, 0, EVAL_SHARDS)
    report = merge([shard], text.expansion.new_start)
    mined, _ = mine_snippets(documents(FileDataSource(paths=[text.heldout_path])), text.expansion, evaluation.snippet_len,
                             settings.snippets_per_token)
    lo, hi = part(len(mined), 0, EVAL_SHARDS, settings.batch_size)
    if not 0 < shard["heldout_snippets"] == hi - lo:
        raise AssertionError(f"shard 0 scored {shard['heldout_snippets']} held-out snippets, expected {hi - lo} "
                             f"of {len(mined)}")
    methods = report["methods"]
    if "token_distillation" not in methods or not all(math.isfinite(v) for m in methods.values()
                                                       for v in m["overall"].values()):
        raise AssertionError(f"drift: {methods}")
    bits = report["bits_per_byte"]["methods"]
    if not {"original", "token_distillation"} <= set(bits) or not all(math.isfinite(b["bits_per_byte"]) for b in bits.values()):
        raise AssertionError(f"bits per byte: {bits}")
    if "generation" not in report:
        raise AssertionError("shard 0 measured no generation")
    return shard, report
