"""Precision by design: the frozen model may run in bf16, but every LM-head product a loss,
the output fit or DeepSpeed's config touches stays fp32.

bf16 logits are 0.125 apart near 20; the fp32 logits checked here must equal an fp64
computation from the same (bf16) states within fp32 round-off. bf16_supported is forced
on, so bf16 autocast runs on any CPU (slowly where the CPU emulates bf16).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import SENTENCES, WORDS, tiny_setup
from tokdist_ray.config import NEW_TOKEN_OUTPUT_LOSS
from tokdist_ray.errors import ConfigError
from tokdist_ray.eval.bits_per_byte import start_token
from tokdist_ray.training import step as distill
from tokdist_ray.training.batching import collate
from tokdist_ray.training.output_fit import collect_positions, fit_chunk_ids, position_losses
from tokdist_ray.training.output_side import head_logits
from tokdist_ray.training.strategies import deepspeed_config
from tokdist_ray.vocab.merges import expand_with_merges

FP32 = dict(rtol=1e-5, atol=1e-5)  # fp32 sums over a hidden size of 64


def exact(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden.double() @ weight.double().T


def test_head_logits_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    hidden, weight = (torch.randn(32, 256) * 4).bfloat16(), torch.randn(512, 256).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = head_logits(hidden, weight)
        naive = hidden @ weight.T
    assert logits.dtype == torch.float32
    # logits up to about 100 here: fp32 sums are good to about 1e-5 of that
    torch.testing.assert_close(logits.double(), exact(hidden, weight), rtol=1e-5, atol=1e-4)
    # what the test guards against: autocast's bf16 product is off by far more
    assert (naive.double() - exact(hidden, weight)).abs().max() > 0.1


@pytest.fixture
def bf16_distiller(tiny_model_dir, monkeypatch):
    """make(losses, tied) -> (distiller, batch, products): a distiller over a bf16 copy of the
    tiny model with bf16 autocast on, and the (hidden, weight rows, logits) of every LM-head
    product it computes, listed by spies on its two logit methods."""
    monkeypatch.setattr(distill, "bf16_supported", lambda device: True)

    def make(losses, tied=False):
        distiller, examples, _ = tiny_setup(tiny_model_dir(tied=tied), losses=losses)
        distiller.model.to(torch.bfloat16)
        distiller.mixed_precision, distiller.new_token_output_positions = True, "all"
        products = []
        original, full = distiller.original_logits, distiller.full_logits
        head = distiller.model.get_output_embeddings().weight[: distiller.new_start]

        def original_spy(hidden):
            products.append((hidden, head, original(hidden)))
            return products[-1][2]

        def full_spy(hidden, rows):
            products.append((hidden, torch.cat([head.float(), rows.float()]), full(hidden, rows)))
            return products[-1][2]

        distiller.original_logits, distiller.full_logits = original_spy, full_spy
        return distiller, collate(examples), products

    return make


@pytest.mark.parametrize("losses,tied", [(["MSE-on-logits"], True), (["KL-on-logits"], False), (["CE"], True),
                                         (["MSE-on-hiddens"], False), ([NEW_TOKEN_OUTPUT_LOSS], False)])
def test_the_logits_every_loss_reads_are_fp32_from_a_bf16_model(bf16_distiller, losses, tied):
    """Untied MSE-on-hiddens: the output rows' own CE reads logits too."""
    distiller, batch, products = bf16_distiller(losses, tied)
    out = distiller(batch)
    out["loss"].backward()
    assert products, "no LM-head product was computed"
    for hidden, weight, logits in products:
        assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
        torch.testing.assert_close(logits.double(), exact(hidden, weight), **FP32)
    assert distiller.rows.input.grad.dtype == torch.float32


def test_the_output_fit_reads_fp32_logits_from_a_bf16_model(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(distill, "bf16_supported", lambda device: True)
    distiller, _, tok = tiny_setup(tiny_model_dir(tied=False))
    model = distiller.model.to(torch.bfloat16)
    expanded = expand_with_merges(tok, WORDS).tokenizer
    ids = fit_chunk_ids(expanded, SENTENCES, start_token(expanded), None)
    at = collect_positions(model, distiller.rows.input, distiller.new_start, ids, [False] * len(ids), passes=1,
                           mixed_precision=True, progress=False)
    old_rows = model.get_output_embeddings().weight[: distiller.new_start]
    assert at.hidden.dtype == at.old_log_norm.dtype == torch.float32
    torch.testing.assert_close(at.old_log_norm.double(), exact(at.hidden, old_rows).logsumexp(-1), **FP32)

    assert (at.new_target >= 0).any()
    rows = torch.randn(distiller.rows.input.shape)
    index = torch.arange(len(at.hidden))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as if a caller ran the fit under autocast
        losses = position_losses(rows, at, index)
    new = exact(at.hidden, rows)
    target = at.new_target.clamp_min(0)
    expected = torch.where(at.new_target >= 0,
                           torch.logaddexp(at.old_log_norm.double(), new.logsumexp(-1)) - new.gather(1, target[:, None])[:, 0],
                           torch.nn.functional.softplus(new.logsumexp(-1) - at.old_log_norm.double()))
    assert losses.dtype == torch.float32
    torch.testing.assert_close(losses.double(), expected, **FP32)


def test_deepspeed_keeps_its_16_bit_modes_off():
    """DeepSpeed's bf16 mode casts the trainable rows to bf16 and reduces their gradients in
    bf16: the generated config leaves it off, and overrides cannot turn it on."""
    config = deepspeed_config(3, micro_batch=2, world=2, overrides={"zero_optimization": {"overlap_comm": True}})
    assert not any(config.get(mode, {}).get("enabled") for mode in ("bf16", "bfloat16", "fp16"))
    for mode in ("bf16", "bfloat16", "fp16"):
        with pytest.raises(ConfigError, match=f"{mode} mode"):
            deepspeed_config(2, micro_batch=2, world=2, overrides={mode: {"enabled": True}})


def test_a_job_config_turning_on_a_16_bit_deepspeed_mode_fails_before_any_work(tmp_path):
    from tokdist_ray.job.config import load_config

    path = tmp_path / "job.yaml"
    path.write_text("tokens: {list: [' a']}\ndistributed:\n  deepspeed_config:\n    bf16: {enabled: true}\n")
    with pytest.raises(ConfigError, match="turns on DeepSpeed's bf16 mode"):
        load_config(str(path))
