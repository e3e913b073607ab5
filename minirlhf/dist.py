"""One code path from a single CPU process to many GPUs and nodes: process groups, FSDP2, gathering.

`python script.py` is rank 0 of 1; under `torchrun` ranks shard every block, then the root, with FSDP2 (NCCL on
CUDA, gloo on CPU; bf16 compute, fp32 reduction on GPU), which averages gradients: `window_mean` x `world_size`.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor


def init_distributed():
    """-> (rank, world_size, device). Starts a process group only when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return dist.get_rank(), dist.get_world_size(), device


def get_rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_fsdp(model, device):
    """Shard each block (gathered one at a time), then the root, whose (maybe tied) output embedding the fused
    log-prob op inside `CausalLM.forward` then sees whole; bf16 compute with fp32 master weights and gradient
    reduction on CUDA. -> the model on `device` (one rank: only moved)."""
    if world_size() == 1:
        return model.to(device)
    bf16 = torch.device(device).type == "cuda"
    mp = MixedPrecisionPolicy(**(dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}))
    for block in model.model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model.to(device)


def autocast(device):
    """bf16 autocast on one GPU; with several ranks FSDP's MixedPrecisionPolicy casts instead; CPU stays fp32."""
    if device.type == "cuda" and world_size() == 1:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def full_state_dict(model, names=None):
    """The full (unsharded) state dict (or its entries `names`) on CPU, on every rank: a collective."""
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", copy=True)  # all-gather
            for name, t in model.state_dict().items() if names is None or name in names}


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...]; [obj] with one process."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor):
    """In place sum over ranks (a sync point); returns the tensor."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor
