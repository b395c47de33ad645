"""The Token Distillation step: frozen model, trainable new rows, losses, target layer.

Only `NewRows` is trainable: an fp32 `[n_new, d]` input table (and, for untied models
trained with CE, an output table). The model itself is never resized or modified during
training, so optimizer state and gradients are O(n_new * d) and data-parallel all-reduce
moves only the new rows' gradient.

Precision: the frozen model may run in bf16 (bf16 weights, or autocast where the hardware
runs bf16 well); the new rows, their gradients and every LM-head product a loss reads are
fp32 (`output_side.head_logits`, computed outside autocast).
"""

from __future__ import annotations

import contextlib
import copy
from typing import NamedTuple, Sequence

import torch
from torch import nn

from tokdist_ray.config import DistillationConfig
from tokdist_ray.preflight import check_target_layer
from tokdist_ray.training.losses import LOSSES, Loss, OutputRowsCE, States, check_methods, depths
from tokdist_ray.training.output_side import head_logits
from tokdist_ray.vocab.models import cache_argument


class RunStates(NamedTuple):
    target: torch.Tensor | None
    final: torch.Tensor | None
    cache: object = None


class NewRows(nn.Module):
    """The trainable embedding rows of the new tokens, fp32 master copies.

    `output` is a Parameter when an untied model's output rows are trained with CE, a
    fixed buffer for the zero / subtoken-mean policies, and None for tied models.
    """

    def __init__(self, input_rows: torch.Tensor, output_rows: torch.Tensor | None = None, train_output: bool = False):
        super().__init__()
        self.input = nn.Parameter(input_rows.detach().float().clone())
        if output_rows is None:
            self.output = None
        elif train_output:
            self.output = nn.Parameter(output_rows.detach().float().clone())
        else:
            self.register_buffer("output", output_rows.detach().float().clone())

    @property
    def trains_output(self) -> bool:
        return isinstance(self.output, nn.Parameter)


def embed_with_new_rows(table: nn.Module, new_rows: torch.Tensor, ids: torch.Tensor, new_start: int) -> torch.Tensor:
    """Input embeddings of ids in the expanded vocabulary: old ids from the model's own
    (unresized) table, new ids (>= new_start) from `new_rows`."""
    is_new = ids >= new_start
    old = table(ids.masked_fill(is_new, 0))
    new = new_rows[(ids - new_start).clamp(min=0)].to(old.dtype)
    return torch.where(is_new[..., None], new, old)


