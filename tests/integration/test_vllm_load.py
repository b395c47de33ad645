"""An exported directory loads the way vLLM loads a Hugging Face directory, checked without
vLLM (it needs a GPU): the same libraries vLLM calls at load time (transformers' AutoConfig,
AutoTokenizer and GenerationConfig, safetensors' safe_open) read the export, and
`vllm_load_problems` repeats the checks vLLM then makes on what they return. Each check cites
the vLLM code whose behaviour it mirrors (vllm-project/vllm, main as of transformers v5):

- vllm/transformers_utils/config.py, get_config / HFConfigParser: AutoConfig.from_pretrained
  with the caller's trust_remote_code (off by default: a config that needs remote code is
  refused); get_hf_text_config: the text config has num_attention_heads.
- vllm/model_executor/models/registry.py: config.architectures names a class vLLM
  implements (here for the Llama and Qwen2 families the project exports).
- vllm/tokenizers (get_tokenizer / get_cached_tokenizer): AutoTokenizer.from_pretrained,
  trust_remote_code off; max_token_id is the largest id of get_vocab() (added tokens too).
  vllm/v1/engine/input_processor.py _validate_model_input refuses prompt ids above
  max(tokenizer.max_token_id, vocab_size - 1) ("Token id ... is out of vocabulary"); that
  lets a tokenizer id >= config.vocab_size through to the embedding lookup, so we ask more:
  every id the tokenizer can emit is below config.vocab_size.
- vllm/model_executor/model_loader/default_loader.py _prepare_weights and
  weight_utils.py filter_duplicate_safetensors_files: the weights are every *.safetensors
  in the folder; with model.safetensors.index.json, only the files the index names, each of
  which must exist ("Weight files referenced in index but missing").
- vllm/model_executor/models/llama.py LlamaForCausalLM.load_weights and
  models/utils.py AutoWeightsLoader: each checkpoint tensor must name a parameter ("There is
  no module or parameter named ..."); lm_head.* is skipped when tie_word_embeddings is set
  (its rows silently dropped); default_loader.py track_weights_loading: every parameter must
  come from the checkpoint ("Following weights were not initialized from checkpoint"), so
  an untied config needs lm_head.weight.
- vllm/model_executor/layers/vocab_parallel_embedding.py VocabParallelEmbedding.weight_loader
  (embed_tokens and ParallelLMHead): `loaded_weight.shape[0] == org_vocab_size`, which is
  config.vocab_size; the rows are copied into [vocab, hidden] parameters.
- vllm/config/model.py (_find_dtype, dtype="auto"): the served dtype comes from the config's
  dtype; the tensors' own dtype is read only when the config names none.
- vllm/v1/engine/input_processor.py / sampling_params.py update_from_generation_config:
  generation_config.json's eos_token_id (int or list) become stop ids; one outside the
  vocabulary can never be sampled, so generation would not stop there.

The exports are the project's own, made as users make them: TokenDistillation.run on the tiny
random Llama (tied, kept tied; tied, sharded, untied by the output fit) and save_model on the
bundled SmolLM2 (one 540 MB file, untied by output rows). Every check is shown to fail on a
copy of an export broken in the one way it guards against.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.helpers import SENTENCES, WORDS
from tokdist_ray import DistillationConfig, FileDataSource, TokenDistillation
from tokdist_ray.config import OutputFitConfig

INDEX = "model.safetensors.index.json"
# registry.py's _TEXT_GENERATION_MODELS entries for the families the project exports
VLLM_ARCHITECTURES = {
    "llama": {"LlamaForCausalLM", "LLaMAForCausalLM"},
    "qwen2": {"Qwen2ForCausalLM"},
    "mistral": {"MistralForCausalLM"},
}
# LlamaForCausalLM.load_weights skips these checkpoint names
VLLM_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def vllm_load_problems(model_dir: str | Path) -> list[str]:
    """What would stop vLLM (or make it serve something else than the export) when it loads
    `model_dir`, one message each; [] when nothing would."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model_dir = Path(model_dir)
    problems: list[str] = []
    try:  # get_config: AutoConfig, trust_remote_code as the user gives it (off by default)
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        return [f"config.json does not load with AutoConfig(trust_remote_code=False), as vLLM's get_config "
                f"loads it: {e}"]
    text = config.get_text_config()
    if not hasattr(text, "num_attention_heads"):  # get_hf_text_config
        problems.append("the text config has no num_attention_heads (vLLM's get_hf_text_config refuses it)")
    known = VLLM_ARCHITECTURES.get(config.model_type, set())
    if not set(config.architectures or []) & known:  # the model registry
        problems.append(f"config.architectures {config.architectures} names no class vLLM implements for "
                        f"model_type {config.model_type!r} ({sorted(known) or 'none known here'})")
    vocab, hidden = text.vocab_size, text.hidden_size
    tied = bool(getattr(text, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False))

    try:  # get_tokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError) as e:
        problems.append(f"the tokenizer does not load with AutoTokenizer(trust_remote_code=False), as vLLM's "
                        f"get_tokenizer loads it: {e}")
    else:  # every id it can emit, added tokens too, has an embedding row
        ids = {token: i for token, i in tokenizer.get_vocab().items()}
        top = max(max(ids.values()), len(tokenizer) - 1)
        if top >= vocab:
            token = next((t for t, i in ids.items() if i == top), None)
            problems.append(f"the tokenizer emits id {top} ({token!r}) but config.vocab_size is {vocab}: ids from "
                            f"{vocab} up have no embedding row (vLLM's out-of-vocabulary check lets them through "
                            f"to the lookup, since it compares with max(tokenizer max id, vocab_size - 1))")

    # GenerationConfig.from_pretrained, else one made from the model config (try_get_generation_config)
    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    eos = generation.eos_token_id
    for eos_id in [] if eos is None else [eos] if isinstance(eos, int) else list(eos):
        if not 0 <= eos_id < vocab:
            problems.append(f"generation_config eos_token_id {eos_id} is outside the vocabulary (config.vocab_size "
                            f"{vocab}): vLLM makes it a stop id, which can never be sampled")

    files, tensors, weight_problems = _checkpoint_tensors(model_dir)
    problems += weight_problems
    if not files:
        return problems

    # the architecture's parameters, as vLLM's model has them (tied: no lm_head of its own)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    arch = type(model).__name__
    wanted = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a tied head is the embedding
    head = "lm_head.weight"
    for name, (file, shape, _) in sorted(tensors.items()):
        if name.endswith(VLLM_SKIPPED):
            continue
        if name == head and tied:
            problems.append(f"config.tie_word_embeddings is true but {file} holds {head}: vLLM skips it and serves "
                            f"the input embeddings as the head, so the exported output rows are not served")
        elif name not in wanted:
            problems.append(f"{file}: tensor {name!r} is no parameter of {arch}; vLLM's loader raises \"There is "
                            f"no module or parameter named {name.split('.')[0]!r}\""
                            + ("" if (model_dir / INDEX).is_file() else
                               f" (without {INDEX} vLLM reads every *.safetensors in the folder)"))
        elif name in ("model.embed_tokens.weight", head):
            if shape != (vocab, hidden):
                problems.append(f"{name} in {file} is {list(shape)}, config says [vocab_size {vocab}, hidden_size "
                                f"{hidden}]: VocabParallelEmbedding.weight_loader asserts its rows equal "
                                f"org_vocab_size (config.vocab_size)")
        elif shape != wanted[name]:
            problems.append(f"{name} in {file} is {list(shape)}, {arch} has {list(wanted[name])}")
    for name in sorted(set(wanted) - set(tensors)):
        why = " (config.tie_word_embeddings is false: the head is a table of its own)" if name == head else ""
        problems.append(f"no weight file holds {name}{why}: vLLM raises \"Following weights were not initialized "
                        f"from checkpoint\"")

    # dtype="auto" serves the config's dtype; the rows were written in the tensors'
    config_dtype = getattr(config, "dtype", None) or getattr(text, "dtype", None)
    stored = {SAFETENSORS_DTYPES[d] for _, _, d in tensors.values() if d in SAFETENSORS_DTYPES}
    if config_dtype is not None:
        named = str(config_dtype).removeprefix("torch.")
        if stored != {named}:
            problems.append(f"config dtype is {named} but the weights are stored as {sorted(stored)}: vLLM serves "
                            f"the config's dtype")
    return problems


