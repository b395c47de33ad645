"""DDP's gradient exchange of the touched rows only (training/sparse_exchange.py): on 2
gloo processes it equals the dense all-reduce bit for bit, and sends only the union of
the rows the ranks touched."""

import contextlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.helpers import in_gloo_ranks, tiny_setup
from tokdist_ray.config import NEW_TOKEN_OUTPUT_LOSS
from tokdist_ray.training.batching import collate
from tokdist_ray.training.output_fit import FitPositions, position_losses
from tokdist_ray.training.sparse_exchange import sparse_rows_hook, touched_rows
from tokdist_ray.training.strategies import DataParallel

WORLD = 2


@contextlib.contextmanager
def _recorded_all_reduces():
    """[(dtype, numel)] of each tensor all-reduced from Python while the block runs."""
    sent, all_reduce = [], dist.all_reduce

    def recording(tensor, *args, **kwargs):
        sent.append((tensor.dtype, tensor.numel()))
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = recording
    try:
        yield sent
    finally:
        dist.all_reduce = all_reduce


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)  # torch.equal on floats would take -0.0 for +0.0


# ---------------------------------------------------------------- chosen gradients
SHAPES = {"first": (40, 8), "second": (12, 8)}  # two row tables, one DDP bucket


def _chosen_gradients(rank: int) -> dict[str, torch.Tensor]:
    """Random rows per rank, overlapping in part; "first" rows 30-39 touched by neither,
    row 29 -0.0 on rank 0 only (the dense sum makes it +0.0)."""
    g = torch.Generator().manual_seed(rank)
    grads = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    for name, span in (("first", 20), ("second", 6)):
        rows = torch.randperm(span, generator=g)[:5] + 5 * rank
        grads[name][rows] = torch.randn(5, 8, generator=g)
    if rank == 0:
        grads["first"][29] = -0.0
    return grads


class _Rows(nn.Module):
    """Parameters whose gradient is the tensor passed in, bit for bit (d(x * g)/dx = 1 * g)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = (nn.Parameter(torch.zeros(shape)) for shape in SHAPES.values())

    def forward(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.first * grads["first"]).sum() + (self.second * grads["second"]).sum()


def _exchange_chosen(rank: int) -> dict:
    grads = _chosen_gradients(rank)
    dense = {}
    for name, grad in grads.items():  # torch's allreduce_hook: divide, then sum
        dense[name] = grad.clone().div_(WORLD)
        dist.all_reduce(dense[name])
    plain = DistributedDataParallel(_Rows())
    plain(grads).backward()
    hooked = DistributedDataParallel(_Rows())
    hooked.register_comm_hook(None, sparse_rows_hook)
    with _recorded_all_reduces() as sent:
        hooked(grads).backward()
    return {"local": grads, "dense": dense, "sent": sent,
            "plain": {n: p.grad for n, p in plain.module.named_parameters()},
            "hooked": {n: p.grad for n, p in hooked.module.named_parameters()}}


@pytest.fixture(scope="module")
def chosen(tmp_path_factory):
    return in_gloo_ranks(WORLD, tmp_path_factory.mktemp("chosen"), _exchange_chosen)


def test_sparse_exchange_equals_the_dense_all_reduce_bit_for_bit(chosen):
    for rank in chosen:
        for name in SHAPES:
            assert torch.equal(_bits(rank["hooked"][name]), _bits(rank["dense"][name])), name
            assert torch.equal(_bits(rank["hooked"][name]), _bits(rank["plain"][name])), name  # DDP's own exchange
    assert _bits(chosen[0]["dense"]["first"][29]).eq(0).all()  # +0.0, where rank 0 holds -0.0


def test_only_the_union_of_the_touched_rows_is_sent(chosen):
    union = {name: touched_rows(chosen[0]["local"][name]) | touched_rows(chosen[1]["local"][name]) for name in SHAPES}
    assert not torch.equal(touched_rows(chosen[0]["local"]["first"]), touched_rows(chosen[1]["local"]["first"]))
    rows = sum(n for n, _ in SHAPES.values())
    packed = sum(int(u.sum()) for u in union.values()) * 8
    assert packed < sum(r * c for r, c in SHAPES.values()) / 2
    for rank in chosen:  # one byte a row for the flags, then the union's rows
        assert rank["sent"] == [(torch.uint8, rows), (torch.float32, packed)]


# ---------------------------------------------------------------- the distiller under DataParallel
CASES = {  # name: (tied, losses, train_output, rows some rank left untouched)
    "tied, hidden-state MSE": (True, ("MSE-on-hiddens",), False, True),
    "untied, fixed output rows, new-token output loss": (False, ("MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS), False, True),
    "untied, output rows trained with CE": (False, ("MSE-on-hiddens",), True, True),
    "tied, new-token output loss (every row is an output row)": (True, ("MSE-on-hiddens", NEW_TOKEN_OUTPUT_LOSS), False, False),
}
SENTENCE_OF_RANK = (0, 3)  # tests.helpers.SENTENCES: one has only Krankenwagen, the other only Schmetterling


def _trainable(distiller) -> dict[str, torch.Tensor]:
    return {n: p for n, p in distiller.named_parameters() if p.requires_grad}


def _built(model_dir: str, case: str, rank: int):
    """A fresh tiny distiller for `case`, and this rank's batch."""
    _, losses, train_output, _ = CASES[case]
    distiller, examples, _ = tiny_setup(model_dir, losses=losses, train_output=train_output)
    return distiller, collate([examples[SENTENCE_OF_RANK[rank]]])


