"""Batch norm over the global batch: two gloo processes, each with half a batch, match one
``BatchNorm2d`` on the whole batch in output, gradients and running statistics."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medcae.model.norm import GlobalBatchNorm2d, global_batch_norm


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 4, 4, generator=g) * torch.tensor([1.0, 5.0, 0.1])[:, None, None] + 2


def _reference() -> dict[str, np.ndarray]:
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
    x = _batch().requires_grad_(True)
    y = bn(x)
    (y * torch.arange(y.numel()).reshape(y.shape).float()).sum().backward()
    return {
        "y": y.detach().numpy(),
        "dx": x.grad.numpy(),
        "dw": bn.weight.grad.numpy(),
        "db": bn.bias.grad.numpy(),
        "running_mean": bn.running_mean.numpy(),
        "running_var": bn.running_var.numpy(),
    }


def _worker(rank: int, folder: str) -> None:
    # A file rendezvous: no port to pick.
    store = f"file://{folder}/rendezvous"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2)
    try:
        model = global_batch_norm(nn.Sequential(nn.BatchNorm2d(3)))
        bn = model[0]
        assert isinstance(bn, GlobalBatchNorm2d)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        full = _batch()
        x = full[rank * 4 : rank * 4 + 4].clone().requires_grad_(True)
        y = bn(x)
        weights = torch.arange(full.numel()).reshape(full.shape).float()[rank * 4 : rank * 4 + 4]
        (y * weights).sum().backward()
        # Parameter gradients as DDP would combine them: summed over workers (the loss here is
        # a sum, not a mean, so no division by the world size).
        for p in (bn.weight, bn.bias):
            dist.all_reduce(p.grad)
        np.savez(
            f"{folder}/rank{rank}.npz",
            y=y.detach().numpy(),
            dx=x.grad.numpy(),
            dw=bn.weight.grad.numpy(),
            db=bn.bias.grad.numpy(),
            running_mean=bn.running_mean.numpy(),
            running_var=bn.running_var.numpy(),
        )
    finally:
        dist.barrier()  # both ranks leave together
        dist.destroy_process_group()
    # Skip the interpreter's teardown: gloo's threads can abort the process while static
    # objects are destroyed ("terminate called without an active exception", 1 run in 3 here)
    # after everything above has been written.
    os._exit(0)


@pytest.mark.timeout(120)
def test_two_processes_with_half_batches_match_one_batch_norm_on_the_whole(tmp_path):
    ref = _reference()
    # Spawned, never forked: a fork of a process that holds a Ray connection (an earlier
    # test's session in this worker) breaks that connection's gRPC threads.
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    got = {r: dict(np.load(tmp_path / f"rank{r}.npz")) for r in (0, 1)}
    np.testing.assert_allclose(np.concatenate([got[0]["y"], got[1]["y"]]), ref["y"], atol=1e-5)
    dx = np.concatenate([got[0]["dx"], got[1]["dx"]])
    np.testing.assert_allclose(dx, ref["dx"], rtol=1e-4, atol=1e-3)
    for r in (0, 1):
        for key in ("dw", "db", "running_mean", "running_var"):
            np.testing.assert_allclose(got[r][key], ref[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_outside_ddp_it_is_batch_norm_and_keeps_the_state_dict():
    plain = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    plain(_batch())  # running statistics off their defaults
    keys = plain.state_dict()
    converted = global_batch_norm(plain)
    assert type(converted[1]) is GlobalBatchNorm2d
    assert converted.state_dict().keys() == keys.keys()
    for k, v in converted.state_dict().items():
        assert torch.equal(v, keys[k]), k
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(converted[1].state_dict())
    x = _batch()
    assert torch.allclose(converted[1](x), ref(x))
    converted.eval(), ref.eval()
    assert torch.allclose(converted[1](x), ref(x))
