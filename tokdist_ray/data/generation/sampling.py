"""The CPU sampling loop: seeded, per-sample random streams (the exponential race, as
vLLM draws), left-padded batches decoded with the KV cache."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from tokdist_ray.config import GeneratedDataSource
from tokdist_ray.data.generation.requests import cut_at_eos
from tokdist_ray.vocab.models import cache_argument


def warp_logits(logits: torch.Tensor, source: GeneratedDataSource) -> torch.Tensor:
    """Temperature, then top-k and top-p, as transformers' sampling applies them."""
    logits = TemperatureLogitsWarper(source.temperature)(None, logits.float())
    if source.top_k:
        logits = TopKLogitsWarper(source.top_k)(None, logits)
    if source.top_p < 1.0:
        logits = TopPLogitsWarper(source.top_p)(None, logits)
    return logits


def draw(logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The exponential race (Gumbel-max), as vLLM samples: argmax of p / q with q ~ Exp(1)
    draws from p. Unlike an inverse-CDF draw, a tiny change in the logits (another batch
    shape) flips the result only when two ids are within rounding of each other."""
    return torch.softmax(logits, dim=-1).div_(noise.to(logits.device)).argmax(dim=-1)


class SampleStreams:
    """One random stream per sample, so that a sample's draws depend on its seed alone."""

    def __init__(self, seeds: Iterable[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def noise(self, vocab_size: int) -> torch.Tensor:
        q = torch.empty(len(self.generators), vocab_size)
        for row, generator in zip(q, self.generators):
            row.exponential_(generator=generator)
        return q


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[i, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def sample_continuations(
    model, requests: Sequence[dict], source: GeneratedDataSource, max_new_tokens: int, stop: Sequence[int], pad_id: int
) -> list[list[int]]:
    """Decode one batch of prompts (left padded, KV cached) with plain seeded sampling; each
    continuation is cut at its first EOS. A sampling loop of our own rather than `generate`,
    so that no sampling default from the model's generation_config can leak in."""
    device = next(model.parameters()).device
    input_ids, mask = left_pad([r["prompt_ids"] for r in requests], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    streams = SampleStreams(r["seed"] for r in requests)
    stop_t = torch.tensor(list(stop), dtype=torch.long, device=device)
    cache_name, cache = cache_argument(model), None
    finished = torch.zeros(len(requests), dtype=torch.bool, device=device)
    steps = []
    for _ in range(max_new_tokens):
        out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    logits_to_keep=1, **{cache_name: cache})
        cache = out[cache_name]
        logits = warp_logits(out.logits[:, -1], source)
        next_ids = draw(logits, streams.noise(logits.shape[-1]))
        steps.append(next_ids)
        finished |= torch.isin(next_ids, stop_t)
        if finished.all():
            break
        input_ids = next_ids[:, None]
        mask = torch.cat([mask, mask.new_ones(len(requests), 1)], dim=1)
        positions = positions[:, -1:] + 1
    return [cut_at_eos(row, stop) for row in torch.stack(steps, dim=1).tolist()]


def padding_id(tokenizer, stop: Sequence[int]) -> int:
    """Any id works under the attention mask; prefer the tokenizer's pad."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return stop[0] if stop else 0


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


