"""Worker for tests/test_logprobs.py: FSDP2 (fully_shard, gloo on CPU) gradients of the fused log-prob op.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_logprobs_worker.py out.json

Each rank takes its rows of one global batch, computes token log-probs inside the module's forward (as
CausalLM does), backpropagates window_mean(-token_logps, N_global, world_size), and gathers the full
gradients (DTensor.full_tensor()). Rank 0 writes {"tied": max abs error, "untied": ...} against one process
that sees the whole batch.
"""
import copy
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from minirlhf.logprobs import fused_token_logps
from minirlhf.losses import window_mean

V, D, B, T = 37, 8, 4, 11


class TinyLM(torch.nn.Module):
    def __init__(self, tied):
        super().__init__()
        self.embed = torch.nn.Embedding(V, D)
        self.layer = torch.nn.Linear(D, D)
        self.head = None if tied else torch.nn.Linear(D, V, bias=False)

    def forward(self, ids, labels):
        h = torch.tanh(self.layer(self.embed(ids)))  # (B, T, D)
        weight = self.embed.weight if self.head is None else self.head.weight
        return fused_token_logps(h, weight, labels, chunk_size=5)


def run(tied, rank, world_size):
    torch.manual_seed(0)  # same init on every rank
    model = TinyLM(tied)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :7] = -100  # uneven token counts per rank: the global count matters
    n_global = (labels != -100).sum()

    ref = copy.deepcopy(model)
    window_mean(-ref(ids, labels), n_global).backward()

    fully_shard(model.layer)
    fully_shard(model)
    rows = slice(rank * B // world_size, (rank + 1) * B // world_size)
    window_mean(-model(ids[rows], labels[rows]), n_global, world_size).backward()
    err = 0.0
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        err = max(err, (p.grad.full_tensor() - p_ref.grad).abs().max().item())
    return err


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    result = {name: run(name == "tied", rank, world_size) for name in ["tied", "untied"]}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    # Both ranks leave together: gloo can abort a rank whose peer tears the group down under it.
    dist.barrier()
    dist.destroy_process_group()