def _checkpoint_tensors(model_dir: Path) -> tuple[list[str], dict[str, tuple[str, tuple, str]], list[str]]:
    """(the weight files vLLM reads, {tensor: (file, shape, dtype)} over them, problems): every
    *.safetensors in the folder, or only those model.safetensors.index.json names, each of
    which must exist and hold exactly the tensors the index puts in it."""
    problems: list[str] = []
    files = sorted(p.name for p in model_dir.glob("*.safetensors") if p.is_file())
    index = None
    if (model_dir / INDEX).is_file():
        index = json.loads((model_dir / INDEX).read_text())["weight_map"]
        named = sorted(set(index.values()))
        missing = [f for f in named if not (model_dir / f).is_file()]
        if missing:
            problems.append(f"{INDEX} names {missing}, which do not exist: vLLM raises \"Weight files referenced in "
                            f"index but missing\"")
        files = [f for f in files if f in named]
    if not files:
        problems.append(f"no *.safetensors weights in {model_dir}: vLLM raises \"Cannot find any model weights\"")
        return files, {}, problems
    tensors: dict[str, tuple[str, tuple, str]] = {}
    for file in files:
        with safe_open(model_dir / file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if name in tensors:
                    problems.append(f"{name} is in both {tensors[name][0]} and {file}: vLLM loads it twice")
                part = f.get_slice(name)
                tensors[name] = (file, tuple(part.get_shape()), part.get_dtype())
                if index is not None and index.get(name) != file:
                    problems.append(f"{file} holds {name}, which {INDEX} puts in {index.get(name) or 'no file'}")
    if index is not None:
        for name, file in sorted(index.items()):
            if (model_dir / file).is_file() and tensors.get(name, (None,))[0] != file:
                problems.append(f"{INDEX} puts {name} in {file}, but {file} does not hold it")
    return files, tensors, problems


# ---------------------------------------------------------------------------------------------
# the exports

FAST = DistillationConfig(epochs=1, batch_size=4, log_every=1000)


@pytest.fixture(scope="module")
def export(request, tiny_model_dir, tmp_path_factory):
    """export(kind) -> an exported directory, made once per module:
    "tied"          the tiny tied Llama through TokenDistillation.run, output fit off: stays tied
    "output-fit"    the same model saved in shards, through run with a short output fit: the
                    fit gives it output rows of its own, so it is exported untied (and sharded)
    "smollm2"       the bundled SmolLM2 (tied, one model.safetensors) through save_model with
                    input and output rows: untied, one file"""
    made: dict[str, Path] = {}
    corpus = tmp_path_factory.mktemp("vllm-corpus")  # as in tests/unit/test_api.py: enough for the fit's held-back tenth
    for i, sentence in enumerate(SENTENCES * 3):
        (corpus / f"doc{i}.txt").write_text(f"Line {i}. {sentence} More text follows here.", encoding="utf-8")

    def make(kind: str) -> Path:
        if kind in made:
            return made[kind]
        out = tmp_path_factory.mktemp(f"vllm-{kind}") / "model"
        if kind == "smollm2":
            from transformers import AutoTokenizer

            from tokdist_ray.export.model import save_model
            from tokdist_ray.vocab.merges import expand_with_merges

            base = request.getfixturevalue("smollm2_dir")
            expansion = expand_with_merges(AutoTokenizer.from_pretrained(base), WORDS)
            generator = torch.Generator().manual_seed(0)
            rows = {part: torch.randn(len(expansion.tokens), 576, generator=generator) for part in ("input", "output")}
            save_model(str(base), expansion, rows, out, {"model": "bundled:smollm2"})
        else:
            base = tiny_model_dir(tied=True)
            fit = OutputFitConfig(enabled=False)
            if kind == "output-fit":
                from transformers import AutoModelForCausalLM

                sharded = tmp_path_factory.mktemp("tiny-tied-sharded")
                AutoModelForCausalLM.from_pretrained(base).save_pretrained(sharded, max_shard_size="40KB")
                for name in ("tokenizer.json", "tokenizer_config.json"):
                    shutil.copyfile(base / name, sharded / name)
                base, fit = sharded, OutputFitConfig(max_steps=3)
            TokenDistillation(str(base), device="cpu").run(
                WORDS, out_path=str(out), data=FileDataSource(str(corpus)), snippet_len=16,
                snippets_per_token=2, training=FAST, output_fit=fit, save=True)
        made[kind] = out
        return out

    yield make
    for out in made.values():  # SmolLM2's export is 650 MB: not left for pytest's kept temp dirs
        shutil.rmtree(out.parent, ignore_errors=True)


def _config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


@pytest.mark.parametrize("kind,tied,sharded", [("tied", True, False), ("output-fit", False, True),
                                               ("smollm2", False, False)])
def test_the_export_passes_vllms_load_time_checks(export, kind, tied, sharded):
    out = export(kind)
    # the export is the layout the case is about (else the checks would pass vacuously)
    assert _config(out)["tie_word_embeddings"] is tied
    assert (out / "new_rows.safetensors").is_file()  # what the export writes beside the model, always
    shards = set(json.loads((out / INDEX).read_text())["weight_map"].values())  # one file or many: an index
    assert len(shards) > 1 if sharded else shards == {"model.safetensors"}

    assert vllm_load_problems(out) == []


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _lower_vocab_size(d: Path) -> None:
    _edit_json(d / "config.json", vocab_size=_config(d)["vocab_size"] - 1)


def _add_a_token(d: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(d)
    tokenizer.add_tokens(["<not-in-the-model>"])
    tokenizer.save_pretrained(d)


def _drop_the_index(d: Path) -> None:  # the single-file layout as it was: new_rows.safetensors read as weights
    (d / INDEX).unlink(missing_ok=True)


def _remove_a_shard(d: Path) -> None:
    shard = json.loads((d / INDEX).read_text())["weight_map"]["model.norm.weight"]
    (d / shard).unlink()


def _misplace_in_the_index(d: Path) -> None:
    index = json.loads((d / INDEX).read_text())
    weight_map = index["weight_map"]
    weight_map["model.embed_tokens.weight"] = weight_map["model.norm.weight"]
    (d / INDEX).write_text(json.dumps(index))


BROKEN = {  # (export, how it is broken, what the check says)
    "config.vocab_size lowered": ("tied", _lower_vocab_size, ["the tokenizer emits id", "org_vocab_size"]),
    "a token added to the tokenizer": ("tied", _add_a_token, ["('<not-in-the-model>')"]),
    "tied flag on an untied export": ("output-fit", lambda d: _edit_json(d / "config.json", tie_word_embeddings=True),
                                      ["config.tie_word_embeddings is true but"]),
    "untied flag on a tied export": ("tied", lambda d: _edit_json(d / "config.json", tie_word_embeddings=False),
                                     ["no weight file holds lm_head.weight (config.tie_word_embeddings is false"]),
    "no index beside new_rows.safetensors": ("tied", _drop_the_index,
                                             ["new_rows.safetensors: tensor 'input' is no parameter of LlamaForCausalLM"]),
    "a shard the index names is gone": ("output-fit", _remove_a_shard, ["which do not exist"]),
    "the index puts a tensor in the wrong shard": ("output-fit", _misplace_in_the_index,
                                                   ["puts model.embed_tokens.weight in", "does not hold it"]),
    "eos outside the vocabulary": ("tied", lambda d: _edit_json(d / "generation_config.json",
                                                                eos_token_id=[1, _config(d)["vocab_size"]]),
                                   ["generation_config eos_token_id"]),
    "config dtype unlike the tensors": ("output-fit", lambda d: _edit_json(d / "config.json", dtype="bfloat16"),
                                        ["config dtype is bfloat16 but the weights are stored as ['float32']"]),
    "an architecture vLLM lacks": ("tied", lambda d: _edit_json(d / "config.json", architectures=["TinyLlamaLM"]),
                                   ["names no class vLLM implements"]),
    "a config that needs remote code": ("tied", lambda d: _edit_json(
        d / "config.json", model_type="tinyllama-custom", auto_map={"AutoConfig": "configuration_tiny.TinyConfig"}),
        ["does not load with AutoConfig(trust_remote_code=False)"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_each_check_rejects_an_export_broken_its_way(export, tmp_path, case):
    kind, breaks, expected = BROKEN[case]
    broken = tmp_path / "model"
    shutil.copytree(export(kind), broken)
    breaks(broken)

    problems = vllm_load_problems(broken)
    for text in expected:
        assert any(text in problem for problem in problems), f"{case}: no {text!r} in {problems}"