def _distiller_gradients(rank: int, model_dirs: dict[bool, str]) -> dict:
    results = {}
    for case, (tied, *_) in CASES.items():
        local, batch = _built(model_dirs[tied], case, rank)
        local(batch)["loss"].backward()
        hooked, _ = _built(model_dirs[tied], case, rank)
        parallel = DataParallel(hooked, None, None, torch.device("cpu"))  # no optimizer step taken
        with _recorded_all_reduces() as sent:
            parallel(batch)["loss"].backward()  # DDP must outlive the backward: its reducer exchanges
        plain, _ = _built(model_dirs[tied], case, rank)
        reference = DistributedDataParallel(plain)
        reference(batch)["loss"].backward()
        results[case] = {key: {n: p.grad for n, p in _trainable(d).items()}
                         for key, d in (("local", local), ("hooked", hooked), ("plain", plain))}
        results[case]["sent"] = sent
    return results


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model_dir):
    model_dirs = {tied: str(tiny_model_dir(tied=tied)) for tied in (True, False)}
    return in_gloo_ranks(WORLD, tmp_path_factory.mktemp("distilled"), _distiller_gradients, model_dirs)


@pytest.mark.parametrize("case", CASES)
def test_data_parallel_gradients_equal_ddps_own_exchange_bit_for_bit(distilled, case):
    ranks = [r[case] for r in distilled]
    for rank in ranks:
        assert not torch.equal(rank["plain"]["rows.input"], rank["local"]["rows.input"])  # DDP did exchange
        for name, grad in rank["plain"].items():
            assert torch.equal(_bits(rank["hooked"][name]), _bits(grad)), name
    union = {name: touched_rows(ranks[0]["local"][name]) | touched_rows(ranks[1]["local"][name]) for name in ranks[0]["local"]}
    width = ranks[0]["local"]["rows.input"].shape[1]
    for rank in ranks:  # the flags, then the union's rows (every row in the dense branch)
        assert rank["sent"] == [(torch.uint8, sum(len(u) for u in union.values())),
                                (torch.float32, sum(int(u.sum()) for u in union.values()) * width)]
    local = [touched_rows(r["local"]["rows.input"]) for r in ranks]
    if CASES[case][3]:  # the ranks touched different rows, and some rows neither
        assert not torch.equal(local[0], local[1]) and not bool((local[0] | local[1]).all())
    else:  # every row: the hook's dense branch
        assert bool(local[0].all() and local[1].all())


def test_the_output_fits_gradient_touches_every_new_row():
    """Every position's normaliser sums over all new rows, so fit_output_rows has no row
    to leave out of its all-reduce: it stays dense."""
    g = torch.Generator().manual_seed(0)
    n, d, n_new = 64, 8, 50
    at = FitPositions(torch.randn(n, d, generator=g), torch.randn(n, generator=g) + 5,
                      torch.where(torch.arange(n) % 8 == 0, torch.arange(n) % n_new, -1), torch.zeros(n, dtype=torch.bool),
                      torch.ones(n))
    rows = torch.randn(n_new, d, generator=g).requires_grad_(True)
    position_losses(rows, at, torch.arange(n)).sum().backward()
    assert touched_rows(rows.grad).all()
