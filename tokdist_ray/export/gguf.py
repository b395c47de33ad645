"""GGUF export: an exported HF model directory as one .gguf file that llama.cpp loads.

    export_gguf("runs/demo/model", "runs/demo/model/model.gguf", dtype="f16")

Written with the `gguf` library (llama.cpp's own Python package). Architectures whose
llama.cpp layout is a renaming of the HF one: Llama (SmolLM2, Llama 3), Mistral (as
llama.cpp's `llama`) and Qwen2. Tensors stream from the safetensors shards one at a time:
the writer takes every tensor's name, shape and type first (the file's header), then
the data tensor by tensor, so no process holds the whole model.

The tokenizer goes in as llama.cpp's byte-level BPE (`gpt2`): the vocabulary, token
types, the merges of tokenizer.json (the new tokens' merges rank after the base ones, as
there), the special ids and a pre-tokenizer name. The name is decided from the
pre-tokenizer in tokenizer.json, not from a hash of encodings as llama.cpp's converter
does (the new merges change every such hash); `pre=` names it where the pre-tokenizer
is not one of PRE_TOKENIZERS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import safe_open

from tokdist_ray.errors import ExportError
from tokdist_ray.vocab.weights import shards_of

log = logging.getLogger("tokdist_ray")

GGUF_FILE = "model.gguf"  # where the job and the API write it, inside the exported HF directory
DTYPES = ("f16", "bf16", "f32")


@dataclass(frozen=True)
class GgufOptions:
    """What the job's output.gguf_* and the API's gguf_* options ask of the export."""

    dtype: str = "f16"
    pre: str | None = None  # llama.cpp's pre-tokenizer name, where the export cannot tell it

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ExportError(f"GGUF dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.pre is not None and not (isinstance(self.pre, str) and self.pre.strip()):
            raise ExportError(f"the GGUF pre-tokenizer name must be a non-empty string, got {self.pre!r}")


@dataclass(frozen=True)
class _Arch:
    name: str  # llama.cpp's architecture (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp's `llama` rotates pairs of adjacent dims, HF's rotates the two halves


ARCHITECTURES = {
    "LlamaForCausalLM": _Arch("llama", True),
    "MistralForCausalLM": _Arch("llama", True),  # llama.cpp runs Mistral as llama
    "Qwen2ForCausalLM": _Arch("qwen2", False),
}
ROPE_TYPES = ("default", "linear", "llama3")

# The pre-tokenizer regexes as tokenizer.json spells them. GPT-2's is implicit in
# ByteLevel(use_regex=true); the others are Split(regex, Isolated) before ByteLevel(use_regex=false).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.json's pre-tokenizer, as `_pre_steps` describes it -> llama.cpp's name for it
PRE_TOKENIZERS = {
    (("byte_level", True),): "gpt-2",
    (("digits",), ("byte_level", True)): "smollm",  # SmolLM/SmolLM2: single digits, then GPT-2's regex
    (("split", LLAMA3_SPLIT), ("byte_level", False)): "llama-bpe",  # Llama 3
    (("split", QWEN2_SPLIT), ("byte_level", False)): "qwen2",
    (("split", TEKKEN_SPLIT), ("byte_level", False)): "tekken",  # Mistral Nemo and later
}
# llama.cpp looks a whole pre-token up in the vocabulary before merging for these
# (tokenizer.json's model.ignore_merges); for the others it merges every pre-token
IGNORES_MERGES = ("llama-bpe", "tekken")
_F16_MAX = torch.finfo(torch.float16).max
VOCAB_TENSORS = ("token_embd.weight", "output.weight")


def export_gguf(model_dir: str | Path, out_file: str | Path, dtype: str = "f16", pre: str | None = None,
                vocab_multiple: int = 1) -> Path:
    """Write the HF model in `model_dir` (safetensors, config.json, tokenizer.json) as a
    GGUF at `out_file`: 2-D weights in `dtype` ("f16", "bf16" or "f32"), norms and biases
    in f32, as llama.cpp's own converter keeps them. `vocab_multiple` pads the vocabulary's
    rows (embedding table, untied head) with zero rows, UNUSED tokens, to a multiple of it:
    llama.cpp's CPU matmul picks its kernel by the row count (bench/README.md, "Generation
    in llama.cpp": it paid at 100 new tokens and cost at 5,000). `pre` names llama.cpp's
    pre-tokenizer where the tokenizer's is not one of PRE_TOKENIZERS. The file appears
    whole or not at all (written beside it, then renamed)."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    options = GgufOptions(dtype, pre)
    if isinstance(vocab_multiple, bool) or not isinstance(vocab_multiple, int) or vocab_multiple < 1:
        raise ExportError(f"vocab_multiple must be an int >= 1 (1: rows as they are), got {vocab_multiple!r}")
    model_dir, out_file = Path(model_dir), Path(out_file)
    shards = shards_of(model_dir)
    if not shards:
        raise ExportError(f"{model_dir} has no model.safetensors (or index): the GGUF export reads safetensors only")
    if not (model_dir / "tokenizer.json").is_file():
        raise ExportError(f"{model_dir} has no tokenizer.json: the GGUF export reads a fast tokenizer's file")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer_json = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    arch, pre = check_exportable(config, tokenizer_json, options.pre)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
    try:
        with contextlib.ExitStack() as stack:
            files = {shard: stack.enter_context(safe_open(model_dir / shard, framework="pt")) for shard in shards}
            plan = [_padded(p, vocab_multiple) for p in _tensor_plan(gguf, config, arch, files, options.dtype)]
            n_vocab = next(p.shape[0] for p in plan if p.gguf_name == "token_embd.weight")
            writer = gguf.GGUFWriter(tmp, arch.name)
            stack.callback(writer.close)
            _add_hyperparameters(gguf, writer, config, n_vocab, options.dtype, _model_name(model_dir))
            _add_tokenizer(gguf, writer, tokenizer_json, tokenizer, n_vocab, pre)
            for p in plan:
                writer.add_tensor_info(p.gguf_name, p.shape, p.numpy_dtype, p.nbytes, raw_dtype=p.raw_dtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in plan:  # the order of the header
                writer.write_tensor_data(p.read(files, config, arch))
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s (%s, %s, pre-tokenizer %s)", out_file, arch.name, options.dtype, pre)
    return out_file


def check_exportable(config, tokenizer_json: dict, pre: str | None = None) -> tuple[_Arch, str]:
    """(llama.cpp architecture, pre-tokenizer name) for a model with this config and
    tokenizer.json, or an ExportError that says why it cannot be exported and what to do.
    Reads no weights: the job calls it before training."""
    import gguf

    architectures = list(getattr(config, "architectures", None) or [])
    name = next((a for a in architectures if a in ARCHITECTURES), None)
    if name is None or ARCHITECTURES[name].name not in gguf.MODEL_ARCH_NAMES.values():
        raise ExportError(
            f"the GGUF export writes {', '.join(ARCHITECTURES)} models, and this one is "
            f"{', '.join(architectures) or getattr(config, 'model_type', 'of unknown architecture')}; "
            "leave the GGUF option off and convert the exported HF directory with llama.cpp's "
            "convert_hf_to_gguf.py, which knows more architectures"
        )
    rope_type = _rope(config.get_text_config())[1].get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ExportError(f"the GGUF export knows the rope types {ROPE_TYPES}, and this {name} uses {rope_type!r}; "
                          "convert the exported HF directory with llama.cpp's convert_hf_to_gguf.py instead")
    _check_byte_level_bpe(tokenizer_json)
    return ARCHITECTURES[name], _pre_tokenizer_name(tokenizer_json, pre)


def tokenizer_json_of(tokenizer) -> dict:
    """A loaded tokenizer's tokenizer.json, as check_exportable reads it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("the GGUF export needs a fast (Rust) tokenizer, with a tokenizer.json; this one is "
                          f"{type(tokenizer).__name__}")
    return json.loads(backend.to_str())


# ------------------------------------------------------------------ the tokenizer
def _check_byte_level_bpe(tokenizer_json: dict) -> None:
    model = tokenizer_json.get("model") or {}
    decoder = tokenizer_json.get("decoder") or {}
    problem = None
    if model.get("type") != "BPE":
        problem = f"its model is {model.get('type')}, not BPE"
    elif model.get("byte_fallback"):
        problem = ("it is a SentencePiece-style BPE with byte fallback (llama.cpp ranks those by score, "
                   "not by merges)")
    elif model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problem = "its BPE marks word-internal pieces (continuing_subword_prefix / end_of_word_suffix)"
    elif decoder.get("type") != "ByteLevel":
        problem = f"its decoder is {decoder.get('type')}, not ByteLevel"
    if problem:
        raise ExportError(f"the GGUF export writes byte-level BPE tokenizers (llama.cpp's gpt2 model), and {problem}; "
                          "convert the exported HF directory with llama.cpp's convert_hf_to_gguf.py instead")


def _pre_tokenizer_name(tokenizer_json: dict, pre: str | None) -> str:
    steps = _pre_steps(tokenizer_json.get("pre_tokenizer"))
    if pre is None:
        pre = PRE_TOKENIZERS.get(steps)
        if pre is None:
            raise ExportError(
                f"the tokenizer's pre-tokenizer ({_describe(steps)}) is none that the GGUF export knows "
                f"({', '.join(sorted(set(PRE_TOKENIZERS.values())))}); if llama.cpp has a pre-tokenizer that splits "
                "text the same way, name it: export_gguf(..., pre=NAME), gguf_pre=NAME in the API, "
                "--output.gguf_pre NAME in a job"
            )
    normalizer = (tokenizer_json.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        log.warning("the tokenizer normalises text (%s) and llama.cpp's BPE does not: text that normalisation "
                    "changes is tokenised differently there", normalizer)
    ignores = bool((tokenizer_json.get("model") or {}).get("ignore_merges"))
    if ignores != (pre in IGNORES_MERGES):
        how = {True: "looks a whole pre-token up in the vocabulary before merging", False: "merges every pre-token"}
        log.warning("under the pre-tokenizer %r llama.cpp %s, and this tokenizer %s (tokenizer.json "
                    "model.ignore_merges): a pre-token that is itself a vocabulary entry may be tokenised "
                    "differently there", pre, how[pre in IGNORES_MERGES], how[ignores])
    return pre


def _pre_steps(pre_tokenizer: dict | None) -> tuple:
    """tokenizer.json's pre-tokenizer as a tuple of the steps PRE_TOKENIZERS is keyed by
    (unknown steps as ("other", json), which match nothing)."""
    if pre_tokenizer is None:
        return ()
    if pre_tokenizer.get("type") == "Sequence":
        return tuple(step for p in pre_tokenizer.get("pretokenizers", []) for step in _pre_steps(p))
    kind = pre_tokenizer.get("type")
    if kind == "ByteLevel" and not pre_tokenizer.get("add_prefix_space"):
        return (("byte_level", bool(pre_tokenizer.get("use_regex", True))),)
    if kind == "Digits" and pre_tokenizer.get("individual_digits"):
        return (("digits",),)
    pattern = pre_tokenizer.get("pattern") or {}
    if (kind == "Split" and "Regex" in pattern and pre_tokenizer.get("behavior") == "Isolated"
            and not pre_tokenizer.get("invert")):
        return (("split", pattern["Regex"]),)
    return (("other", json.dumps(pre_tokenizer, sort_keys=True)),)


def _describe(steps: tuple) -> str:
    names = {"byte_level": lambda s: f"ByteLevel(use_regex={s[1]})", "digits": lambda s: "Digits(individual)",
             "split": lambda s: f"Split({s[1]!r})", "other": lambda s: s[1][:200]}
    return " then ".join(names[s[0]](s) for s in steps) or "none"


def _add_tokenizer(gguf, writer, tokenizer_json: dict, tokenizer, n_vocab: int, pre: str) -> None:
    tokens, types = _vocabulary(gguf, tokenizer_json, n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merges(tokenizer_json))
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    # Said outright: llama.cpp's defaults differ by pre-tokenizer (llama-bpe adds BOS).
    with_specials, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(len(with_specials) > len(plain) and with_specials[0] == tokenizer.bos_token_id)
    writer.add_add_eos_token(len(with_specials) > len(plain) and with_specials[-1] == tokenizer.eos_token_id)
    if isinstance(getattr(tokenizer, "chat_template", None), str):
        writer.add_chat_template(tokenizer.chat_template)


def _vocabulary(gguf, tokenizer_json: dict, n_vocab: int) -> tuple[list[str], list[int]]:
    """(token strings, token types) for ids 0..n_vocab-1: BPE entries are NORMAL, added
    tokens CONTROL (special) or USER_DEFINED (matched whole in raw text, as Hugging Face
    added tokens are), rows no token uses UNUSED placeholders."""
    vocab = tokenizer_json["model"]["vocab"]
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in vocab.items()}
    for added in tokenizer_json.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    if max(by_id) >= n_vocab:
        raise ExportError(f"the tokenizer has ids up to {max(by_id)} and the embedding table only {n_vocab} rows")
    entries = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n_vocab)]
    tokens = [t for t, _ in entries]
    if len(set(tokens)) != len(tokens):
        seen: dict[str, int] = {}
        twice = [(t, seen[t], i) for i, t in enumerate(tokens) if seen.setdefault(t, i) != i]
        raise ExportError(f"llama.cpp needs every token string once; {twice[0][0]!r} has ids {twice[0][1]} and "
                          f"{twice[0][2]} ({len(twice)} such tokens)")
    return tokens, [int(k) for _, k in entries]


def _merges(tokenizer_json: dict) -> list[str]:
    """tokenizer.json's merges, "a b" strings or [a, b] pairs, as llama.cpp's "a b" strings."""
    merges = []
    for merge in tokenizer_json["model"].get("merges", []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        if " " in left or " " in right:
            raise ExportError(f"merge {merge!r} holds a space, which llama.cpp's merge list cannot spell")
        merges.append(f"{left} {right}")
    return merges


# ------------------------------------------------------------------ hyperparameters
def _rope(text) -> tuple[float, dict]:
    """(rope theta, rope parameters) from a transformers 5 `rope_parameters` or an older
    `rope_theta` plus `rope_scaling`."""
    params = dict(getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params["type"]
    return float(params.get("rope_theta", getattr(text, "rope_theta", 10000.0))), params


def _head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def _add_hyperparameters(gguf, writer, config, n_vocab: int, dtype: str, name: str) -> None:
    text = config.get_text_config()
    theta, rope = _rope(text)
    n_head = text.num_attention_heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(text.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(text, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(_head_dim(text))
    if _head_dim(text) != text.hidden_size // n_head:  # e.g. Mistral Nemo
        writer.add_key_length(_head_dim(text))
        writer.add_value_length(_head_dim(text))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(text.rms_norm_eps)
    writer.add_vocab_size(n_vocab)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype]
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    window = getattr(text, "sliding_window", None)
    if window and getattr(text, "use_sliding_window", True) and window < text.max_position_embeddings:
        log.warning("the model attends within a sliding window of %d tokens, which llama.cpp's %s architecture "
                    "does not: prompts longer than that are attended in full there", window, text.model_type)


def _model_name(model_dir: Path) -> str:
    """The source model as report.json names it (an export of tokdist-ray), else the folder's name."""
    try:
        return str(json.loads((model_dir / "report.json").read_text(encoding="utf-8"))["model"])
    except (OSError, ValueError, KeyError, TypeError):
        return model_dir.name


def rope_freq_factors(text) -> torch.Tensor:
    """llama.cpp's `rope_freqs` for Llama 3.1-style rope scaling: the factor each rotary
    frequency is divided by, i.e. unscaled / scaled inverse frequencies, as transformers
    computes the scaled ones."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    theta, _ = _rope(text)
    dim = _head_dim(text)
    unscaled = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](text, "cpu")
    return (unscaled / scaled.float()).contiguous()


# ------------------------------------------------------------------ tensors
@dataclass(frozen=True)
class _PlannedTensor:
    gguf_name: str
    source: tuple[str, str] | None  # (shard, HF name); None for a tensor the export computes
    shape: tuple[int, ...]
    out_dtype: str  # "f32", "f16" or "bf16"

    @property
    def numpy_dtype(self):
        import numpy as np

        return {"f32": np.float32, "f16": np.float16, "bf16": np.int16}[self.out_dtype]

    @property
    def raw_dtype(self):
        import gguf

        return gguf.GGMLQuantizationType.BF16 if self.out_dtype == "bf16" else None

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * (4 if self.out_dtype == "f32" else 2)

    def read(self, files: dict, config, arch: _Arch):
        """This tensor in llama.cpp's layout and type, as a numpy array."""
        text = config.get_text_config()
        if self.source is None:  # rope_freqs
            tensor = rope_freq_factors(text)
        else:
            tensor = files[self.source[0]].get_tensor(self.source[1])
            if arch.permute_qk and re.search(r"\.attn_[qk]\.", self.gguf_name):
                n_head = text.num_attention_heads
                if ".attn_k." in self.gguf_name:
                    n_head = getattr(text, "num_key_value_heads", None) or n_head
                tensor = permute_qk(tensor, n_head)
        if len(tensor) < self.shape[0]:  # a padded vocabulary: zero rows, UNUSED tokens
            tensor = torch.cat([tensor, tensor.new_zeros(self.shape[0] - len(tensor), *tensor.shape[1:])])
        if self.out_dtype == "f16" and tensor.abs().max() > _F16_MAX:
            raise ExportError(f"{self.source[1] if self.source else self.gguf_name} holds values beyond float16's "
                              f"range (±{_F16_MAX:g}); export the GGUF in bf16 or f32")
        if self.out_dtype == "bf16":
            return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
        return tensor.to(torch.float16 if self.out_dtype == "f16" else torch.float32).contiguous().numpy()


def permute_qk(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows (or bias entries) of q_proj/k_proj in llama.cpp's order: within each head,
    HF rotates dim i with dim i + d/2, llama.cpp's `llama` rotates dims 2i and 2i + 1, so
    row i of the first half goes to 2i and row i of the second half to 2i + 1.
    transformers' GGUF loader reverses exactly this."""
    half = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_plan(gguf, config, arch: _Arch, files: dict, dtype: str) -> list[_PlannedTensor]:
    """Every tensor of the GGUF, in the order it is written: token_embd, the blocks in
    order, then the rest."""
    text = config.get_text_config()
    names = gguf.get_tensor_name_map(_model_arch(gguf, arch.name), text.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan, unmapped = [], []
    for shard, handle in files.items():
        for hf_name in handle.keys():
            if hf_name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer some checkpoints carry; llama.cpp computes it
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                unmapped.append(hf_name)
                continue
            if tied and gguf_name == "output.weight":
                continue  # llama.cpp reads a tied head from token_embd
            shape = tuple(handle.get_slice(hf_name).get_shape())
            plan.append(_PlannedTensor(gguf_name, (shard, hf_name), shape, dtype if len(shape) > 1 else "f32"))
    if unmapped:
        raise ExportError(f"{len(unmapped)} tensors have no llama.cpp {arch.name} name ({', '.join(unmapped[:3])}); "
                          "convert the exported HF directory with llama.cpp's convert_hf_to_gguf.py instead")
    if _rope(text)[1].get("rope_type") == "llama3":
        plan.append(_PlannedTensor("rope_freqs.weight", None, (_head_dim(text) // 2,), "f32"))
    return sorted(plan, key=_write_order)


def _padded(p: _PlannedTensor, multiple: int) -> _PlannedTensor:
    """A vocabulary tensor with its rows rounded up to a multiple (read() fills zeros)."""
    if p.gguf_name not in VOCAB_TENSORS:
        return p
    rows = -(-p.shape[0] // multiple) * multiple
    return replace(p, shape=(rows, *p.shape[1:]))


def _write_order(p: _PlannedTensor):
    block = re.match(r"blk\.(\d+)\.", p.gguf_name)
    rank = 0 if p.gguf_name.startswith("token_embd") else 1 if p.gguf_name.startswith("rope_freqs") else 2
    return (rank, int(block.group(1)) if block else 1 << 30, p.gguf_name)


def _model_arch(gguf, name: str):
    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)
