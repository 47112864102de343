"""TransformerLayer under torch.nn.parallel.DistributedDataParallel: 2 gloo processes on CPU, each on half the batch,
give the gradients of one process on the full batch."""

import os
import pathlib
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastlayers.configs import TransformerConfig
from fastlayers.nn.transformer_layer import TransformerLayer

WORLD = 2
B, S, H = 4, 12, 32


def _config(pre: bool) -> TransformerConfig:
    # dropout 0: the masks depend on the per-rank batch shape, so only deterministic layers compare exactly
    return TransformerConfig(hidden_size=H, heads=2, intermediate_size=48, attn_dropout_ratio=0.0,
                             hidden_dropout_ratio=0.0, num_hidden_layers=2, initializer_range=0.2,
                             pre_layer_norm=pre, normalize_invertible=True, gelu_checkpoint=True)  # fmt: skip


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, H, generator=g)
    keep = torch.ones(B, S)
    keep[1, 7:] = 0
    keep[3, 2:] = 0
    target = torch.randn(B, S, H, generator=g)
    return x, keep, target


def _model(pre: bool) -> TransformerLayer:
    torch.manual_seed(1)
    return TransformerLayer(_config(pre))


def _loss(layer, x, keep, target):
    return ((layer(x, keep) - target) ** 2).mean()


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, keep, target = _data()
        part = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
        result = {}
        for pre in (True, False):
            layer = _model(pre)
            ddp = torch.nn.parallel.DistributedDataParallel(layer)
            opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
            _loss(ddp, x[part], keep[part], target[part]).backward()  # DDP averages the gradients over ranks
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            opt.step()
            result[pre] = {"grads": grads, "params": {n: p.detach().clone() for n, p in layer.named_parameters()}}
        torch.save(result, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(pathlib.Path(tmp) / "init")
        mp.start_processes(_worker, args=(init_file, tmp), nprocs=WORLD, join=True, start_method="spawn")
        ranks = [torch.load(os.path.join(tmp, f"r{r}.pt")) for r in range(WORLD)]

    x, keep, target = _data()
    for pre in (True, False):
        layer = _model(pre)
        _loss(layer, x, keep, target).backward()
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        opt.step()
        for got in ranks:
            for name, p in layer.named_parameters():
                torch.testing.assert_close(
                    got[pre]["grads"][name], p.grad, atol=1e-6, rtol=1e-5, msg=f"pre_layer_norm={pre} grad {name}"
                )
                torch.testing.assert_close(
                    got[pre]["params"][name],
                    p.detach(),
                    atol=1e-6,
                    rtol=1e-5,
                    msg=f"pre_layer_norm={pre} param {name} after one SGD step",
                )