def truncated_decoder(decoder: nn.Module, n_layers: int) -> nn.Module:
    """A view of `decoder` that runs only its first `n_layers` layers.

    It shares every weight with the original (a shallow copy with its own module dict),
    so nothing is duplicated. The final norm is kept only when all layers run: that
    matches Hugging Face's `hidden_states[n_layers]`, which is post-norm only for the last.
    """
    if n_layers == len(decoder.layers):
        return decoder
    view = copy.copy(decoder)
    view._modules = dict(decoder._modules)
    view.layers = nn.ModuleList(list(decoder.layers)[:n_layers])
    view.norm = nn.Identity()
    return view


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast where the hardware runs bf16 well; a no-op elsewhere."""
    if enabled and bf16_supported(device):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # Without native bf16 instructions (AVX-512 BF16 / AMX), bf16 matmuls are
        # emulated and slower than fp32, so mixed precision would only cost accuracy.
        # ATEN_CPU_CAPABILITY=avx2 (torch's kernels held to AVX2) counts as without.
        capability = torch.backends.cpu.get_cpu_capability()
        return (capability.startswith("AVX512") or capability == "AMX") and _cpu_has_native_bf16()
    return False


def _cpu_has_native_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((check and check()) or (amx and amx()))


def _cache_of(output, name: str, wanted: bool) -> object:
    # reading the old name when not wanted, even to find None, warns in transformers 5.x
    return getattr(output, name) if wanted else None


class TokenDistiller(nn.Module):
    """Computes the distillation loss of a batch (see batch.collate for its tensors).

    Student: the merged ids, new ids (>= new_start) embedded from `rows.input`.
    Teacher: the original ids, run without grad. Each runs only what the chosen losses read
    (losses.LOSSES: their `needs`): both stop at the target layer unless a loss reads final
    states, and the teacher runs only for a loss that compares against it. The loss is the
    sum of the losses' weighted terms, in LOSSES' order.
    An untied model's trainable output rows learn from their own CE, or, with the
    new-token output loss, from the teacher instead.
    """

    def __init__(
        self,
        model: nn.Module,
        rows: NewRows,
        new_start: int,
        loss_methods: Sequence[str] = ("MSE-on-hiddens",),
        target_layer: int = -1,
        mixed_precision: bool = True,
        new_token_output_weight: float = 1.0,
        new_token_output_positions: str = "new_tokens",
    ):
        super().__init__()
        loss_methods = check_methods(loss_methods)
        self.model = model
        self.rows = rows
        self.new_start = new_start
        self.losses = tuple(loss_methods)
        self.new_token_output_weight = new_token_output_weight
        self.new_token_output_positions = new_token_output_positions
        self.mixed_precision = mixed_precision
        decoder = model.get_decoder()
        self.n_layers = len(decoder.layers)
        check_target_layer(target_layer, self.n_layers)
        self.target = target_layer % (self.n_layers + 1)
        self._decoder = [decoder]  # lists keep these views out of the module tree
        self._target_decoder = [truncated_decoder(decoder, self.target)]
        self.tied = rows.output is None
        self.reuse_prefix = True  # off only to check that reuse changes nothing
        self._cache_arg = cache_argument(decoder)

    @classmethod
    def from_config(cls, model: nn.Module, rows: NewRows, new_start: int, cfg: DistillationConfig) -> "TokenDistiller":
        """The step a DistillationConfig describes (its losses, their weighting, target layer, precision)."""
        return cls(model, rows, new_start, cfg.loss_methods, cfg.target_layer, cfg.mixed_precision,
                   cfg.new_token_output_weight, cfg.new_token_output_positions)

    # ------------------------------------------------------------------ pieces
    def embed_student(self, ids: torch.Tensor) -> torch.Tensor:
        return embed_with_new_rows(self.model.get_input_embeddings(), self.rows.input, ids, self.new_start)

    def hidden_states(self, need_target: bool, need_final: bool, cache=None, keep_cache=False, **inputs) -> RunStates:
        """Target-layer and final states (each None when not needed), and the KV cache
        when `keep_cache`. `cache` holds states of earlier positions to continue from."""
        kwargs = {self._cache_arg: cache, "use_cache": keep_cache or cache is not None}
        if not need_final:
            out = self._target_decoder[0](**inputs, **kwargs)
            states = out.last_hidden_state
            return RunStates(states, states if self.target == self.n_layers else None, _cache_of(out, self._cache_arg, keep_cache))
        want_inner = need_target and self.target != self.n_layers
        out = self._decoder[0](**inputs, **kwargs, output_hidden_states=want_inner)
        final = out.last_hidden_state
        target = (out.hidden_states[self.target] if want_inner else final) if need_target else None
        return RunStates(target, final, _cache_of(out, self._cache_arg, keep_cache))

    def student_states(self, student_ids, mask, teacher: RunStates | None, split: int, need_target, need_final) -> RunStates:
        """Student states for the whole batch. With a teacher cache and split > 0, only
        positions from `split` on are run: before the first new token the student's
        input equals the teacher's, so its states there are the teacher's, exactly."""
        if not split:
            return self.hidden_states(need_target, need_final, inputs_embeds=self.embed_student(student_ids))
        surplus = teacher.cache.get_seq_length() - split
        if surplus:
            teacher.cache.crop(-surplus)  # negative: drop that many positions (any 5.x version)
        suffix = self.hidden_states(
            need_target, need_final, cache=teacher.cache, inputs_embeds=self.embed_student(student_ids[:, split:])
        )

        def join(prefix, rest):
            return None if rest is None else torch.cat([prefix[:, :split].to(rest.dtype), rest], dim=1)

        return RunStates(join(teacher.target, suffix.target), join(teacher.final, suffix.final), None)

    def shared_prefix(self, student_ids: torch.Tensor, mask: torch.Tensor) -> int:
        """Positions before the batch's first new token (at least 1 left to run)."""
        is_new = (student_ids >= self.new_start) & mask
        first = torch.where(is_new.any(1), is_new.float().argmax(1), torch.full_like(is_new[:, 0], is_new.shape[1], dtype=torch.long))
        return int(min(int(first.min()), student_ids.shape[1] - 1))

    def original_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the original vocabulary only (rows past it are padding or new)."""
        head = self.model.get_output_embeddings()
        bias = head.bias[: self.new_start] if getattr(head, "bias", None) is not None else None
        return head_logits(hidden, head.weight[: self.new_start], bias)

    def full_logits(self, hidden: torch.Tensor, output_rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits over the expanded vocabulary, the new tokens' from `output_rows`."""
        return torch.cat([self.original_logits(hidden), head_logits(hidden, output_rows)], dim=-1)

    # ------------------------------------------------------------------ the step
    def terms(self) -> list[Loss]:
        """The chosen losses in LOSSES' order; then the output rows' own CE, where they train
        and no chosen loss trains them."""
        chosen = [loss for name, loss in LOSSES.items() if name in self.losses]
        if self.rows.trains_output and not any(loss.trains_output_rows for loss in chosen):
            chosen.append(OutputRowsCE())
        return chosen

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.rows.input.device
        student_ids = batch["student_ids"].to(device)
        mask = batch["student_mask"].to(device)
        teacher_ids = batch["teacher_ids"].to(device)
        terms = self.terms()
        student_target, student_final = depths(terms, of_teacher=False)
        teacher_target, teacher_final = depths(terms, of_teacher=True)
        run_teacher = teacher_target or teacher_final
        # reuse the teacher's prefix only when it ran the states the student needs, to the same layers
        reuse = (self.reuse_prefix and run_teacher and (teacher_target or not student_target)
                 and (teacher_final == student_final or self.target == self.n_layers))
        split = self.shared_prefix(student_ids, mask) if reuse else 0

        parts: dict[str, torch.Tensor] = {}
        with autocast_context(device, self.mixed_precision):
            teacher = None
            if run_teacher:
                with torch.no_grad():
                    teacher = self.hidden_states(teacher_target, teacher_final, keep_cache=split > 0, input_ids=teacher_ids)
            student = self.student_states(student_ids, mask, teacher, split, student_target, student_final)
            states = States(self, student_ids, mask, teacher_ids, batch["teacher_index"].to(device), student, teacher)
            loss = torch.zeros((), device=device)
            for term in terms:
                parts[term.part] = value = term.compute(states)
                loss = loss + term.weighted(value, loss, states)

        # the share of the student's positions taken from the teacher's prefix, not run
        skipped = mask[:, :split].sum() / mask.sum()
        return {"loss": loss, **{k: v.detach() for k, v in parts.items()}, "prefix_skipped": skipped.float()}
