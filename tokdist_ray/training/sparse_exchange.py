"""DDP's gradient exchange, sending only the new rows some rank touched.

A distillation batch embeds only the new tokens in its snippets: unless a loss reads the
new rows as output rows (tied rows under the new-token output loss or CE, trained output
rows), every other row's gradient is exactly zero on every rank, and DDP's dense
all-reduce moves them anyway (491 MB a step at 30,000 rows x 4,096). The hook below has
each rank flag the rows it touched, one byte a row; the flags are all-reduced with MAX,
and only the union's rows travel, packed into one tensor and written back in place.

A row counts as touched when any bit of it is set (so -0.0 and nan count): a row left out
is +0.0 on every rank, which is what the dense sum gives it. The result equals DDP's own
exchange bit for bit wherever the backend sums the ranks in the same order (always with
2 ranks, where a + b == b + a).

Where every row is touched (the output-row cases above) the hook sends the flags, then
the whole bucket as torch's `allreduce_hook` does: a byte a row and a pass over the
gradient more than DDP. The output fit's gradient is dense (output_fit.py), so it keeps
a plain all-reduce.
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations are the types themselves
from typing import Sequence

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook


def touched_rows(grad: torch.Tensor) -> torch.Tensor:
    """[len(grad)] bool: the rows of `grad` ([rows, ...]) with any bit set."""
    # any() over the bytes: no [rows, d] temporary, as ne(0) would make, and the fastest
    # reduction on CPU (under half of int32's time at 30,000 x 4,096)
    return grad.reshape(len(grad), -1).view(torch.uint8).any(1).bool()


def _pack(grads: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.reshape(len(g), -1)[m].reshape(-1) for g, m in zip(grads, masks)])


def _unpack(packed: torch.Tensor, grads: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    offset = 0
    for g, m in zip(grads, masks):
        flat = g.view(len(g), -1)  # a view (an error, not a copy, otherwise): the write lands in `g`
        size = int(m.sum()) * flat.shape[1]
        flat[m] = packed[offset : offset + size].view(-1, flat.shape[1])
        offset += size


def sparse_rows_hook(group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients ([rows, ...] each) averaged over the ranks as
    torch's `allreduce_hook` (DDP's own exchange: divide, then sum) does, sending only
    the rows some rank touched."""
    group = group if group is not None else dist.group.WORLD
    grads = bucket.gradients()  # views of bucket.buffer()
    union = torch.cat([touched_rows(g) for g in grads]).to(torch.uint8)
    # waited for here, not in a callback: packing needs its count, and a collective
    # issued from a gloo callback would hold one of the group's few worker threads
    dist.all_reduce(union, op=dist.ReduceOp.MAX, group=group)
    union = union.bool()
    if bool(union.all()):  # e.g. rows that are also output rows: packing would only copy them
        return allreduce_hook(group, bucket)
    masks = union.split([len(g) for g in grads])
    packed = _pack(grads, masks).div_(group.size())

    def scatter_back(summed: torch.futures.Future) -> torch.Tensor:
        _unpack(summed.value()[0], grads, masks)
        return bucket.buffer()

    return dist.all_reduce(packed, group=group, async_op=True).get_future().then(scatter_back)
