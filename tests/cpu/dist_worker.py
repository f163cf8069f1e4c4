"""Two-process checks of mhc.MHC under DDP and FSDP2 (gloo, CPU), run by tests/cpu/test_distributed.py.

``python -m tests.cpu.dist_worker PORT OUTDIR`` spawns 2 ranks on 127.0.0.1:PORT; each rank runs every check and
writes ``OUTDIR/rank{r}.json`` with the measured differences against a single-process run of the same model on the
full batch (every rank computes that reference itself, so no communication is needed to compare).
"""

from __future__ import annotations

import datetime
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import mhc

C, N, SITES, STEPS, LR = 32, 4, 4, 3, 0.05
WORLD = 2


class Model(nn.Module):
    def __init__(self, recompute):
        super().__init__()
        self.embed = nn.Linear(8, C)
        sites = []
        for i in range(SITES):
            ffn = nn.Sequential(nn.RMSNorm(C), nn.Linear(C, 2 * C), nn.GELU(), nn.Linear(2 * C, C))
            sites.append(mhc.MHC(ffn, C, N, kind="ffn", layer_index=i, post_stream=None))
        self.stack = mhc.MHCStack(sites, recompute_block=recompute)
        self.head = nn.Linear(C, 1)

    def forward(self, x):
        return self.head(mhc.collapse(self.stack(mhc.expand(self.embed(x), N)), N, "mean")).squeeze(-1)


def make_model(recompute) -> Model:
    torch.manual_seed(0)
    model = Model(recompute)
    with torch.no_grad():
        for site in model.stack.layers:
            site.phi.normal_(0, 0.05)
            site.bias.add_(0.5 * torch.randn_like(site.bias))
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, generator=g)) for _ in range(STEPS)]


def train(model, data, rank=None):
    """SGD steps; with ``rank`` set, each rank takes its half of every batch (DDP/FSDP average the gradients)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for x, y in data:
        if rank is not None:
            x, y = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def global_loss(local):
    total = local.clone()
    dist.all_reduce(total)
    return total / WORLD


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def full_state(model) -> dict:
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def run(rank: int, port: int, outdir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )  # fmt: skip
    torch.set_num_threads(1)
    out: dict = {}
    data = batches()
    probe = torch.randn(3, 6, 8, generator=torch.Generator().manual_seed(2))
    for recompute in (None, 2):
        tag = f"r{recompute or 0}"
        ref = make_model(recompute)
        ref_losses = train(ref, data)
        ref_state = {k: v.detach() for k, v in ref.state_dict().items()}

        # DDP
        ddp = DDP(make_model(recompute))
        losses = global_loss(train(ddp, data, rank))
        out[f"ddp_{tag}_loss"] = float((losses - ref_losses).abs().max())
        out[f"ddp_{tag}_params"] = max_diff(ddp.module.state_dict(), ref_state)
        if rank == 0:
            torch.save(ddp.module.state_dict(), os.path.join(outdir, f"ddp_{tag}.pt"))
        dist.barrier()
        fresh = make_model(recompute)
        fresh.load_state_dict(torch.load(os.path.join(outdir, f"ddp_{tag}.pt")))
        with torch.no_grad():
            out[f"ddp_{tag}_reload"] = float((fresh(probe) - ref(probe)).abs().max())

        # FSDP2: each recompute block (or each site) is one unit, then the root
        fsdp = make_model(recompute)
        for unit in fsdp.stack.blocks() if recompute else fsdp.stack.layers:
            fully_shard(unit)
        fully_shard(fsdp)
        losses = global_loss(train(fsdp, data, rank))
        out[f"fsdp_{tag}_loss"] = float((losses - ref_losses).abs().max())
        out[f"fsdp_{tag}_params"] = max_diff(full_state(fsdp), ref_state)
        # distributed checkpoint: save the sharded state, load it into a fresh sharded model
        path = os.path.join(outdir, f"dcp_{tag}")
        dcp.save(get_model_state_dict(fsdp), checkpoint_id=path)
        fresh = make_model(recompute)
        for unit in fresh.stack.blocks() if recompute else fresh.stack.layers:
            fully_shard(unit)
        fully_shard(fresh)
        state = get_model_state_dict(fresh)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(fresh, state)
        with torch.no_grad():
            out[f"fsdp_{tag}_dcp_reload"] = float((fresh(probe) - ref(probe)).abs().max())

    # FSDP2 mixed precision, the documented choice: sublayers are bf16 units, each MHC site an fp32 unit
    ref = make_model(None)
    ref_losses = train(ref, data)
    mp_model = make_model(None)
    seen: dict = {}
    site0 = mp_model.stack.layers[0]
    site0.register_forward_pre_hook(lambda m, a: seen.update(phi=str(m.phi.dtype), res=str(a[0].dtype)))
    site0.sublayer.register_forward_pre_hook(
        lambda m, a: seen.update(sub=str(m[1].weight.dtype), sub_in=str(a[0].dtype))
    )
    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for site in mp_model.stack.layers:
        fully_shard(site.sublayer, mp_policy=bf16)
        fully_shard(site, mp_policy=fp32)
    fully_shard(mp_model, mp_policy=fp32)
    losses = global_loss(train(mp_model, data, rank))
    out["mp_units_dtypes"] = dict(seen)
    out["mp_units_loss"] = float((losses - ref_losses).abs().max())
    out["mp_units_params"] = max_diff(full_state(mp_model), {k: v.detach() for k, v in ref.state_dict().items()})

    # FSDP2 mixed precision, the alternative: one bf16 policy for everything, MHC upcasts phi/alpha/bias inside
    all_bf16 = make_model(None)
    seen.clear()
    all_bf16.stack.layers[0].register_forward_pre_hook(lambda m, a: seen.update(phi=str(m.phi.dtype)))
    for site in all_bf16.stack.layers:
        fully_shard(site, mp_policy=bf16)
    fully_shard(all_bf16, mp_policy=bf16)
    losses = global_loss(train(all_bf16, data, rank))
    out["mp_bf16_dtypes"] = dict(seen)
    out["mp_bf16_loss"] = float((losses - ref_losses).abs().max())
    out["mp_bf16_grad_dtype"] = str(all_bf16.stack.layers[0].phi.dtype)

    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=WORLD, join=True)
